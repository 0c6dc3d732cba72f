"""Losses of full fine-tuning beyond plain cross-entropy: FLYP's contrastive loss and soft targets.

Both are written as cross-entropy against a target distribution, so `--label-smoothing` applies to
them the same way it applies to CE (PyTorch's `cross_entropy` smooths probability targets too).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def contrastive_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    labels: torch.Tensor,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Symmetric CLIP loss between images and their captions (FLYP, Goyal et al., CVPR 2023).

    Image i and caption j are a positive pair when their classes match, so two images of one class
    in a batch are not pushed apart as false negatives: each row's target spreads evenly over its
    positives. With unique classes this is exactly open_clip's `ClipLoss`.
    """
    logits_per_image = logit_scale * image_features @ text_features.T
    logits_per_text = logit_scale * text_features @ image_features.T
    positives = labels[:, None].eq(labels[None, :]).float()
    targets = positives / positives.sum(dim=1, keepdim=True)  # symmetric: the same for both directions
    image_loss = F.cross_entropy(logits_per_image.float(), targets, label_smoothing=label_smoothing)
    text_loss = F.cross_entropy(logits_per_text.float(), targets, label_smoothing=label_smoothing)
    return (image_loss + text_loss) / 2


def class_similarity(class_features: torch.Tensor, tau: float) -> torch.Tensor:
    """(C, C) row-stochastic `softmax(sim(t_y, t_c) / tau)` over classes c, from unit-norm text features."""
    return (class_features @ class_features.T / tau).softmax(dim=1)


def soft_targets(labels: torch.Tensor, similarity: torch.Tensor, epsilon: float) -> torch.Tensor:
    """`(1 - epsilon) * onehot(y) + epsilon * similarity[y]`: mass moves to classes described alike."""
    onehot = F.one_hot(labels, similarity.shape[0]).to(similarity.dtype)
    return (1 - epsilon) * onehot + epsilon * similarity[labels]


def soft_target_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    similarity: torch.Tensor,
    epsilon: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy against `soft_targets` (SCOLD-style contextual targets).

    Cross-entropy (label smoothing included) is linear in the target, so this is computed as
    `(1 - epsilon) * CE(hard) + epsilon * CE(similarity[y])`: epsilon 0 is then exactly plain CE.
    """
    logits = logits.float()
    hard = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    soft = F.cross_entropy(logits, similarity.float()[labels], label_smoothing=label_smoothing)
    return (1 - epsilon) * hard + epsilon * soft
