"""Classification metrics from logits: top-1/top-5, per-class top-1, ECE (15 bins) and NLL, and the metrics of
imbalanced and clinical data (balanced accuracy, macro-F1, per-class precision/recall, one-vs-rest AUROC,
confusion matrix) through scikit-learn; for multi-label data (2-D targets) mAP, per-class AP and AUROC, and macro /
micro-F1 at per-class thresholds."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from sklearn.metrics import (average_precision_score, confusion_matrix, f1_score, precision_recall_curve,
                             precision_recall_fscore_support, recall_score, roc_auc_score)


def calibration_bins(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
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
    """The value `--metric name` ranks by: the metric, else the split's headline (top-1; mAP for multi-label data)
    where it is undefined (AUROC on a one-class split, top-1 of multi-label data)."""
    value = metrics.get(name)
    return float(headline(metrics)[1] if value is None else value)


def headline(metrics: Dict) -> Tuple[str, float]:
    """("top1", top-1) of a single-label split's metrics, ("map", mAP) of a multi-label one."""
    return ("top1", metrics["top1"]) if "top1" in metrics else ("map", metrics["map"])


def fit_thresholds(scores: torch.Tensor, targets: torch.Tensor) -> List[float]:
    """Per class, the score above which it is predicted: the one with the best F1 on these images (the midpoint to the
    next lower score, so that it generalises); 0.5 for a class with no positive here."""
    thresholds = []
    for c in range(scores.shape[1]):
        y, s = targets[:, c].numpy(), scores[:, c].double().numpy()
        if not y.any():
            thresholds.append(0.5)
            continue
        precision, recall, cut = precision_recall_curve(y, s)
        f1 = 2 * precision[:-1] * recall[:-1] / (precision[:-1] + recall[:-1]).clip(min=1e-12)
        best = float(cut[int(f1.argmax())])
        below = s[s < best]
        thresholds.append((best + float(below.max())) / 2 if below.size else best)
    return thresholds


SCORINGS = ("softmax", "sigmoid")


def label_scores(logits: torch.Tensor, scoring: str = "softmax") -> torch.Tensor:
    """Multi-label probabilities: the softmax over classes (the training objective: cross-entropy against the image's
    label set, each label an equal share), or each logit's sigmoid (zero-shot prompt pairs)."""
    return logits.float().sigmoid() if scoring == "sigmoid" else logits.float().softmax(dim=1)


def average_precisions(scores: torch.Tensor, targets: torch.Tensor) -> List[float]:
    """scikit-learn's average precision of each class with a positive among these images."""
    values, truth = scores.double().numpy(), (targets > 0).numpy()
    return [float(average_precision_score(truth[:, c], values[:, c])) for c in range(truth.shape[1]) if truth[:, c].any()]


def multilabel_metrics(logits: torch.Tensor, targets: torch.Tensor, classes: Sequence[str],
                       thresholds: Optional[Sequence[float]] = None, scoring: str = "softmax") -> Dict:
    """mAP (mean over the classes with a positive here of scikit-learn's average precision), per-class AP and AUROC,
    and macro / micro-F1 of the labels predicted above per-class `thresholds` (None: fitted on these images, an
    optimistic figure for the split thresholds are chosen on), all on `label_scores(logits, scoring)`."""
    scores = label_scores(logits, scoring)
    truth = (targets > 0).numpy()
    fitted = thresholds is None
    cut = fit_thresholds(scores, targets > 0) if thresholds is None else list(thresholds)
    predicted = (scores.numpy() >= torch.tensor(cut).numpy()[None, :])
    with_positives = [c for c in range(len(classes)) if truth[:, c].any()]
    ap = dict(zip((classes[c] for c in with_positives), average_precisions(scores, targets)))
    auroc = {classes[c]: float(roc_auc_score(truth[:, c], scores[:, c].numpy())) for c in with_positives if not truth[:, c].all()}
    return {
        "map": float(sum(ap.values()) / len(ap)) if ap else 0.0,
        "macro_f1": float(f1_score(truth, predicted, labels=with_positives, average="macro", zero_division=0)),
        "micro_f1": float(f1_score(truth, predicted, average="micro", zero_division=0)),
        "auroc": float(sum(auroc.values()) / len(auroc)) if auroc else None,
        "n": int(len(truth)),
        "per_class_ap": ap,
        "per_class_auroc": auroc,
        "thresholds": {name: float(t) for name, t in zip(classes, cut)},
        "thresholds_from": "this split" if fitted else "val",
        "scores": scoring,
    }


def retrieval_recall(image_features: torch.Tensor, text_features: torch.Tensor, ks: Sequence[int] = (1, 5)) -> Dict[str, float]:
    """Recall@k of image i finding its own text i among all the texts (`i2t_rK`) and of text i finding image i
    (`t2i_rK`), from unit-norm features: the share of pairs with fewer than k others scored above their own."""
    similarity = image_features.float() @ text_features.float().T
    own = similarity.diagonal()
    above_for_image = (similarity > own[:, None]).sum(dim=1)
    above_for_text = (similarity > own[None, :]).sum(dim=0)
    recalls = {}
    for k in ks:
        recalls[f"i2t_r{k}"] = float((above_for_image < k).float().mean())
        recalls[f"t2i_r{k}"] = float((above_for_text < k).float().mean())
    return recalls


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


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, classes: Sequence[str], imbalance: bool = True,
                           thresholds: Optional[Sequence[float]] = None, scoring: str = "softmax") -> Dict:
    """Accuracies as fractions in [0, 1]; top-5 becomes top-k with k = min(5, number of classes). `imbalance=False`
    leaves out `imbalance_metrics` (scikit-learn's input checks cost milliseconds: per-epoch validation skips them).
    2-D `labels` (multi-label targets) get `multilabel_metrics` at `thresholds`, on `scoring`'s probabilities."""
    logits = logits.float().cpu()
    labels = labels.cpu()
    if labels.dim() == 2:
        return multilabel_metrics(logits, labels, classes, thresholds, scoring)
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
        "n": int(labels.shape[0]),
        "per_class": per_class,
        "ece": expected_calibration_error(probs, labels),
        "nll": float(F.cross_entropy(logits, labels)),
        **(imbalance_metrics(probs, labels, classes) if imbalance else {}),
    }
