"""Metrics of imbalanced and clinical data, checked against values worked out by hand."""

import pytest
import torch

from cliptune.core.metrics import classification_metrics


def _logits(predicted, classes=3):
    return torch.nn.functional.one_hot(torch.tensor(predicted), classes).float() * 4


def test_balanced_accuracy_macro_f1_precision_recall_and_confusion_by_hand():
    labels = torch.tensor([0, 0, 0, 1, 2, 2])
    m = classification_metrics(_logits([0, 0, 1, 1, 2, 0]), labels, ["a", "b", "c"])
    assert m["top1"] == pytest.approx(4 / 6)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 + 1 / 2) / 3)  # the mean of the per-class recalls
    assert m["per_class_recall"] == pytest.approx({"a": 2 / 3, "b": 1.0, "c": 0.5})
    assert m["per_class_precision"] == pytest.approx({"a": 2 / 3, "b": 0.5, "c": 1.0})
    assert m["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 2 / 3) / 3)
    assert m["confusion"] == [[2, 1, 0], [0, 1, 0], [1, 0, 1]]


def test_auroc_is_one_vs_rest_over_the_classes_that_have_positives_and_negatives():
    labels = torch.tensor([0, 0, 1, 1])
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.6, 0.4, 0.0], [0.3, 0.7, 0.0], [0.55, 0.45, 0.0]]).log()
    m = classification_metrics(scores, labels, ["a", "b", "c"])  # "c" has no positive: left out
    # class a: positives 0.9, 0.6 against negatives 0.3, 0.55 -> 4/4; class b: 0.7, 0.45 against 0.1, 0.4 -> 4/4
    assert m["auroc"] == pytest.approx(1.0)
    swapped = classification_metrics(scores, torch.tensor([0, 1, 0, 1]), ["a", "b", "c"])
    # class a: positives 0.9, 0.3 against 0.6, 0.55 -> 2/4; class b: 0.4, 0.45 against 0.1, 0.7 -> 2/4
    assert swapped["auroc"] == pytest.approx(0.5)
    assert classification_metrics(scores[:2], torch.tensor([0, 0]), ["a", "b", "c"])["auroc"] is None
    # a class missing from the split does not count in the balanced accuracy or macro-F1 (over the classes present)
    assert m["balanced_accuracy"] == pytest.approx(0.75) and "c" not in m["per_class_recall"]


def test_metric_chooses_the_best_val_epoch_and_the_guards_comparison(colour_data, tiny_config, tmp_path):
    from cliptune.commands import api
    from cliptune.config.run import build_config

    config = build_config(None, {"data": str(colour_data), "model_config": tiny_config, "method": "coop", "epochs": 4,
                                 "lr": 0.05, "select": "best-val", "metric": "macro_f1", "eval_every": 1})
    metrics = api.finetune(config, tmp_path / "run")
    history = metrics["train"]["history"]
    scores = [record["val_macro_f1"] for record in history]
    assert all("val_top1" in record for record in history)
    assert metrics["train"]["best_epoch"] == 1 + scores.index(max(scores))  # the first epoch with the best macro-F1
    guard = metrics["guard"]
    assert guard["val"] == pytest.approx(metrics["val"]["macro_f1"]) and guard["zeroshot_val"] == pytest.approx(
        metrics["zeroshot_val"]["macro_f1"])


def test_retrieval_recall_counts_pairs_whose_own_match_ranks_within_k():
    from cliptune.core.metrics import retrieval_recall

    # image 0's own text is its best match; image 1 prefers text 0 then its own; image 2 ranks its own text last
    similarity = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.5, 0.1], [0.7, 0.6, 0.2]])
    images, texts = torch.eye(3), similarity.T.contiguous()  # images @ texts.T == similarity
    recalls = retrieval_recall(images, texts, ks=(1, 2))
    assert recalls["i2t_r1"] == pytest.approx(1 / 3) and recalls["i2t_r2"] == pytest.approx(2 / 3)
    # text 0's best image is image 0; text 1 ranks image 2 (0.6) above image 1 (0.5); text 2 finds image 2 first
    assert recalls["t2i_r1"] == pytest.approx(2 / 3) and recalls["t2i_r2"] == pytest.approx(1.0)
