"""Mod-X (Ni et al., "Continual Vision-Language Representation Learning with Off-Diagonal Information", ICML'23), as
ZixuanNi/Mod-X `ModX_Training/continue_train_model.py` computes it: the current model keeps the previous model's
whole image-text similarity distribution on the training batch, off-diagonal entries included.

On a batch of B pairs, the B x B cosine matrices of the current and the previous model (no logit scale, no
temperature, `:309-313`); each row of the previous model's whose best match is not its own pair is screened out
(replaced by the current model's row, so its KL is zero: `cognition_align`, `:225-233`); then
KL(softmax(previous row) || softmax(current row)) summed over rows (`reduction='sum'`), image->text and text->image,
averaged, times `modx_alpha` (20, `modx_5phase.sh:8`), is added to the task's loss (`:329-340`).

The original trains on image-caption pairs: an image that has a caption (a manifest's caption column, a `.txt`
sidecar or shard member) is paired with it, as there, and "its own pair" is that caption. An image without one is
paired with its class's prompt (the run's templates averaged, the zero-shot head), and "its own pair" then means any
image or text of the same class: with unique captions this is the original's test. For this term the current model
encodes the batch's images and texts once more per step (with gradients), beside the task loss's own pass; the
previous model's caption features are encoded once per task.
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
        captions = [data.captions.get(file) for file in data.split("train").files]
        texts = sorted({caption for caption in captions if caption})
        self.reads_sample_ids = bool(texts)
        if texts:  # each training image's caption row (-1: none), the tokens, and the previous model's features
            row = {caption: i for i, caption in enumerate(texts)}
            self.caption_index = torch.tensor([row[caption] if caption else -1 for caption in captions])
            self.caption_tokens = method.model.text.tokenize(texts)
            with torch.no_grad():
                self.previous_captions = torch.cat([teacher.text.encode(chunk, normalize=True)
                                                    for chunk in self.caption_tokens.split(256)])

    def regulariser(self, method, inputs, labels, sample_ids=None):
        if not len(labels):
            return None
        given = method.uses_image_features  # a frozen image tower: the inputs are its (shared) features
        images = F.normalize(inputs if given else method.image_features(inputs), dim=-1)
        texts, previous_texts, pairs = method.class_features()[labels], self.previous_texts[labels], labels
        if self.reads_sample_ids and sample_ids is not None:
            texts, previous_texts, pairs = self._own_captions(method, texts, previous_texts, labels, sample_ids)
        with torch.no_grad():
            previous = inputs if given else self.previous.image.encode(inputs, normalize=False)
            previous = F.normalize(previous, dim=-1).to(images.dtype)
        return self.config.modx_alpha * offdiagonal_distillation(images, texts.to(images.dtype), previous,
                                                                 previous_texts.to(images.dtype), pairs)

    def _own_captions(self, method, texts, previous_texts, labels, sample_ids) -> tuple:
        """The batch's texts with each captioned image's own caption (current and previous model), and each pair's
        identity for the screening: its caption's row, or its class (as -1 - class) where it has no caption."""
        own = self.caption_index.to(labels.device)[sample_ids]
        has = (own >= 0).nonzero().flatten()
        if not len(has):
            return texts, previous_texts, labels
        encoded = method.model.text.encode(self.caption_tokens.to(labels.device)[own[has]], normalize=True)
        texts = texts.index_put((has,), encoded.to(texts.dtype))
        previous_texts = previous_texts.index_put((has,), self.previous_captions.to(labels.device)[own[has]].to(previous_texts.dtype))
        return texts, previous_texts, torch.where(own >= 0, own, -1 - labels)
