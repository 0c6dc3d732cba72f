"""Datasets listed in a manifest: a CSV, TSV or JSONL file with one image per row.

Columns (names configurable): `path` (relative to the manifest's folder, or absolute), `label`, an optional
`split` (train/val/test; without it the seeded split of an ImageFolder applies) and an optional `caption` (what
contrastive fine-tuning trains on); other columns are ignored. A `labels` column (or `--task multi-label`) holds
several labels per image, `a|b|c`, and makes a multi-label dataset (`cliptune.data.multilabel`). The
rows become the same `ImageFolderData` an ImageFolder gives, with the labels as classes, so few-shot sampling,
base-to-novel, `classnames.yaml` (next to the manifest) and every command behave identically: a manifest that
lists an ImageFolder's files with their folder names as labels gives the same splits (tested). A bad row is one
error naming the file and line.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from cliptune.core.errors import CliptuneError
from cliptune.data.folders import SPLIT_NAMES, ImageFolderData, assemble, readable_image
from cliptune.data.multilabel import assemble_multilabel

MANIFEST_SUFFIXES = {".csv": ",", ".tsv": "\t", ".jsonl": None}


@dataclass(frozen=True)
class ManifestColumns:
    """How a manifest is read: its column names (`--path-col`, `--label-col`, `--split-col`, `--caption-col`), whether
    a cell holds several labels (`--task`; None: when there is a `labels` column and no `label` one) and their
    separator (`--label-sep`)."""

    path: str = "path"
    label: str = "label"
    split: str = "split"
    caption: str = "caption"
    multi_label: Optional[bool] = None
    separator: str = "|"


def is_manifest(source: str | Path) -> bool:
    return Path(source).is_file() and Path(source).suffix.lower() in MANIFEST_SUFFIXES


def read_rows(path: Path) -> List[Tuple[int, Dict[str, str]]]:
    """(line number, {column: text}) of every data row of a CSV/TSV (header on line 1) or JSONL manifest."""
    delimiter = MANIFEST_SUFFIXES[path.suffix.lower()]
    with path.open(newline="", encoding="utf-8") as handle:
        if delimiter is not None:
            reader = csv.DictReader(handle, delimiter=delimiter)
            return [(reader.line_num, {k: (v or "").strip() for k, v in row.items() if k is not None}) for row in reader]
        rows = []
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CliptuneError(f"{path}:{number}: not a JSON object ({exc.msg})") from None
            if not isinstance(row, dict):
                raise CliptuneError(f"{path}:{number}: not a JSON object")
            rows.append((number, {str(k): "" if v is None else str(v).strip() for k, v in row.items()}))
        return rows


def manifest_images(path: Path, column: str = "path") -> List[Path]:
    """The image paths a manifest lists (relative ones resolved against its folder), in row order: what `predict`
    classifies when given a manifest."""
    rows = read_rows(path)
    if rows and column not in rows[0][1]:
        raise CliptuneError(f"{path} has no '{column}' column for the image paths (columns: {', '.join(sorted(rows[0][1]))})")
    return [_image_path(path, row[column]) for _, row in rows]


def _image_path(manifest: Path, value: str) -> Path:
    """A row's image: an absolute path as it is, a relative one against the manifest's folder."""
    return Path(value) if Path(value).is_absolute() else manifest.parent / value


def _check_columns(path: Path, rows: List[Tuple[int, Dict[str, str]]], columns: ManifestColumns) -> ManifestColumns:
    """The columns as this manifest has them: the label column (`labels` for a multi-label manifest without a `label`
    column) and whether it is multi-label; refuses an empty manifest and a missing column."""
    if not rows:
        raise CliptuneError(f"{path} lists no images")
    present = set(rows[0][1])
    multi_label = columns.label not in present and "labels" in present if columns.multi_label is None else columns.multi_label
    label = "labels" if multi_label and columns.label not in present and "labels" in present else columns.label
    for role, name, flag in (("path", columns.path, "--path-col"), ("label", label, "--label-col")):
        if name not in present:
            raise CliptuneError(f"{path} has no '{name}' column for the image {role} (columns: "
                                f"{', '.join(sorted(present))}; {flag} names another)")
    if columns.caption != ManifestColumns.caption and columns.caption not in present:  # named, so expected
        raise CliptuneError(f"{path} has no '{columns.caption}' column for the captions (columns: "
                            f"{', '.join(sorted(present))}; --caption-col names another)")
    return dataclasses.replace(columns, label=label, multi_label=multi_label)


def _row_entry(path: Path, number: int, row: Dict[str, str], columns: ManifestColumns, has_split: bool) -> tuple:
    """(split, labels, image path) of one row, or one error naming the file and line."""
    where = f"{path}:{number}"
    image, label = row.get(columns.path, ""), row.get(columns.label, "")
    if not image:
        raise CliptuneError(f"{where}: empty '{columns.path}'")
    labels = tuple(dict.fromkeys(part.strip() for part in label.split(columns.separator) if part.strip()))
    if not labels:
        raise CliptuneError(f"{where}: empty '{columns.label}' for {image}")
    if len(labels) > 1 and not columns.multi_label:
        raise CliptuneError(f"{where}: '{label}' holds several labels: pass --task multi-label (or name the column 'labels')")
    split = row.get(columns.split, "") if has_split else "train"
    if split not in SPLIT_NAMES:
        raise CliptuneError(f"{where}: split '{split}' is not one of {', '.join(SPLIT_NAMES)}")
    file = _image_path(path, image)
    if not file.is_file():
        raise CliptuneError(f"{where}: image not found: {file}")
    return split, labels, file


def scan_manifest(path: Path, columns: ManifestColumns, strict: bool) -> tuple:
    """({split: [(file, labels)]} in row order, files skipped as unreadable, {file: caption}, the columns as read)."""
    rows = read_rows(path)
    columns = _check_columns(path, rows, columns)
    has_split = columns.split in rows[0][1]
    per_split: Dict[str, List[Tuple[Path, Tuple[str, ...]]]] = {}
    captions: Dict[Path, str] = {}
    seen: Dict[Path, int] = {}
    skipped = 0
    for number, row in rows:
        split, labels, file = _row_entry(path, number, row, columns, has_split)
        resolved = file.resolve()
        if resolved in seen:
            raise CliptuneError(f"{path}:{number}: {file} is already listed on line {seen[resolved]}")
        seen[resolved] = number
        if not readable_image(file):
            if strict:
                raise CliptuneError(f"{path}:{number}: not a readable image: {file} (drop --strict to skip such rows)")
            skipped += 1
            continue
        per_split.setdefault(split, []).append((file, labels))
        if row.get(columns.caption):
            captions[file] = " ".join(row[columns.caption].split())
    return per_split, skipped, captions, columns


def check_split_labels(source: Path, per_split: Dict[str, Dict[str, List[Path]]]) -> None:
    """Refuse fewer than two training labels and a label with no training image; sort each label's files (the order an
    ImageFolder's folder listing has)."""
    train = per_split.get("train", {})
    if len(train) < 2:
        raise CliptuneError(f"{source} has {len(train)} label(s) with training images; need at least 2")
    for split, labels in per_split.items():
        extra = sorted(set(labels) - set(train))
        if extra:
            raise CliptuneError(f"{source}: label '{extra[0]}' appears in {split} but has no training image")
        for files in labels.values():
            files.sort()


