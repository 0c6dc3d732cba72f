"""Datasets listed in a manifest: a CSV, TSV or JSONL file with one image per row.

Columns (names configurable): `path` (relative to the manifest's folder, or absolute), `label`, an optional
`split` (train/val/test; without it the seeded split of an ImageFolder applies) and an optional `caption` (what
contrastive fine-tuning trains on); other columns are ignored. The
rows become the same `ImageFolderData` an ImageFolder gives, with the labels as classes, so few-shot sampling,
base-to-novel, `classnames.yaml` (next to the manifest) and every command behave identically: a manifest that
lists an ImageFolder's files with their folder names as labels gives the same splits (tested). A bad row is one
error naming the file and line.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from cliptune.core.errors import CliptuneError
from cliptune.data.folders import SPLIT_NAMES, ImageFolderData, assemble, readable_image

MANIFEST_SUFFIXES = {".csv": ",", ".tsv": "\t", ".jsonl": None}
LABEL_SEPARATOR = "|"  # `a|b` would be several labels of one image (multi-label)


@dataclass(frozen=True)
class ManifestColumns:
    """The manifest's column names (`--path-col`, `--label-col`, `--split-col`, `--caption-col`)."""

    path: str = "path"
    label: str = "label"
    split: str = "split"
    caption: str = "caption"


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


def _check_columns(path: Path, rows: List[Tuple[int, Dict[str, str]]], columns: ManifestColumns) -> bool:
    """Whether the manifest has a split column; refuses an empty manifest, a missing column and multi-label rows."""
    if not rows:
        raise CliptuneError(f"{path} lists no images")
    present = set(rows[0][1])
    for role, name, flag in (("path", columns.path, "--path-col"), ("label", columns.label, "--label-col")):
        if name not in present:
            plural = " (several labels per image: multi-label manifests are not supported yet)" if "labels" in present else ""
            raise CliptuneError(f"{path} has no '{name}' column for the image {role}{plural} (columns: "
                                f"{', '.join(sorted(present))}; {flag} names another)")
    if columns.caption != ManifestColumns.caption and columns.caption not in present:  # named, so expected
        raise CliptuneError(f"{path} has no '{columns.caption}' column for the captions (columns: "
                            f"{', '.join(sorted(present))}; --caption-col names another)")
    return columns.split in present


def _row_entry(path: Path, number: int, row: Dict[str, str], columns: ManifestColumns, has_split: bool) -> tuple:
    """(split, label, image path) of one row, or one error naming the file and line."""
    where = f"{path}:{number}"
    image, label = row.get(columns.path, ""), row.get(columns.label, "")
    if not image:
        raise CliptuneError(f"{where}: empty '{columns.path}'")
    if not label:
        raise CliptuneError(f"{where}: empty '{columns.label}' for {image}")
    if LABEL_SEPARATOR in label:
        raise CliptuneError(f"{where}: '{label}' holds several labels; multi-label manifests are not supported yet")
    split = row.get(columns.split, "") if has_split else "train"
    if split not in SPLIT_NAMES:
        raise CliptuneError(f"{where}: split '{split}' is not one of {', '.join(SPLIT_NAMES)}")
    file = _image_path(path, image)
    if not file.is_file():
        raise CliptuneError(f"{where}: image not found: {file}")
    return split, label, file


def scan_manifest(path: Path, columns: ManifestColumns, strict: bool) -> tuple:
    """({split: {label: sorted files}}, files skipped as unreadable, {file: caption}), as `folders._scan_splits` gives
    an ImageFolder's."""
    rows = read_rows(path)
    has_split = _check_columns(path, rows, columns)
    per_split: Dict[str, Dict[str, List[Path]]] = {}
    captions: Dict[Path, str] = {}
    seen: Dict[Path, int] = {}
    skipped = 0
    for number, row in rows:
        split, label, file = _row_entry(path, number, row, columns, has_split)
        resolved = file.resolve()
        if resolved in seen:
            raise CliptuneError(f"{path}:{number}: {file} is already listed on line {seen[resolved]}")
        seen[resolved] = number
        if not readable_image(file):
            if strict:
                raise CliptuneError(f"{path}:{number}: not a readable image: {file} (drop --strict to skip such rows)")
            skipped += 1
            continue
        per_split.setdefault(split, {}).setdefault(label, []).append(file)
        if row.get(columns.caption):
            captions[file] = " ".join(row[columns.caption].split())
    check_split_labels(path, per_split)
    return per_split, skipped, captions


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
    per_split, skipped, captions = scan_manifest(path, columns, strict)
    return assemble(path, per_split, skipped, val_fraction, test_fraction, seed, shots, classnames_file, val_shots, captions)
