"""KgCoOp (Yao et al., "Visual-Language Prompt Tuning with Knowledge-guided Context Optimization", CVPR'23):
CoOp whose learned class text features are kept near the frozen model's hand-crafted ones.

The loss adds `weight * (1 - mean_c cos(w_c, w_c^clip))` to CoOp's cross-entropy, where `w_c` are the learned
prompts' unit-norm text features and `w_c^clip` the frozen model's features of the hand-written prompts
(htyao89/KgCoOp `trainers/kgcoop.py:238-241`, `:310`). Keeping the prompts close to general knowledge is what
keeps KgCoOp's accuracy on classes it never trained on (base-to-novel) near zero-shot. Everything else is CoOp
(`cliptune/methods/coop.py`) with the context initialised from "a photo of a".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from cliptune.core.options import option
from cliptune.methods.coop import DASSL_DIFFERENCE, CoOp, PhotoContextConfig, dassl_schedule
from cliptune.models.zeroshot import zeroshot_weights


@dataclass
class KgCoOpConfig(PhotoContextConfig):
    # trainers/kgcoop.py:94-98 (CTX_INIT: "a photo of a", so 4 context tokens); scripts/run.sh passes W = 8.0
    weight: float = option(8.0, "weight of 1 - mean cosine between learned and hand-crafted class text features", min=0,
                           flag="--kg-weight")


def knowledge_distance(learned: torch.Tensor, handcrafted: torch.Tensor) -> torch.Tensor:
    """KgCoOp's regulariser: 1 - the mean over classes of the cosine between learned and hand-crafted features."""
    return 1.0 - F.cosine_similarity(learned, handcrafted, dim=-1, eps=1e-7).mean()


class KgCoOp(CoOp):
    # buffers (registered in __init__/prepare; declared for type checkers)
    handcrafted: torch.Tensor
    name = "kgcoop"
    multi_label = True  # its loss is cross-entropy on class logits
    config_class = KgCoOpConfig
    config: KgCoOpConfig
    trains = "context vectors of the class prompts, kept near the hand-crafted prompts' text features"
    paper = "KgCoOp (Yao et al., CVPR'23)"
    differs = ("the hand-crafted features average the run's prompt templates, where KgCoOp encodes one template per "
               "dataset (trainers/kgcoop.py:37-54, e.g. 'a photo of a {}.'); " + DASSL_DIFFERENCE)

    @classmethod
    def training_defaults(cls, shots):
        # configs/trainers/KgCoOp/vit_b16_ep100_ctxv1.yaml:3,16-22 (batch 128, SGD lr 0.002, 100 epochs, one
        # constant warm-up epoch at 1e-5, cosine; random resized crop + flip) for every shot count
        return dassl_schedule(0.002, 128, 100)

    @classmethod
    def search_space(cls, shots):
        return {**super().search_space(shots), "kgcoop.weight": ("log", 1.0, 64.0)}

    def __init__(self, model, classnames, templates, config: KgCoOpConfig, descriptions=None):
        super().__init__(model, classnames, templates, config, descriptions)
        self.register_buffer("handcrafted", zeroshot_weights(model.text, self.classnames, self.templates), persistent=False)
        self._distance: Optional[torch.Tensor] = None

    def set_classes(self, classnames) -> None:
        super().set_classes(classnames)
        self.handcrafted = zeroshot_weights(self.model.text, self.classnames, self.templates).to(self.handcrafted.device)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        text = self.text_features()
        self._distance = knowledge_distance(text, self.handcrafted.to(text.dtype)) if self.training else None
        return self.logits(image_features, text)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        loss = super().loss(logits, labels, label_smoothing)
        return loss if self._distance is None else loss + self.config.weight * self._distance
