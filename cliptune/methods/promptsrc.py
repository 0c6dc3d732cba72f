"""PromptSRC (Khattak et al., "Self-regulating Prompts: Foundational Model Adaptation without Forgetting", ICCV'23):
deep prompts in both towers that are kept close to what the frozen model already knows.

The prompts are MaPLe's layout without the coupling (the "independent V-L prompting" of muzairkhattak/PromptSRC
`clip/model.py:191-262`): `n_ctx` language tokens at the input (from "a photo of a") and a fresh set in each layer
up to `prompt_depth`, and `vision_ctx` visual tokens appended to the patch sequence and replaced layer by layer the
same way, every one a free parameter drawn from N(0, 0.02). Three self-regulating terms join the cross-entropy
(`trainers/promptsrc.py:297-313`):

- text: `text_weight * L1(w, w_clip)`, the learned class text features against the frozen model's features of the
  hand-written templates averaged (textual diversity);
- image: `image_weight * L1(f, f_clip)`, the prompted image features against the frozen image tower's, same images;
- logits: KL(frozen logits || prompted logits), summed and divided by batch x classes.

After every epoch the prompts join a Gaussian-weighted average over epochs (GPA, `:320-335`): epoch `e` weighs
N(e; gpa_mean, gpa_std), the weights normalised over the epochs run; the average is the result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from cliptune.core.options import option
from cliptune.methods.coop import dassl_schedule
from cliptune.methods.maple import MaPLe, MaPLeConfig
from cliptune.models.zeroshot import zeroshot_weights


@dataclass
class PromptSRCConfig(MaPLeConfig):
    # configs/trainers/PromptSRC/vit_b16_c2_ep50_batch4_4+4ctx_few_shot.yaml:33-44 (the few-shot configuration)
    n_ctx: int = option(4, "learned language tokens per prompted layer", min=1)
    vision_ctx: int = option(4, "learned visual tokens per prompted layer", min=1)
    text_weight: float = option(25.0, "weight of the L1 distance of the class text features to the frozen model's",
                                min=0, flag="--src-text-weight")
    image_weight: float = option(10.0, "weight of the L1 distance of the image features to the frozen model's",
                                 min=0, flag="--src-image-weight")
    gpa_mean: float = option(30.0, "epoch the Gaussian prompt aggregation centres on (1-based)")
    gpa_std: float = option(30.0, "spread of the Gaussian prompt aggregation, in epochs", min=1e-6)


def self_regulating_terms(logits, text, text_clip, image, image_clip, clip_logits, text_weight, image_weight):
    """PromptSRC's three terms (trainers/promptsrc.py:300-312), all features unit-norm."""
    text_term = F.l1_loss(text, text_clip) * text_weight
    image_term = F.l1_loss(image, image_clip) * image_weight
    logit_term = F.kl_div(F.log_softmax(logits, dim=1), F.log_softmax(clip_logits, dim=1), reduction="sum",
                          log_target=True) / logits.numel()
    return text_term + image_term + logit_term


def gaussian_log_weight(epoch: int, mean: float, std: float) -> float:
    """log N(epoch; mean, std): GPA's weight of an epoch, in logs so far-off epochs do not underflow to 0."""
    return -0.5 * ((epoch - mean) / std) ** 2 - math.log(std * math.sqrt(2 * math.pi))


class GaussianPromptAggregation(nn.Module):
    """The running Gaussian-weighted mean of the prompts over epochs. Buffers, so a checkpoint holds it (a resumed
    run continues the same average)."""

    # buffers (registered in __init__/prepare; declared for type checkers)
    log_total: torch.Tensor

    def __init__(self, parameters: Dict[str, nn.Parameter]):
        super().__init__()
        self.names = {name: name.replace(".", "_") for name in parameters}
        self.register_buffer("log_total", torch.tensor(float("-inf"), dtype=torch.float64))
        for name, parameter in parameters.items():
            self.register_buffer(self.names[name], parameter.detach().clone())

    def add(self, parameters: Mapping[str, torch.Tensor], log_weight: float) -> None:
        """mean += w / (total + w) * (value - mean): the normalised weighted mean of every epoch added so far."""
        total = torch.logaddexp(self.log_total, torch.tensor(log_weight, dtype=torch.float64))
        share = float(torch.exp(log_weight - total))
        self.log_total.copy_(total)
        with torch.no_grad():
            for name, value in parameters.items():
                mean = getattr(self, self.names[name])
                mean.add_(share * (value.detach() - mean))

    def averaged(self) -> Optional[Dict[str, torch.Tensor]]:
        """The aggregated prompts by parameter name, or None before the first epoch."""
        if not torch.isfinite(self.log_total):
            return None
        return {name: getattr(self, buffer).clone() for name, buffer in self.names.items()}