def load_manifest(path: str | Path, val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0,
                  shots: Optional[int] = None, classnames_file: Optional[str] = None, strict: bool = False,
                  val_shots: Optional[int] = None, columns: ManifestColumns = ManifestColumns()) -> ImageFolderData:
    """A manifest's rows as seeded, stratified splits (the given split column, or carved out of train as for an
    ImageFolder without split folders), with the labels as classes."""
    path = Path(path)
    if not is_manifest(path):
        raise CliptuneError(f"not a manifest: {path} (a .csv, .tsv or .jsonl file)")
    per_split, skipped, captions, columns = scan_manifest(path, columns, strict)
    settings = (val_fraction, test_fraction, seed, shots, classnames_file, val_shots, captions)
    if columns.multi_label:
        return assemble_multilabel(path, per_split, skipped, *settings)
    by_label = {split: rows_by_label(rows) for split, rows in per_split.items()}
    check_split_labels(path, by_label)
    return assemble(path, by_label, skipped, *settings)


def rows_by_label(rows: List[Tuple[Path, Tuple[str, ...]]]) -> Dict[str, List[Path]]:
    """{label: files} of single-label (file, (label,)) rows, in row order."""
    by_label: Dict[str, List[Path]] = {}
    for file, (label,) in rows:
        by_label.setdefault(label, []).append(file)
    return by_label
