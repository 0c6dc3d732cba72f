"""Losses of full fine-tuning beyond plain cross-entropy: FLYP's contrastive loss and soft targets.

All are written as cross-entropy against a target distribution, so `--label-smoothing` applies to
them the same way it applies to CE (PyTorch's `cross_entropy` smooths probability targets too).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

SAME_CLASS = ("negative", "positive")


def contrastive_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    label_smoothing: float = 0.0,
    same_class: str = "negative",
    targets: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Symmetric CLIP loss between images and their captions (FLYP, Goyal et al., CVPR 2023).

    `same_class="negative"` is FLYP's own loss (locuslab/FLYP `src/models/flyp_loss.py::flyp_loss`
    calls `clip/loss.py::ClipLoss`): targets are `arange(n)`, so an image is pushed away from the
    caption of another image of its own class. `same_class="positive"` (cliptune's earlier default)
    counts every caption of the image's class as a positive, each row's target spread evenly over
    them. `targets` (n, n) overrides both (the soft-contrastive loss): row i is the target of image i
    over the captions and of caption i over the images.
    """
    logits_per_image = logit_scale * image_features @ text_features.T
    logits_per_text = logits_per_image.T
    if targets is None:
        if same_class == "negative":
            targets = torch.eye(len(image_features), device=image_features.device)
        else:
            assert labels is not None, "same_class='positive' needs the labels"
            positives = labels[:, None].eq(labels[None, :]).float()
            targets = positives / positives.sum(dim=1, keepdim=True)
    image_loss = F.cross_entropy(logits_per_image.float(), targets, label_smoothing=label_smoothing)
    text_loss = F.cross_entropy(logits_per_text.float(), targets, label_smoothing=label_smoothing)
    return (image_loss + text_loss) / 2


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every process's `tensor` (rows may differ in number), keeping the gradient.

    As open_clip's `gather_features(..., gather_with_grad=True)` (`torch.distributed.nn.all_gather`),
    whose backward sums each piece's gradient from every process; rows are padded to the longest
    piece first, because the engine's slice of a global batch can be one row shorter on some ranks.
    Without a process group it returns `tensor` itself.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    import torch.distributed.nn

    sizes = [torch.zeros(1, dtype=torch.long, device=tensor.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([len(tensor)], device=tensor.device))
    longest = int(max(sizes))
    padded = F.pad(tensor, (0,) * (2 * tensor.dim() - 1) + (longest - len(tensor),))
    pieces = torch.distributed.nn.all_gather(padded)
    return torch.cat([piece[: int(size)] for piece, size in zip(pieces, sizes)])


def to_others(cosine: torch.Tensor, tau: float) -> torch.Tensor:
    """Row-stochastic `softmax_{j != i}(cosine[i, j] / tau)` with a zero diagonal ((n, n), n >= 2).

    The row's own entry is left out of the softmax: its cosine 1 with itself would otherwise take
    almost all the mass at small tau, and the soft target would spread (almost) nothing.
    """
    logits = (cosine / tau).masked_fill(torch.eye(len(cosine), dtype=torch.bool, device=cosine.device), float("-inf"))
    return logits.softmax(dim=1)


def class_similarity(class_features: torch.Tensor, tau: float) -> torch.Tensor:
    """(C, C): where each class's ε goes, `to_others` of the cosines of unit-norm description features."""
    if len(class_features) < 2:
        return torch.zeros(len(class_features), len(class_features), device=class_features.device)
    return to_others(class_features @ class_features.T, tau)


def soft_targets(labels: torch.Tensor, similarity: torch.Tensor, epsilon: float) -> torch.Tensor:
    """`(1 - epsilon) * onehot(y) + epsilon * similarity[y]`: exactly epsilon goes to the other classes,
    in proportion to how alike their descriptions are to y's (SCOLD-style contextual soft targets)."""
    onehot = F.one_hot(labels, similarity.shape[0]).to(similarity.dtype)
    return (1 - epsilon) * onehot + epsilon * similarity[labels]


def soft_target_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    similarity: torch.Tensor,
    epsilon: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy against `soft_targets`.

    Cross-entropy (label smoothing included) is linear in the target, so this is computed as
    `(1 - epsilon) * CE(hard) + epsilon * CE(similarity[y])`: epsilon 0 is then exactly plain CE.
    """
    logits = logits.float()
    hard = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    if epsilon == 0:
        return hard
    soft = F.cross_entropy(logits, similarity.float()[labels], label_smoothing=label_smoothing)
    return (1 - epsilon) * hard + epsilon * soft


def soft_contrastive_targets(labels: torch.Tensor, class_cosine: torch.Tensor, epsilon: float, tau: float) -> torch.Tensor:
    """(n, n) targets of the soft-contrastive loss: the image's own caption keeps `1 - epsilon`, the
    batch's other captions share `epsilon` by `softmax(cos(t_{y_i}, t_{y_j}) / tau)` over j != i
    (SCOLD's soft targets inside CLIP's loss). The class cosines are symmetric, so row i is also caption
    i's target over the images; a batch of one has no other caption and gets the hard target."""
    n = len(labels)
    eye = torch.eye(n, device=labels.device)
    if n < 2 or epsilon == 0:
        return eye
    return (1 - epsilon) * eye + epsilon * to_others(class_cosine[labels][:, labels], tau)

