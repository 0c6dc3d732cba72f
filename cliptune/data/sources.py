"""Where a dataset comes from: `--data` names an ImageFolder root, a CSV/TSV/JSONL manifest, a folder saved by the
Hugging Face `datasets` library or webdataset shards, told apart by what it points at (`--data-format` forces one).
All give the same `ImageFolderData`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from cliptune.core.errors import CliptuneError
from cliptune.data.folders import ImageFolderData, load_imagefolder
from cliptune.data.hfdatasets import is_datasets_dir, is_hub_dataset, load_datasets_dir
from cliptune.data.manifest import MANIFEST_SUFFIXES, ManifestColumns, is_manifest, load_manifest
from cliptune.data.shards import is_shards, load_shards


def load_data(source: str | Path, val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0,
              shots: Optional[int] = None, classnames_file: Optional[str] = None, strict: bool = False,
              val_shots: Optional[int] = None, data_format: str = "auto",
              columns: ManifestColumns = ManifestColumns()) -> ImageFolderData:
    """The dataset at `source`, split and sampled as `load_imagefolder` describes."""
    settings = (val_fraction, test_fraction, seed, shots, classnames_file, strict, val_shots)
    if data_format == "auto":
        data_format = ("manifest" if is_manifest(source) else "datasets" if is_datasets_dir(source) or is_hub_dataset(source)
                       else "shards" if is_shards(source) else "imagefolder")
    if data_format == "manifest":
        return load_manifest(source, *settings, columns=columns)
    if data_format == "datasets":
        return load_datasets_dir(source, *settings, columns=columns)
    if data_format == "shards":
        return load_shards(source, *settings)
    if Path(source).is_file():
        raise CliptuneError(f"--data {source} is a file: give an ImageFolder root, or a manifest ending in "
                            f"{', '.join(MANIFEST_SUFFIXES)}")
    return load_imagefolder(source, *settings)
