"""CoOp (Zhou et al., IJCV'22): learn the prompt's context words as continuous vectors.

Each class prompt is [SOS] [ctx_1 .. ctx_n] [classname] [.] [EOT] fed as token embeddings to the
frozen text tower; only the context vectors train (one set shared by all classes, or one per class
with `class_specific`). The image tower is frozen, so training runs on cached image features and
each step costs one text-encoder pass over the class prompts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cliptune.core.errors import CliptuneError
from cliptune.methods.base import Method, MethodConfig, TextFeatureCache, text_chunk_option
from cliptune.methods.prompts import POSITIONS, ClassPrompts, initial_context, phrase_length
from cliptune.core.options import option


@dataclass
class CoOpConfig(MethodConfig):
    n_ctx: int = option(16, "learned context tokens (set to the token count of --ctx-init when given)", min=1)
    ctx_init: str = option("", "initialise the context from this phrase, e.g. 'a photo of a' (default: N(0, 0.02))")
    class_specific: bool = option(False, "one context per class (CSC; cannot be used on other classes)")
    class_token_position: str = option("end", "where the class name goes", choices=POSITIONS)
    text_chunk: int = text_chunk_option()


@dataclass
class PhotoContextConfig(CoOpConfig):
    """CoOp's options with the context started from "a photo of a" (4 tokens), as KgCoOp and BiomedCoOp start it."""

    n_ctx: int = option(4, "learned context tokens (set to the token count of --ctx-init when given)", min=1)
    ctx_init: str = option("a photo of a", "initialise the context from this phrase ('' = N(0, 0.02))")


VIEW_BANK = 16  # augmented views encoded once per training image, instead of a fresh augmentation every step


def dassl_epochs(shots) -> int:
    """CoOp's epochs by shots (COOP.md:18-22: 1 shot -> vit_b16_ep50, 2 and 4 -> ep100, 8 and 16 -> 200; full data 200)."""
    return 50 if shots is not None and shots <= 1 else 100 if shots is not None and shots <= 4 else 200


def dassl_schedule(lr: float, batch_size: int, epochs: int, optimizer: str = "sgd", view_bank: bool = True) -> dict:
    """The Dassl trainers' optimisation (CoOp, CoCoOp, MaPLe configs), as Dassl runs it:
    SGD momentum 0.9, weight decay 5e-4 (dassl/config/defaults.py:153-156); one warm-up epoch at a constant
    1e-5, then a cosine over the epochs stepped once per epoch (configs/trainers/CoOp/vit_b16.yaml:20-22,
    trainers/coop.py:281-282); the last partial batch dropped (dassl/data/data_manager.py:43);
    RandomResizedCrop(0.08-1) + flip (vit_b16.yaml:13, defaults.py:40); the last epoch evaluated (defaults.py:216).

    One deliberate difference: a frozen image tower sees a bank of 16 augmented views per image, encoded once,
    where Dassl re-augments every step (`--aug-per-step`, as `recipes/<method>.yaml` do, is exact and slower).
    `view_bank=False` for a method whose image tower runs with its prompts: every step re-augments, as in Dassl.
    """
    return {"optimizer": optimizer, "lr": lr, "momentum": 0.9, "weight_decay": 5e-4, "batch_size": batch_size,
            "epochs": epochs, "warmup_epochs": 1, "warmup_lr": 1e-5, "lr_per_epoch": True, "drop_last": True,
            "aug_crop_scale": [0.08, 1.0], "aug_hflip": True, **({"aug_views": VIEW_BANK} if view_bank else {}),
            "select": "last"}


DASSL_DIFFERENCE = ("a bank of 16 augmented views per image encoded once, where Dassl re-augments every step "
                    "(--aug-per-step is exact)")


class CoOp(Method):
    # buffers (registered in __init__/prepare; declared for type checkers)
    scale: torch.Tensor
    name = "coop"
    multi_label = True  # its loss is cross-entropy on class logits
    config_class = CoOpConfig
    config: CoOpConfig
    trains = "context vectors of the class prompts (text tower frozen)"
    paper = "CoOp (Zhou et al., IJCV'22)"
    differs = DASSL_DIFFERENCE
    uses_image_features = True

    @classmethod
    def training_defaults(cls, shots):
        # configs/trainers/CoOp/vit_b16.yaml:3,17 (batch 32, SGD lr 0.002); epochs by shots from COOP.md:18-22
        return dassl_schedule(0.002, 32, dassl_epochs(shots))

    @classmethod
    def search_space(cls, shots):
        return {**super().search_space(shots), f"{cls.name}.n_ctx": ("int", 2, 16),
                f"{cls.name}.ctx_init": ("choice", ["", "a photo of a"])}

    def __init__(self, model, classnames, templates, config: CoOpConfig, descriptions=None):
        super().__init__(model, classnames, templates, config, descriptions)
        text = model.text
        ctx_init = config.ctx_init.strip()
        if ctx_init:
            config = dataclasses.replace(config, n_ctx=phrase_length(text, ctx_init))
            self.config = config
        self.class_specific = config.class_specific
        self.prompts = ClassPrompts(text, self.classnames, config.n_ctx, ctx_init, config.class_token_position)
        if config.class_specific:
            ctx = torch.stack([initial_context(text, config.n_ctx, ctx_init) for _ in self.classnames])
        else:
            ctx = initial_context(text, config.n_ctx, ctx_init)
        self.ctx = nn.Parameter(ctx.to(text.device))
        self.register_buffer("scale", model.logit_scale.detach().clone(), persistent=False)
        self._cache = TextFeatureCache()

    def set_classes(self, classnames) -> None:
        if self.class_specific and list(classnames) != self.classnames:
            raise CliptuneError("class-specific CoOp learned one context per training class; it cannot be used on other classes")
        super().set_classes(classnames)
        self.prompts.set_classes(self.classnames)

    def text_features(self) -> torch.Tensor:
        """(classes, dim) unit-norm text features of the learned prompts."""
        chunk = self.prompts.chunk(self.config.text_chunk)
        return self._cache.get(self.prompts.token_ids, [self.ctx],
                               lambda: F.normalize(self.prompts.encode_in_chunks(self.ctx, chunk), dim=-1), self.training)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.logits(image_features, self.text_features())

    def logits(self, image_features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """CLIP's logits: the model's scale times the cosine of image and class text features."""
        return self.scale * F.normalize(image_features, dim=-1).to(text.dtype) @ text.T
