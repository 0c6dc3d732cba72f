"""CLIP-Adapter (Gao et al., IJCV'23): a residual bottleneck MLP on the frozen image features.

As in the released `clip_adapter.py`: Adapter = Linear(d, d/4, bias=False) -> ReLU -> Linear(d/4, d,
bias=False) -> ReLU on the raw image feature x, blended as `ratio * adapter(x) + (1 - ratio) * x` with
ratio 0.2, then cosine logits against the class text features (here: the run's templates averaged, as
for zero-shot). Only the adapter trains; the class side is text, so a trained adapter also works on
other class lists.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cliptune.methods.base import Method, MethodConfig
from cliptune.methods.coop import DASSL_DIFFERENCE, dassl_epochs, dassl_schedule
from cliptune.core.options import option
from cliptune.models.zeroshot import zeroshot_weights


@dataclass
class CLIPAdapterConfig(MethodConfig):
    ratio: float = option(0.2, "residual ratio: ratio * adapter(x) + (1 - ratio) * x", min=0.0, max=1.0, flag="--adapter-ratio")
    reduction: int = option(4, "bottleneck reduction of the adapter MLP (d -> d/reduction -> d)", min=1,
                            flag="--adapter-reduction")


class CLIPAdapter(Method):
    # buffers (registered in __init__/prepare; declared for type checkers)
    scale: torch.Tensor
    class_features: torch.Tensor
    name = "clip-adapter"
    config_class = CLIPAdapterConfig
    config: CLIPAdapterConfig
    trains = "a residual bottleneck MLP on the image features"
    paper = "CLIP-Adapter (Gao et al., IJCV'23)"
    differs = "lr 0.01 (the released code ships no optimiser config; CoOp's 0.002 barely moves the adapter); " + DASSL_DIFFERENCE
    uses_image_features = True

    def __init__(self, model, classnames, templates, config: CLIPAdapterConfig, descriptions=None):
        super().__init__(model, classnames, templates, config, descriptions)
        dim = model.text.output_dim
        hidden = max(1, dim // config.reduction)
        self.adapter = nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.ReLU(inplace=True),
                                     nn.Linear(hidden, dim, bias=False), nn.ReLU(inplace=True)).to(model.text.device)
        self.register_buffer("scale", model.logit_scale.detach().clone(), persistent=False)
        self.set_classes(classnames)

    @classmethod
    def training_defaults(cls, shots):
        # The released trainer builds its optimiser from Dassl configs (cfg.OPTIM) that the repository does not
        # ship: CoOp's schedule (SGD, batch 32, cosine after a constant warm-up epoch, epochs by shots) is used,
        # with lr 0.01 instead of CoOp's 0.002 (measured on the bundled data: the adapter barely moves at 0.002).
        return dassl_schedule(0.01, 32, dassl_epochs(shots))

    @classmethod
    def search_space(cls, shots):
        return {**super().search_space(shots), "clip-adapter.ratio": ("float", 0.05, 0.8)}

    def set_classes(self, classnames) -> None:
        super().set_classes(classnames)
        weights = zeroshot_weights(self.model.text, self.classnames, self.templates)
        self.register_buffer("class_features", weights, persistent=False)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        x = image_features.to(self.class_features.dtype)
        blended = self.config.ratio * self.adapter(x) + (1 - self.config.ratio) * x
        return self.scale * F.normalize(blended, dim=-1) @ self.class_features.T
