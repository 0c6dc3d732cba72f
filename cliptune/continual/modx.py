"""Mod-X (Ni et al., "Continual Vision-Language Representation Learning with Off-Diagonal Information", ICML'23), as
ZixuanNi/Mod-X `ModX_Training/continue_train_model.py` computes it: the current model keeps the previous model's
whole image-text similarity distribution on the training batch, off-diagonal entries included.

On a batch of B pairs, the B x B cosine matrices of the current and the previous model (no logit scale, no
temperature, `:309-313`); each row of the previous model's whose best match is not its own pair is screened out
(replaced by the current model's row, so its KL is zero: `cognition_align`, `:225-233`); then
KL(softmax(previous row) || softmax(current row)) summed over rows (`reduction='sum'`), image->text and text->image,
averaged, times `modx_alpha` (20, `modx_5phase.sh:8`), is added to the task's loss (`:329-340`).

The original trains on image-caption pairs. cliptune's tasks are labelled images, so the text of each pair is its
class's prompt (the run's templates averaged, the zero-shot head), and "its own pair" means any image or text of
the same class: with unique captions this is the original's test. For this term the current model encodes the batch's
images and the class prompts once more per step (with gradients), beside the task loss's own pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cliptune.continual.base import Strategy
from cliptune.models.zeroshot import zeroshot_weights


def screened_kl(current: torch.Tensor, previous: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """sum over rows of KL(softmax(previous) || softmax(current)), rows whose previous best match has another label
    replaced by the current row (a zero term)."""
    wrong = labels[previous.argmax(dim=1)] != labels
    previous = torch.where(wrong[:, None], current.detach(), previous)
    return F.kl_div(F.log_softmax(current, dim=-1), F.softmax(previous, dim=-1), reduction="sum")


def offdiagonal_distillation(images, texts, previous_images, previous_texts, labels) -> torch.Tensor:
    """Mod-X's term on B pairs (row i: image i and the text of its pair), features unit-norm:
    (KL of the image->text rows + KL of the text->image rows) / 2."""
    current, previous = images @ texts.T, previous_images @ previous_texts.T
    return (screened_kl(current, previous, labels) + screened_kl(current.T, previous.T, labels)) / 2


class ModX(Strategy):
    name = "modx"
    summary = "keep the previous model's whole image-text similarity distribution on each batch (Mod-X)"

    def start_task(self, method, teacher, data, templates) -> None:
        self.previous = teacher
        self.previous_texts = zeroshot_weights(teacher.text, data.classnames, templates)

    def regulariser(self, method, inputs, labels):
        if not len(labels):
            return None
        given = method.uses_image_features  # a frozen image tower: the inputs are its (shared) features
        images = F.normalize(inputs if given else method.image_features(inputs), dim=-1)
        texts = method.class_features()[labels]
        with torch.no_grad():
            previous = inputs if given else self.previous.image.encode(inputs, normalize=False)
            previous = F.normalize(previous, dim=-1).to(images.dtype)
        previous_texts = self.previous_texts[labels].to(images.dtype)
        return self.config.modx_alpha * offdiagonal_distillation(images, texts.to(images.dtype), previous, previous_texts, labels)
