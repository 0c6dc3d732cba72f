"""Datasets saved by the Hugging Face `datasets` library (`Dataset.save_to_disk` / `DatasetDict.save_to_disk`): a
folder holding `dataset_dict.json` (one subfolder per split) or `state.json` (one split, carved like an ImageFolder
without split folders); or `hf:org/name`, a dataset on the Hugging Face Hub (`datasets.load_dataset`, online or in
the local Hugging Face cache).

The image column (`--path-col`, else `image`; an `Image` feature, or paths), the label column (`--label-col`, a
`ClassLabel` whose names become the classes, or strings) and an optional caption column (`--caption-col`) are read
row by row. Images stored in the dataset are
written once, under the cliptune cache (`datasets/`, keyed by the dataset's files), as numbered files in row order;
the rows then become the same `ImageFolderData` an ImageFolder gives, so every command treats them alike (tested:
the same images as an ImageFolder give the same zero-shot and linear-probe results). Splits named `train`, `val`
or `validation` and `test` are used; others are refused in one line.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from cliptune.core.cachedir import user_cache_dir
from cliptune.core.errors import CliptuneError
from cliptune.core.runfolder import atomic_write
from cliptune.data.folders import ImageFolderData, assemble, readable_image
from cliptune.data.manifest import ManifestColumns, check_split_labels, rows_by_label
from cliptune.data.multilabel import assemble_multilabel

MARKERS = ("dataset_dict.json", "state.json")
HUB_PREFIX = "hf:"
SPLIT_ALIASES = {"train": "train", "val": "val", "validation": "val", "test": "test"}


def is_datasets_dir(source: str | Path) -> bool:
    path = Path(source)
    return path.is_dir() and any((path / marker).is_file() for marker in MARKERS)


def is_hub_dataset(source: str | Path) -> bool:
    return str(source).startswith(HUB_PREFIX)


def _load(path: Path) -> Dict[str, object]:
    """{split name: Dataset} of a saved dataset or a Hub dataset (one split: "train")."""
    try:
        from datasets import DatasetDict, load_dataset, load_from_disk
    except ImportError:
        raise CliptuneError(f"--data {path} is a Hugging Face dataset: pip install 'cliptune[datasets]' to read it") from None
    if is_hub_dataset(path):
        name = str(path)[len(HUB_PREFIX):]
        try:
            loaded = load_dataset(name)
        except Exception as exc:  # noqa: BLE001 - offline, unknown, private, or not a dataset: the library's reasons vary
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CliptuneError(f"could not load the Hugging Face dataset '{name}' ({reason}); download it while online "
                                "or save it with save_to_disk and pass that folder") from None
    else:
        try:
            loaded = load_from_disk(str(path))
        except (FileNotFoundError, ValueError, OSError) as exc:
            raise CliptuneError(f"{path}: not a readable saved dataset ({exc})") from None
    splits = dict(loaded) if isinstance(loaded, DatasetDict) else {"train": loaded}
    unknown = sorted(set(splits) - set(SPLIT_ALIASES))
    if unknown:
        raise CliptuneError(f"{path}: split '{unknown[0]}' is not one of train, val (validation), test")
    return {SPLIT_ALIASES[name]: split for name, split in splits.items()}


def _columns(path: Path, split, columns: ManifestColumns) -> Tuple[str, str, Optional[str]]:
    """The (image, label, caption or None) columns of a split."""
    names = split.column_names
    image = columns.path if columns.path in names else "image"
    required = [(image, "--path-col"), (columns.label, "--label-col")]
    if columns.caption != ManifestColumns.caption:  # a caption column named by --caption-col must exist
        required.append((columns.caption, "--caption-col"))
    for column, flag in required:
        if column not in names:
            raise CliptuneError(f"{path}: no column '{column}' (columns: {', '.join(names)}; name it with {flag})")
    return image, columns.label, columns.caption if columns.caption in names else None


def _image_folder(split, column: str) -> Path:
    """Where a split's stored images are written: a key of the dataset's files (name, size, mtime) and the column."""
    digest = hashlib.sha256(column.encode())
    for entry in split.cache_files:
        stat = os.stat(entry["filename"])
        digest.update(f"{entry['filename']}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    return user_cache_dir() / "datasets" / digest.hexdigest()[:24]


def _image_file(value, folder: Path, index: int) -> Path:
    """A row's image as a file: its own path when the dataset only refers to one, else its bytes written once."""
    if isinstance(value, str):
        return Path(value)
    if value.get("bytes") is None:
        return Path(value["path"])
    file = folder / f"{index:08d}{Path(value.get('path') or '').suffix or '.img'}"
    if not file.is_file():  # a concurrent reader sees the whole file or none
        atomic_write(file, lambda staging: staging.write_bytes(value["bytes"]))
    return file


