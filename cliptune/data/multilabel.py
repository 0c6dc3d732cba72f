"""Multi-label datasets: each image has a set of labels (a manifest's `labels` column, `a|b|c`).

The classes are the labels seen in train. Splits missing from the data are carved out of train by a seeded shuffle
of its images (one image carries several classes, so a per-class stratified carve as for single-label data does not
exist); few-shot sampling keeps, for each class in turn, up to K images that carry it (the union over the classes,
so a class also appears in images sampled for another). `Split.targets` holds each image's label set as a
distribution (each of its k labels 1/k): every method's cross-entropy then trains multi-label (the softmax loss of
Mahajan et al., ECCV'18, "Exploring the Limits of Weakly Supervised Pretraining"), and metrics read the set as the
non-zero entries. `Split.labels` holds each image's first label.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from cliptune.core.errors import CliptuneError
from cliptune.data.folders import SPLIT_NAMES, ImageFolderData, Split, class_names

log = logging.getLogger("cliptune")

Rows = List[Tuple[Path, Tuple[str, ...]]]  # (image, its labels) in the data's order


def _carve(rows: Rows, fraction: float, rng: random.Random) -> Tuple[Rows, Rows]:
    """(kept, carved): round(len * fraction) rows (at least one when fraction > 0 and two or more rows)."""
    if fraction <= 0 or len(rows) < 2:
        return rows, []
    order = list(range(len(rows)))
    rng.shuffle(order)
    n = min(len(rows) - 1, max(1, round(len(rows) * fraction)))
    carved = set(order[:n])
    return [r for i, r in enumerate(rows) if i not in carved], [r for i, r in enumerate(rows) if i in carved]


def _few_shot(rows: Rows, classes: Sequence[str], shots: int, seed: str, flag: str) -> Rows:
    """Up to `shots` images per class (seeded), the union over the classes, in the data's order."""
    if shots < 1:
        raise CliptuneError(f"{flag} must be at least 1 (got {shots})")
    rng = random.Random(seed)
    chosen = set()
    for cls in classes:
        carrying = [i for i, (_, labels) in enumerate(rows) if cls in labels]
        chosen.update(carrying if len(carrying) <= shots else rng.sample(carrying, shots))
    return [row for i, row in enumerate(rows) if i in chosen]


def _split(rows: Rows, index: Dict[str, int]) -> Split:
    rows = sorted(rows)
    targets = torch.zeros(len(rows), len(index))
    for i, (_, labels) in enumerate(rows):
        targets[i, [index[label] for label in labels]] = 1.0 / len(labels)
    return Split(files=[file for file, _ in rows], labels=[index[labels[0]] for _, labels in rows], targets=targets)


def assemble_multilabel(root: Path, per_split: Dict[str, Rows], skipped: int, val_fraction: float, test_fraction: float,
                        seed: int, shots: Optional[int], classnames_file: Optional[str], val_shots: Optional[int],
                        captions: Optional[Dict[Path, str]] = None) -> ImageFolderData:
    """The multi-label dataset of `{split: [(image, labels)]}`: missing splits carved, few-shot sampling, class names."""
    train = per_split.get("train", [])
    classes = sorted({label for _, labels in train for label in labels})
    if len(classes) < 2:
        raise CliptuneError(f"{root} has {len(classes)} label(s) with training images; need at least 2")
    for name, rows in per_split.items():
        unseen = sorted({label for _, labels in rows for label in labels} - set(classes))
        if unseen:
            raise CliptuneError(f"{root}: label '{unseen[0]}' appears in {name} but has no training image")
    rng = random.Random(seed)
    if "test" not in per_split:
        train, per_split["test"] = _carve(train, test_fraction, rng)
    if "val" not in per_split:
        train, per_split["val"] = _carve(train, val_fraction, rng)
    per_split["train"] = train
    if shots is not None:
        per_split["train"] = _few_shot(per_split["train"], classes, shots, f"shots-{seed}", "--shots")
    if val_shots is not None:
        per_split["val"] = _few_shot(per_split["val"], classes, val_shots, f"val-shots-{seed}", "--val-shots")
    if skipped:
        log.warning("skipped %d file(s) that are not readable images (use --strict to make this an error)", skipped)
    index = {label: i for i, label in enumerate(classes)}
    splits = {name: _split(per_split.get(name, []), index) for name in SPLIT_NAMES}
    names, descriptions = class_names(root, classnames_file, classes)
    return ImageFolderData(root, classes, names, descriptions, splits, skipped, captions or {})
