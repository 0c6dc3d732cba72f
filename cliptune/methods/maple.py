"""MaPLe (Khattak et al., CVPR'23): coupled language and vision prompts in the early layers of both towers.

Language prompts: the context of the class prompts at the input (as in CoOp) plus, for each layer
1 .. depth-1, a new set of n_ctx tokens that replaces the previous layer's prompt tokens. Vision
prompts are not free parameters: each layer's are produced from that layer's language prompts by a
coupling function (one Linear text-width -> vision-width per layer), which ties the two branches.
Both towers stay frozen; the image tower runs with its prompts, so this method takes images.
"""

from __future__ import annotations

import copy

from dataclasses import dataclass
from typing import List

import torch
import torch.nn.functional as F
from torch import nn

from cliptune.methods.base import Method, MethodConfig, TextFeatureCache, text_chunk_option
from cliptune.methods.coop import dassl_schedule
from cliptune.methods.prompts import ClassPrompts, initial_context
from cliptune.core.options import option


@dataclass
class MaPLeConfig(MethodConfig):
    n_ctx: int = option(2, "learned context tokens per prompted layer", min=1)
    ctx_init: str = option("a photo of a", "the input context starts as the first n_ctx tokens of this phrase")
    prompt_depth: int = option(9, "layers carrying prompts, input included (capped at the towers' depth)", min=1)
    text_chunk: int = text_chunk_option()


class MaPLe(Method):
    # buffers (registered in __init__/prepare; declared for type checkers)
    scale: torch.Tensor
    name = "maple"
    multi_label = True  # its loss is cross-entropy on class logits
    config_class = MaPLeConfig
    config: MaPLeConfig
    trains = "coupled language/vision prompts in the first layers of both towers"
    paper = "MaPLe (Khattak et al., CVPR'23)"
    uses_image_features = False

    @classmethod
    def training_defaults(cls, shots):
        # configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml:3,17,18: SGD 0.0035, batch 4, 5 epochs; the image
        # tower trains, so every step re-augments (no view bank)
        return dassl_schedule(0.0035, 4, 5, view_bank=False)

    @classmethod
    def search_space(cls, shots):
        return {**super().search_space(shots), f"{cls.name}.n_ctx": ("int", 1, 4), f"{cls.name}.prompt_depth": ("int", 1, 9)}

    def __init__(self, model, classnames, templates, config: MaPLeConfig, descriptions=None):
        super().__init__(model, classnames, templates, config, descriptions)
        text, image = model.text, model.image
        self.depth = min(config.prompt_depth, len(text.blocks), len(image.blocks))
        ctx_init = config.ctx_init.strip()
        self.prompts = ClassPrompts(text, self.classnames, config.n_ctx, ctx_init)
        device = text.device
        self.ctx = nn.Parameter(initial_context(text, config.n_ctx, ctx_init).to(device))
        self.deep_text = nn.ParameterList(
            [nn.Parameter(torch.randn(config.n_ctx, text.width, device=device) * 0.02) for _ in range(self.depth - 1)]
        )
        self.init_vision_prompts(text.width, image.width, device)
        self.register_buffer("scale", model.logit_scale.detach().clone(), persistent=False)
        self._cache = TextFeatureCache()

    def init_vision_prompts(self, text_width: int, image_width: int, device) -> None:
        """The coupling functions: trainers/maple.py:103,116-117, the input layer's own projection, then deep copies
        of ONE Linear for the deeper layers (`_get_clones`), so those start identical."""
        first = nn.Linear(text_width, image_width)
        deep = nn.Linear(text_width, image_width)
        self.couplings = nn.ModuleList([first] + [copy.deepcopy(deep) for _ in range(self.depth - 1)]).to(device)

    def language_prompts(self) -> List[torch.Tensor]:
        """Per prompted layer (input first), its (n_ctx, text width) language prompt."""
        return [self.ctx, *self.deep_text]

    def vision_prompts(self) -> List[torch.Tensor]:
        """Per prompted layer, its (n_ctx, vision width) prompt, coupled to the language prompt."""
        return [couple(prompt) for couple, prompt in zip(self.couplings, self.language_prompts())]

    def set_classes(self, classnames) -> None:
        super().set_classes(classnames)
        self.prompts.set_classes(self.classnames)

    def _encode_text(self) -> torch.Tensor:
        deep, n, start = self.language_prompts()[1:], self.config.n_ctx, self.prompts.start

        def replace_prompts(index: int, x: torch.Tensor) -> torch.Tensor:
            if not 0 < index <= len(deep):
                return x
            prompt = deep[index - 1].to(x.dtype).expand(x.shape[0], -1, -1)
            return torch.cat([x[:, :start], prompt, x[:, start + n :]], dim=1)

        chunk = self.prompts.chunk(self.config.text_chunk)
        return F.normalize(self.prompts.encode_in_chunks(self.ctx, chunk, replace_prompts), dim=-1)

    def text_features(self) -> torch.Tensor:
        """(classes, dim) unit-norm text features of the prompted text tower."""
        return self._cache.get(self.prompts.token_ids, self.language_prompts(), self._encode_text, self.training)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """(batch, dim) unit-norm features of the prompted image tower."""
        return self.model.image.encode_prompted(images, self.vision_prompts())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        text = self.text_features()
        return self.scale * self.image_features(images).to(text.dtype) @ text.T
