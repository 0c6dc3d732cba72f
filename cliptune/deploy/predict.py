"""`cliptune predict`: top-k classes of new images (multi-label runs: every label above its threshold), as a table,
CSV or JSON."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import List, Sequence, Tuple

from cliptune.deploy.classifier import Classifier, image_files, load
from cliptune.core.errors import CliptuneError

FORMATS = ("table", "csv", "json")


def predict_paths(source: str | Path, inputs: Sequence[str], topk: int = 5, batch_size: int = 32,
                  device: str = "cpu") -> Tuple[Classifier, List[Tuple[Path, list]], List[Path]]:
    """Load the classifier once and classify every image named or found under the folders named."""
    if topk < 1 or batch_size < 1:
        raise CliptuneError("--topk and --batch-size must be at least 1")
    files = image_files(inputs)
    if not files:
        raise CliptuneError(f"no image files found in {', '.join(map(str, inputs))}")
    classifier = load(source, device)
    predictions, unreadable = classifier.predict_files(files, topk=topk, batch_size=batch_size)
    if not predictions:
        raise CliptuneError(f"none of the {len(files)} file(s) is a readable image")
    return classifier, predictions, unreadable


def render(classifier: Classifier, predictions: List[Tuple[Path, list]], unreadable: List[Path], fmt: str) -> str:
    """The predictions as `table` (one line per image), `csv` (file,rank,class,name,probability) or `json`."""
    names = dict(zip(classifier.classes, classifier.classnames))
    key = "top" if classifier.thresholds is None else "labels"  # multi-label: the labels above their thresholds
    if fmt == "json":
        return json.dumps({
            "source": classifier.info["source"], "method": classifier.method,
            "predictions": [{"file": str(path), key: [{"class": c, "name": names[c], "probability": p} for c, p in top]}
                            for path, top in predictions],
            "unreadable": [str(path) for path in unreadable],
        }, indent=2) + "\n"
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["file", "rank", "class", "name", "probability"])
        for path, top in predictions:
            for rank, (c, p) in enumerate(top, start=1):
                writer.writerow([str(path), rank, c, names[c], f"{p:.6f}"])
        return buffer.getvalue()
    if fmt != "table":
        raise CliptuneError(f"unknown format '{fmt}' (available: {', '.join(FORMATS)})")
    k = max(len(top) for _, top in predictions)
    rows = [["FILE", *(f"{'TOP' if key == 'top' else 'LABEL'}-{rank}" for rank in range(1, k + 1))]]
    rows += [[str(path), *(f"{c} ({p:.1%})" for c, p in top), *([""] * (k - len(top)))] for path, top in predictions]
    widths = [max(len(row[i]) for row in rows) for i in range(k + 1)]
    return "".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() + "\n" for row in rows)
