"""Tip-Adapter and Tip-Adapter-F (Zhang et al., ECCV'22): a key-value cache of the few-shot training set.

Keys are the training images' normalised features (averaged over the augmented views, as the original
`build_cache_model` averages its `augment_epoch` passes), values their one-hot labels. An image's logits
are CLIP's zero-shot logits plus `alpha * exp(-beta * (1 - f @ keys.T)) @ values`, so alpha = 0 is
zero-shot exactly. Tip-Adapter trains nothing; Tip-Adapter-F fine-tunes the keys (its `adapter.weight`)
with cross-entropy. Both then search alpha and beta on the validation split over the original grid
(`search_hp` in utils.py, the ImageNet config: beta 0.1..7 in 200 steps, alpha 0.1..3 in 20 steps).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cliptune.core.errors import CliptuneError
from cliptune.methods.base import Method, MethodConfig
from cliptune.core.options import option
from cliptune.models.zeroshot import zeroshot_weights

log = logging.getLogger("cliptune")
BETA_GRID = [i * (7 - 0.1) / 200 + 0.1 for i in range(200)]
ALPHA_GRID = [i * (3 - 0.1) / 20 + 0.1 for i in range(20)]


@dataclass
class TipAdapterConfig(MethodConfig):
    alpha: float = option(1.17, "weight of the cache logits (start value when searched; 0 = zero-shot)", min=0.0)
    beta: float = option(1.0, "sharpness of the cache affinities exp(-beta (1 - cosine)) (start value when searched)", min=0.0)
    search: bool = option(True, "search alpha and beta on the validation split (the paper's grid)")


def cache_logits(features: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, beta) -> torch.Tensor:
    """exp(-beta * (1 - cos(f, key))) @ one-hot values, for unit-norm features and keys."""
    return (-beta * (1 - features @ keys.T)).exp() @ values


class TipAdapter(Method):
    # buffers (registered in __init__/prepare; declared for type checkers)
    class_features: torch.Tensor
    scale: torch.Tensor
    cache_values: torch.Tensor
    alpha: torch.Tensor
    beta: torch.Tensor
    cache_keys: torch.Tensor
    name = "tip-adapter"
    config_class = TipAdapterConfig
    config: TipAdapterConfig
    trains = "nothing: a cache of the few-shot training features (alpha/beta searched on val)"
    paper = "Tip-Adapter (Zhang et al., ECCV'22)"
    uses_image_features = True
    class_specific = True  # the cache values are one-hot over the training classes

    def __init__(self, model, classnames, templates, config: TipAdapterConfig, descriptions=None):
        super().__init__(model, classnames, templates, config, descriptions)
        weights = zeroshot_weights(model.text, self.classnames, self.templates)
        self.register_buffer("class_features", weights, persistent=False)
        self.register_buffer("scale", model.logit_scale.detach().clone(), persistent=False)
        self.register_buffer("cache_values", torch.zeros(0, len(self.classnames), device=weights.device))
        self.set_cache_keys(torch.zeros(0, weights.shape[1], device=weights.device))
        self.register_buffer("alpha", torch.tensor(float(config.alpha)))
        self.register_buffer("beta", torch.tensor(float(config.beta)))

    @classmethod
    def training_defaults(cls, shots):
        # configs/imagenet.yaml:30 augment_epoch 10, main.py:173-178 RandomResizedCrop(0.5-1) + flip: the cache from 10
        # augmented passes; nothing trains. alpha/beta are searched on the full validation split (datasets/*.py read
        # val whole, only train is few-shot): val_shots 0.
        return {"aug_views": 10, "aug_crop_scale": [0.5, 1.0], "aug_hflip": True, "val_shots": 0}

    def set_cache_keys(self, keys: torch.Tensor) -> None:
        self.register_buffer("cache_keys", keys)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        features = F.normalize(image_features.float(), dim=-1)
        zeroshot = self.scale * features @ self.class_features.T
        return zeroshot + self.alpha * cache_logits(features, self.cache_keys, self.cache_values, self.beta)

    @torch.no_grad()
    def prepare(self, train, val=None) -> None:
        if train.features is None:
            raise CliptuneError(f"{self.name} builds its cache from cached image features: drop --aug-per-step")
        features = train.features.mean(dim=0) if train.features.dim() == 3 else train.features
        self.set_cache_keys(F.normalize(features.float(), dim=-1).to(self.class_features.device))
        self.cache_values = F.one_hot(train.labels, len(self.classnames)).float().to(self.class_features.device)
        if not self.trainable_parameters():
            self.search(val)

    @torch.no_grad()
    def search(self, val) -> None:
        """The original `search_hp`: the (beta, alpha) of the grid with the best validation accuracy."""
        if not self.config.search or val is None or not len(val):
            return
        features = F.normalize(val.features.float(), dim=-1).to(self.class_features.device)
        labels = val.labels.to(features.device)
        zeroshot = self.scale * features @ self.class_features.T
        affinity = features @ self.cache_keys.T
        best = (-1.0, 0.0, 0.0)
        for beta in BETA_GRID:
            cached = (-beta * (1 - affinity)).exp() @ self.cache_values
            for alpha in ALPHA_GRID:
                accuracy = float(((zeroshot + alpha * cached).argmax(dim=1) == labels).float().mean())
                if accuracy > best[0]:  # strictly better: the first of equals is kept, as in the original
                    best = (accuracy, beta, alpha)
        self.beta.fill_(best[1])
        self.alpha.fill_(best[2])
        log.info("%s: beta %.2f, alpha %.2f chosen on %d validation images (val top-1 %.2f%%)",
                 self.name, best[1], best[2], len(labels), 100 * best[0])

    def load_learned_state_dict(self, state) -> None:
        """The cache's size is the training set's: a method built without training data takes the saved shapes."""
        if self.cache_keys.shape != state["cache_keys"].shape:
            with torch.no_grad():
                self.set_cache_keys(torch.zeros_like(state["cache_keys"], device=self.class_features.device))
                self.cache_values = torch.zeros_like(state["cache_values"], device=self.class_features.device)
        super().load_learned_state_dict(state)


@dataclass
class TipAdapterFConfig(TipAdapterConfig):
    """Tip-Adapter's options, under the `tip-adapter-f` section."""


class TipAdapterF(TipAdapter):
    name = "tip-adapter-f"
    config_class = TipAdapterFConfig
    config: TipAdapterFConfig
    trains = "the cache keys of Tip-Adapter (alpha/beta searched on val after training)"
    paper = "Tip-Adapter-F (Zhang et al., ECCV'22)"
    differs = ("the keys train on the cache's 10 augmented views, where the original re-augments every iteration; "
               "the best epoch is chosen on val, where the original peeks at test")

    @classmethod
    def training_defaults(cls, shots):
        # main.py:72 AdamW(lr, eps=1e-4) with torch's default weight decay 0.01; configs/imagenet.yaml:29,31 lr 1e-3,
        # 20 epochs; main.py:181 batch 256; main.py:73,106 a per-iteration cosine without warm-up. The original keeps
        # the epoch with the best TEST accuracy (main.py:111-126): here the best on val.
        return {**super().training_defaults(shots), "optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.01, "adam_eps": 1e-4,
                "batch_size": 256, "epochs": 20, "select": "best-val"}

    def set_cache_keys(self, keys: torch.Tensor) -> None:
        if "cache_keys" in dict(self.named_buffers(recurse=False)):
            del self.cache_keys  # a buffer until now: the name is free for the parameter
        self.cache_keys = nn.Parameter(keys)  # the original's adapter.weight, trained

    def final_state(self, val=None):
        self.search(val)
        return self.learned_state_dict()
