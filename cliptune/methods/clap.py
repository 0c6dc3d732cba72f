"""CLAP (Silva-Rodríguez et al., "A Closer Look at the Few-Shot Adaptation of Large Vision-Language Models",
CVPR'24): a linear probe that starts at the zero-shot classifier and is held near it by a class-adaptive penalty.

Each class weight `w_c` starts as the class's zero-shot prototype `t_c` (the mean text feature of its prompts);
logits are the model's scale times the cosine of image features and weights. The loss is cross-entropy plus
`mean_c lambda_c * ||w_c - t_c||^2`, where `lambda_c` is how much the zero-shot classifier already trusts class
c on the training images (the mean zero-shot softmax probability of class c over its own training features,
augmented views included). Classes that zero-shot handles well stay close to their prompts; poorly handled
ones may move. The penalty, not a validation split, keeps the probe from overfitting a few shots: the method
needs no validation set and no search (jusiro/CLAP `trainers/adapters.py:148-150` zero-shot init,
`:219-251` the constraint and its multipliers, `:343-353` the cosine logits, `:686-690` the loss).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cliptune.core.errors import CliptuneError
from cliptune.core.options import option
from cliptune.methods.base import Method, MethodConfig

VIEWS = 20  # trainers/adapters.py:143 (epochs_aumentation): augmented copies of every training image, encoded once


@dataclass
class CLAPConfig(MethodConfig):
    constraint: str = option("l2", "l2: CLAP's class-adaptive penalty toward the zero-shot prototypes; none: a "
                                   "zero-shot-initialised linear probe (ZS-LP)", choices=("l2", "none"))


def class_trust(probabilities: torch.Tensor, labels: torch.Tensor, classes: int) -> torch.Tensor:
    """CLAP's initial multipliers: per class, the mean zero-shot probability of that class on its own samples
    (`init_lagrangian_multipliers`: diag(softmax(logits).T @ onehot) / class counts)."""
    onehot = F.one_hot(labels, classes).to(probabilities.dtype)
    return torch.diag(probabilities.T @ onehot) / onehot.sum(0)


class CLAP(Method):
    # buffers (registered in __init__/prepare; declared for type checkers)
    prototypes: torch.Tensor
    trust: torch.Tensor
    scale: torch.Tensor
    name = "clap"
    config_class = CLAPConfig
    config: CLAPConfig
    trains = "a linear head started at the zero-shot classifier, held near it by a class-adaptive penalty"
    paper = "CLAP (Silva-Rodríguez et al., CVPR'24)"
    differs = (f"each epoch draws one of {VIEWS} cached augmented views per image, where the original shuffles all "
               "image-view pairs and takes as many batches as one pass over the images")
    uses_image_features = True
    class_specific = True

    @classmethod
    def training_defaults(cls, shots):
        # configs/trainers/SGD_lr1e-1_B256_ep300.yaml: SGD lr 0.1, weight decay 0, batch 256, 300 epochs, cosine,
        # one constant warm-up epoch at 1e-5, random resized crop + flip; Dassl's momentum 0.9, per-epoch schedule,
        # last epoch (no validation: the point of the method)
        return {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0, "batch_size": 256, "epochs": 300,
                "warmup_epochs": 1, "warmup_lr": 1e-5, "lr_per_epoch": True, "drop_last": True, "aug_views": VIEWS,
                "aug_crop_scale": [0.08, 1.0], "aug_hflip": True, "select": "last"}

    def __init__(self, model, classnames, templates, config: CLAPConfig, descriptions=None):
        super().__init__(model, classnames, templates, config, descriptions)
        prototypes = self._prototypes()
        self.weight = nn.Parameter(prototypes.clone())
        self.register_buffer("prototypes", prototypes)
        self.register_buffer("trust", torch.zeros(len(self.classnames), device=prototypes.device))
        self.register_buffer("scale", model.logit_scale.detach().clone(), persistent=False)

    @torch.no_grad()
    def _prototypes(self) -> torch.Tensor:
        """(classes, dim): the mean of each class's unnormalised prompt features (`_get_base_text_features`)."""
        text = self.model.text
        return torch.stack([text.encode(text.tokenize([t.format(name) for t in self.templates]), normalize=False).float().mean(0)
                            for name in self.classnames])

    def prepare(self, train, val=None) -> None:
        if self.config.constraint == "none":
            return
        if train.features is None:
            raise CliptuneError("clap sets its penalty from cached image features: drop --aug-per-step")
        features = train.features if train.features.dim() == 3 else train.features[None]
        with torch.no_grad():
            probabilities = self.logits_of(features.flatten(0, 1).to(self.prototypes.device), self.prototypes).softmax(-1)
            labels = train.labels.to(probabilities.device).repeat(features.shape[0])
            self.trust.copy_(class_trust(probabilities, labels, len(self.classnames)))

    def logits_of(self, image_features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(image_features.float(), dim=-1) @ F.normalize(weights, dim=-1).T

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.logits_of(image_features, self.weight)

    def penalty(self) -> torch.Tensor:
        """mean_c trust_c * ||w_c - t_c||^2 (`zero_shot_constraint`, l2)."""
        return (self.trust * (self.weight - self.prototypes).pow(2).sum(-1)).mean()

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        loss = super().loss(logits, labels, label_smoothing)
        return loss if self.config.constraint == "none" else loss + self.penalty()