class PromptSRC(MaPLe):
    # buffers (registered in __init__/prepare; declared for type checkers)
    handcrafted: torch.Tensor
    name = "promptsrc"
    config_class = PromptSRCConfig
    config: PromptSRCConfig
    trains = "deep language and vision prompts, kept near the frozen model's features and logits, averaged over epochs"
    paper = "PromptSRC (Khattak et al., ICCV'23)"
    differs = ("the hand-crafted text features average the run's templates (unit-norm each), where PromptSRC averages "
               "the unnormalised features of 60 ImageNet templates (trainers/promptsrc.py:119-128); one prompt depth for "
               "both towers (the original has two settings, both 9); GPA weights are normalised over the epochs run "
               "(the original normalises over the configured epochs and runs them all)")

    @classmethod
    def training_defaults(cls, shots):
        # vit_b16_c2_ep50_batch4_4+4ctx_few_shot.yaml:4,17-23 (scripts/promptsrc/few_shot.sh:8, every shot count):
        # SGD 0.0025, batch 4, 50 epochs; the image tower runs with prompts, so every step re-augments (no view bank)
        return dassl_schedule(0.0025, 4, 50, view_bank=False)

    @classmethod
    def search_space(cls, shots):
        return {**super().search_space(shots), "promptsrc.text_weight": ("log", 2.5, 250.0),
                "promptsrc.image_weight": ("log", 1.0, 100.0)}

    def __init__(self, model, classnames, templates, config: PromptSRCConfig, descriptions=None):
        super().__init__(model, classnames, templates, config, descriptions)
        self.register_buffer("handcrafted", zeroshot_weights(model.text, self.classnames, self.templates), persistent=False)
        self.gpa = GaussianPromptAggregation(self._prompt_parameters())
        self._regulariser: Optional[torch.Tensor] = None

    def init_vision_prompts(self, text_width: int, image_width: int, device) -> None:
        """Independent visual prompts (clip/model.py:371-379 at the input, :213-221 per deeper layer), N(0, 0.02)."""
        shape = (self.config.vision_ctx, image_width)
        self.vision = nn.ParameterList([nn.Parameter(torch.randn(shape, device=device) * 0.02) for _ in range(self.depth)])

    def vision_prompts(self) -> List[torch.Tensor]:
        return list(self.vision)

    def _prompt_parameters(self) -> Dict[str, nn.Parameter]:
        return {name: p for name, p in self.named_parameters() if p.requires_grad}

    def set_classes(self, classnames) -> None:
        super().set_classes(classnames)
        self.handcrafted = zeroshot_weights(self.model.text, self.classnames, self.templates).to(self.handcrafted.device)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        text = self.text_features()
        image = self.image_features(images).to(text.dtype)
        logits = self.scale * image @ text.T
        self._regulariser = None
        if self.training:
            with torch.no_grad():
                image_clip = self.model.image.encode(images, normalize=True).to(text.dtype)
                handcrafted = self.handcrafted.to(text.dtype)
                clip_logits = self.scale * image_clip @ handcrafted.T
            self._regulariser = self_regulating_terms(logits, text, handcrafted, image, image_clip, clip_logits,
                                                      self.config.text_weight, self.config.image_weight)
        return logits

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        loss = super().loss(logits, labels, label_smoothing)
        return loss if self._regulariser is None else loss + self._regulariser

    def after_epoch(self, epoch: int) -> None:
        self.gpa.add(self._prompt_parameters(), gaussian_log_weight(epoch, self.config.gpa_mean, self.config.gpa_std))

    def final_state(self, val=None):
        """The Gaussian-weighted prompts (`trainers/promptsrc.py:332-335`) replace the last epoch's."""
        averaged = self.gpa.averaged()
        return None if averaged is None else {**self.learned_state_dict(), **averaged}
