"""Classification metrics from logits: top-1/top-5, per-class top-1, ECE (15 bins) and NLL, and the metrics of
imbalanced and clinical data (balanced accuracy, macro-F1, per-class precision/recall, one-vs-rest AUROC,
confusion matrix) through scikit-learn."""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support, recall_score, roc_auc_score


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


def score(metrics: Dict, name: str) -> float:
    """The value `--metric name` ranks by: the metric, or top-1 where it is undefined (AUROC on a one-class split)."""
    value = metrics.get(name)
    return float(metrics["top1"] if value is None else value)


def imbalance_metrics(probs: torch.Tensor, labels: torch.Tensor, classes: Sequence[str]) -> Dict:
    """Balanced accuracy and macro-F1 over the classes present in `labels`, per-class precision and recall, the
    macro one-vs-rest AUROC over the classes with positives and negatives here (None without any), and the
    confusion matrix (rows: true class, columns: predicted), computed by scikit-learn."""
    y, scores = labels.numpy(), probs.double().numpy()
    predicted = scores.argmax(axis=1)
    present = sorted(set(y.tolist()))
    everyone = list(range(len(classes)))
    precision, recall, _, _ = precision_recall_fscore_support(y, predicted, labels=everyone, zero_division=0)
    aucs = [roc_auc_score(y == c, scores[:, c]) for c in everyone if 0 < int((y == c).sum()) < len(y)]
    return {
        # balanced accuracy is the macro recall over the classes present (sklearn's balanced_accuracy_score)
        "balanced_accuracy": float(recall_score(y, predicted, labels=present, average="macro", zero_division=0)),
        "macro_f1": float(f1_score(y, predicted, labels=present, average="macro", zero_division=0)),
        "auroc": float(sum(aucs) / len(aucs)) if aucs else None,
        "per_class_precision": {classes[c]: float(precision[c]) for c in present},
        "per_class_recall": {classes[c]: float(recall[c]) for c in present},
        "confusion": confusion_matrix(y, predicted, labels=everyone).tolist(),
    }


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, classes: Sequence[str], imbalance: bool = True) -> Dict:
    """Accuracies as fractions in [0, 1]; top-5 becomes top-k with k = min(5, number of classes). `imbalance=False`
    leaves out `imbalance_metrics` (scikit-learn's input checks cost milliseconds: per-epoch validation skips them)."""
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
        **(imbalance_metrics(probs, labels, classes) if imbalance else {}),
    }