def _label_names(feature):
    """The class names of a `ClassLabel` feature (or of the `ClassLabel` inside a multi-label `List`/`Sequence`), else
    None."""
    from datasets import ClassLabel

    inner = feature[0] if isinstance(feature, list) and feature else getattr(feature, "feature", feature)
    return inner.names if isinstance(inner, ClassLabel) else None


def _row_labels(value, names) -> Tuple[str, ...]:
    """A row's labels: one value, or a list of them (a multi-label row), as names."""
    values = value if isinstance(value, (list, tuple)) else [value]
    texts = (names[v] if names is not None else ("" if v is None else str(v).strip()) for v in values)
    return tuple(dict.fromkeys(text for text in texts if text))


def _split_files(path: Path, name: str, split, columns: ManifestColumns, strict: bool,
                 captions: Dict[Path, str]) -> Tuple[List[Tuple[Path, Tuple[str, ...]]], int]:
    """([(file, labels)], unreadable rows skipped) of one split, in row order; the rows' captions go into `captions`."""
    from datasets import Image

    image, label, caption = _columns(path, split, columns)
    names = _label_names(split.features[label])
    if isinstance(split.features[image], Image):
        split = split.cast_column(image, Image(decode=False))
    folder = _image_folder(split, image) / name
    rows: List[Tuple[Path, Tuple[str, ...]]] = []
    skipped = 0
    for index, row in enumerate(split.select_columns([image, label] + ([caption] if caption else []))):
        labels = _row_labels(row[label], names)
        if not labels:
            raise CliptuneError(f"{path}: {name} row {index}: empty label")
        file = _image_file(row[image], folder, index)
        if not readable_image(file):
            if strict:
                raise CliptuneError(f"{path}: {name} row {index}: not a readable image: {file}")
            skipped += 1
            continue
        rows.append((file, labels))
        if caption and row[caption] and str(row[caption]).strip():
            captions[file] = " ".join(str(row[caption]).split())
    return rows, skipped


def load_datasets_dir(path: str | Path, val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0,
                      shots: Optional[int] = None, classnames_file: Optional[str] = None, strict: bool = False,
                      val_shots: Optional[int] = None, columns: ManifestColumns = ManifestColumns()) -> ImageFolderData:
    """A saved dataset's splits as seeded, stratified splits (its own, the missing ones carved out of train), with the
    labels as classes; a label column holding lists (a `Sequence` of `ClassLabel`) makes it multi-label."""
    path = Path(path)
    per_split: Dict[str, List[Tuple[Path, Tuple[str, ...]]]] = {}
    captions: Dict[Path, str] = {}
    skipped = 0
    for name, split in _load(path).items():
        per_split[name], lost = _split_files(path, name, split, columns, strict, captions)
        skipped += lost
    settings = (val_fraction, test_fraction, seed, shots, classnames_file, val_shots, captions)
    multi_label = columns.multi_label
    if multi_label is None:
        multi_label = any(len(labels) > 1 for rows in per_split.values() for _, labels in rows)
    if multi_label:
        return assemble_multilabel(path, per_split, skipped, *settings)
    if any(len(labels) > 1 for rows in per_split.values() for _, labels in rows):
        raise CliptuneError(f"{path}: rows with several labels, but --task single-label")
    by_label = {split: rows_by_label(rows) for split, rows in per_split.items()}
    check_split_labels(path, by_label)
    return assemble(path, by_label, skipped, *settings)
