"""Classification metrics from logits: top-1/top-5, per-class top-1, ECE (15 bins) and NLL."""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F


def calibration_bins(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> List[Tuple[float, float, float, float]]:
    """Per equal-width confidence bin (lower, upper]: (lower, share of samples, mean confidence, accuracy).

    Empty bins are left out. The reliability diagram of a run's report plots these.
    """
    confidence, predicted = probs.max(dim=1)
    correct = predicted.eq(labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    rows = []
    for lower, upper in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > lower) & (confidence <= upper)
        if in_bin.any():
            rows.append((lower, in_bin.float().mean(), confidence[in_bin].mean(), correct[in_bin].mean()))
    return rows


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """ECE with equal-width confidence bins (Guo et al., 2017)."""
    ece = torch.zeros(())
    for _, share, confidence, accuracy in calibration_bins(probs, labels, bins):
        ece += share * (confidence - accuracy).abs()
    return float(ece)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, classes: Sequence[str]) -> Dict:
    """Accuracies as fractions in [0, 1]; top-5 becomes top-k with k = min(5, number of classes)."""
    logits = logits.float().cpu()
    labels = labels.cpu()
    k = min(5, logits.shape[1])
    topk = logits.topk(k, dim=1).indices
    top1 = topk[:, 0].eq(labels)
    top5 = topk.eq(labels[:, None]).any(dim=1)
    per_class = {}
    for index, name in enumerate(classes):
        mask = labels.eq(index)
        if mask.any():
            per_class[name] = float(top1[mask].float().mean())
    probs = logits.softmax(dim=1)
    return {
        "top1": float(top1.float().mean()),
        "top5": float(top5.float().mean()),
        "n": int(labels.numel()),
        "per_class": per_class,
        "ece": expected_calibration_error(probs, labels),
        "nll": float(F.cross_entropy(logits, labels)),
    }


def summary(metrics: Dict) -> Dict:
    """The headline numbers of a metrics block (no per-class table)."""
    return {k: metrics[k] for k in ("top1", "top5", "n") if k in metrics}
