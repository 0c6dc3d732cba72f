"""Linear probe: a logistic-regression head on frozen image features.

The head starts as the zero-shot classifier (weights = class text embeddings, bias 0, temperature =
the model's logit scale), so training can only move away from a known-good baseline.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cliptune.methods.base import Method, MethodConfig
from cliptune.zeroshot import zeroshot_weights


@dataclass
class LinearProbeConfig(MethodConfig):
    init: str = "zeroshot"  # "zeroshot" or "random"


class LinearProbe(Method):
    name = "linear-probe"
    config_class = LinearProbeConfig
    uses_image_features = True
    class_specific = True

    def __init__(self, model, classnames, templates, config: LinearProbeConfig, descriptions=None):
        super().__init__(model, classnames, templates, config, descriptions)
        if config.init not in ("zeroshot", "random"):
            from cliptune.errors import CliptuneError

            raise CliptuneError(f"linear-probe.init must be 'zeroshot' or 'random', got {config.init!r}")
        weights = zeroshot_weights(model.text, self.classnames, self.templates)
        self.head = nn.Linear(weights.shape[1], len(self.classnames))
        with torch.no_grad():
            if config.init == "zeroshot":
                self.head.weight.copy_(weights)
                self.head.bias.zero_()
        self.register_buffer("scale", model.logit_scale.detach().clone())

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.scale * self.head(F.normalize(image_features, dim=-1))
