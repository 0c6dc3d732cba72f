"""BiomedCoOp (Koleilat et al., "BiomedCoOp: Learning to Prompt for Biomedical Vision-Language Models", CVPR'25):
CoOp kept consistent with descriptions of each class written by a language model.

Each class comes with several descriptions (`classnames.yaml`'s `descriptions`, e.g. "blunting of the costophrenic
angle" for effusion; a class without any uses the run's templates). Their frozen text features give two teachers,
as HealthX-Lab/BiomedCoOp `trainers/BiomedCoOp/biomedcoop_biomedclip.py` computes them:

- SCCM (`sccm_weight`): the mean squared difference between the learned prompts' unit-norm class features and the
  normalised mean of all the class's description features (:227-235);
- KDSP (`kdsp_weight`): KL(teacher || student) of the logits, summed and divided by batch x classes (:237-243),
  where the teacher's class features average only the descriptions that are not outliers on this batch: each
  description index i is scored by the batch mean of the best class logit against the i-th descriptions, and
  indices whose z-score exceeds `tau` are dropped (:206-225; the original's median/MAD step followed by a
  standardisation is this plain z-score).

Evaluation uses the learned prompts only, as CoOp does. Everything else is CoOp (`cliptune/methods/coop.py`) with 4
context vectors initialised from "a photo of a".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from cliptune.core.options import option
from cliptune.methods.coop import DASSL_DIFFERENCE, CoOp, PhotoContextConfig, dassl_schedule
from cliptune.models.zeroshot import class_prompts, encode_prompt_grid


@dataclass
class BiomedCoOpConfig(PhotoContextConfig):
    # scripts/biomedcoop/few_shot.sh:8-10 (N_CTX 4, CSC False, end), configs/trainers/BiomedCoOp/few_shot/*.yaml:33
    # (CTX_INIT "a photo of a"); train.py:126-129 (each dataset's config sets its own, e.g. btmri 0.5 / 0.25 / 1.5)
    sccm_weight: float = option(1.0, "weight of the squared distance to the mean description features (SCCM)", min=0,
                                flag="--sccm-weight")
    kdsp_weight: float = option(1.0, "weight of the KL to the teacher of the selected descriptions (KDSP)", min=0,
                                flag="--kdsp-weight")
    tau: float = option(1.5, "descriptions whose batch score has a z-score beyond this are left out of the KDSP teacher",
                        above=0, flag="--biomedcoop-tau")
    max_descriptions: int = option(50, "descriptions used per class (the first ones; every class uses the same number)",
                                   min=1, flag="--max-descriptions")


def selected_descriptions(image: torch.Tensor, descriptions: torch.Tensor, scale: torch.Tensor, tau: float) -> torch.Tensor:
    """(classes, dim) teacher: the normalised mean over the description indices whose score (the batch mean of the
    best class logit against those descriptions) is within `tau` standard deviations of the mean score; all of them
    when the scores do not vary."""
    scores = (scale * torch.einsum("bd,cnd->bnc", image, descriptions)).amax(dim=2).mean(dim=0)  # (descriptions,)
    keep = ((scores - scores.mean()) / scores.std()).abs() <= tau
    chosen = descriptions[:, keep] if bool(keep.any()) else descriptions
    return F.normalize(chosen.mean(dim=1), dim=-1)


def kdsp_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of the class distributions, summed and divided by batch x classes (as the original)."""
    return F.kl_div(F.log_softmax(student_logits, dim=1), F.log_softmax(teacher_logits, dim=1), reduction="sum",
                    log_target=True) / student_logits.numel()


class BiomedCoOp(CoOp):
    # buffers (registered in __init__/prepare; declared for type checkers)
    description_features: torch.Tensor
    name = "biomedcoop"
    config_class = BiomedCoOpConfig
    config: BiomedCoOpConfig
    trains = "context vectors of the class prompts, kept consistent with per-class descriptions (classnames.yaml)"
    paper = "BiomedCoOp (Koleilat et al., CVPR'25)"
    differs = ("descriptions come from classnames.yaml (a class without any uses the templates; every class uses as "
               "many as the class with the fewest), where the original ships 50 GPT-4 sentences per class; "
               + DASSL_DIFFERENCE)

    @classmethod
    def training_defaults(cls, shots):
        # configs/trainers/BiomedCoOp/few_shot/*.yaml:1-29: SGD lr 0.0025, batch 4, 100 epochs, one constant warm-up
        # epoch at 1e-5, cosine stepped per epoch, random resized crop without a flip; the last epoch evaluated
        return {**dassl_schedule(0.0025, 4, 100), "aug_hflip": False}

    @classmethod
    def search_space(cls, shots):
        return {**super().search_space(shots), "biomedcoop.sccm_weight": ("log", 0.1, 20.0),
                "biomedcoop.kdsp_weight": ("log", 0.1, 20.0)}

    def __init__(self, model, classnames, templates, config: BiomedCoOpConfig, descriptions=None):
        super().__init__(model, classnames, templates, config, descriptions)
        self.register_buffer("description_features", self._description_features(), persistent=False)
        self._for_loss: Optional[tuple] = None

    @torch.no_grad()
    def _description_features(self) -> torch.Tensor:
        """(classes, descriptions, dim) unit-norm features of each class's first descriptions (else its templates)."""
        text = self.model.text
        sentences = [self.descriptions.get(name) or class_prompts(name, self.templates) for name in self.classnames]
        count = min(self.config.max_descriptions, *(len(each) for each in sentences))
        flat = [sentence for each in sentences for sentence in each[:count]]
        return encode_prompt_grid(text, text.tokenize(flat), len(self.classnames), 256)

    def set_classes(self, classnames) -> None:
        super().set_classes(classnames)
        self.description_features = self._description_features().to(self.description_features.device)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        text = self.text_features()
        self._for_loss = (F.normalize(image_features, dim=-1), text) if self.training else None
        return self.logits(image_features, text)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        loss = super().loss(logits, labels, label_smoothing)
        if self._for_loss is None:
            return loss
        (image, learned), self._for_loss = self._for_loss, None
        descriptions = self.description_features.to(logits.dtype)
        consistency = F.mse_loss(learned, F.normalize(descriptions.mean(dim=1), dim=-1))
        with torch.no_grad():
            teacher = self.scale * image.to(logits.dtype) @ selected_descriptions(image, descriptions, self.scale,
                                                                                   self.config.tau).T
        c = self.config
        return loss + c.sccm_weight * consistency + c.kdsp_weight * kdsp_loss(logits, teacher)
