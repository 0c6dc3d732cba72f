"""CoCoOp (Zhou et al., CVPR'22): CoOp context conditioned on each image.

A small meta-net (Linear-ReLU-Linear, feature-dim/16 bottleneck) maps the normalised image feature
to a bias added to every context vector, so each image gets its own class prompts and text
features. That is one text-encoder pass over all classes per image, run `text_chunk` prompts at a time (with
activation checkpointing while training), so memory stays bounded in the batch size and the class count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cliptune.methods.base import Method, MethodConfig, text_chunk_option
from cliptune.methods.coop import DASSL_DIFFERENCE, dassl_schedule
from cliptune.methods.prompts import ClassPrompts, initial_context
from cliptune.core.options import option


@dataclass
class CoCoOpConfig(MethodConfig):
    n_ctx: int = option(4, "learned context tokens", min=1)
    ctx_init: str = option("a photo of a", "initialise the context from the first n_ctx tokens of this phrase ('' = N(0, 0.02))")
    text_chunk: int = text_chunk_option()


class CoCoOp(Method):
    # buffers (registered in __init__/prepare; declared for type checkers)
    scale: torch.Tensor
    name = "cocoop"
    multi_label = True  # its loss is cross-entropy on class logits
    config_class = CoCoOpConfig
    config: CoCoOpConfig
    trains = "context vectors + a meta-net conditioning them on each image"
    paper = "CoCoOp (Zhou et al., CVPR'22)"
    differs = DASSL_DIFFERENCE
    uses_image_features = True

    @classmethod
    def training_defaults(cls, shots):
        # configs/trainers/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml:3,17,18: SGD 0.002, batch 1, 10 epochs
        return dassl_schedule(0.002, 1, 10)

    @classmethod
    def search_space(cls, shots):
        return {**super().search_space(shots), "cocoop.ctx_init": ("choice", ["a photo of a", ""])}

    def __init__(self, model, classnames, templates, config: CoCoOpConfig, descriptions=None):
        super().__init__(model, classnames, templates, config, descriptions)
        text = model.text
        ctx_init = config.ctx_init.strip()
        self.prompts = ClassPrompts(text, self.classnames, config.n_ctx, ctx_init)
        self.ctx = nn.Parameter(initial_context(text, config.n_ctx, ctx_init).to(text.device))
        dim = text.output_dim  # = the image feature dimension (shared embedding space)
        hidden = max(1, dim // 16)
        self.meta_net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, text.width))
        self.meta_net.to(text.device)
        self.register_buffer("scale", model.logit_scale.detach().clone(), persistent=False)

    def set_classes(self, classnames) -> None:
        super().set_classes(classnames)
        self.prompts.set_classes(self.classnames)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        image = F.normalize(image_features, dim=-1)
        ctx = self.ctx + self.meta_net(image.to(self.ctx.dtype)).unsqueeze(1)  # (batch, n_ctx, width)
        chunk = self.prompts.chunk(self.config.text_chunk)
        text = F.normalize(self.prompts.encode_in_chunks(ctx.unsqueeze(1), chunk), dim=-1)  # (batch, classes, dim)
        return self.scale * torch.einsum("bd,bcd->bc", image.to(text.dtype), text)
