"""Webdataset shards as `--data`: tar files of samples, each sample's members sharing a key (`0001.webp`,
`0001.cls`, `0001.txt`), as clip-benchmark and img2dataset write them.

`--data` names a folder of shards (`train-*.tar`, `val-*.tar`, `test-*.tar` are those splits, as split folders are
in an ImageFolder; other `.tar` names are one training split, carved like an ImageFolder without split folders), a
single `.tar`, or a brace pattern (`shards/train-{000000..000099}.tar`, expanded with `braceexpand`). A sample's
class is its `.cls` member (a class index, named by `classnames.txt` beside the shards, one name per line, as
clip-benchmark ships it; without the file the index is the name) or its `.label` member (a class name); its `.txt`
member is its caption.

Shards are indexed from their tar headers alone (the image bytes are skipped over, never read or decoded), so memory
stays flat however many shards there are. Few-shot sampling and the splits then run on the index, and only the
images a run uses are copied out, once, into the cliptune cache (`shards/`, keyed by each shard's path, size and
modification time); every command then treats them as it treats an ImageFolder's files. A 16-shot run on a
million-image collection copies 16 images per class plus the evaluation splits.
"""

from __future__ import annotations

import hashlib
import tarfile
from functools import partial
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from cliptune.core.cachedir import user_cache_dir
from cliptune.core.errors import CliptuneError
from cliptune.core.runfolder import atomic_write
from cliptune.data.folders import IMAGE_EXTENSIONS, ImageFolderData, assemble, readable_image
from cliptune.data.manifest import check_split_labels

SPLIT_PREFIXES = {"train": "train", "val": "val", "validation": "val", "test": "test"}
CLASSNAMES_TXT = "classnames.txt"
LABEL_MEMBERS = (".cls", ".label")
SMALL_MEMBER = 1 << 16  # labels and captions are read; anything larger is not one


def is_shards(source: str | Path) -> bool:
    """A `.tar` file, a brace pattern of them, or a folder holding `.tar` files and no (visible) sub-folders."""
    text = str(source)
    if "{" in text and text.endswith(".tar"):
        return True
    path = Path(source)
    if path.is_file():
        return path.suffix == ".tar"
    return path.is_dir() and any(path.glob("*.tar")) and not any(p.is_dir() and not p.name.startswith(".") for p in path.iterdir())


def shard_files(source: str | Path) -> Tuple[Path, Dict[str, List[Path]]]:
    """(the folder `classnames.txt` is looked for in, {split: shards}): by name prefix in a folder, else all train."""
    text = str(source)
    if "{" in text:
        try:
            from braceexpand import braceexpand
        except ImportError:
            raise CliptuneError(f"--data {text} is a shard pattern: pip install 'cliptune[shards]' to expand it") from None
        shards = [Path(p) for p in braceexpand(text)]
        missing = [p for p in shards if not p.is_file()]
        if missing:
            raise CliptuneError(f"--data {text}: shard {missing[0]} not found ({len(missing)} of {len(shards)} missing)")
        return shards[0].parent, {"train": shards}
    path = Path(source)
    if path.is_file():
        return path.parent, {"train": [path]}
    by_split: Dict[str, List[Path]] = {}
    for shard in sorted(path.glob("*.tar")):
        prefix = shard.name.split("-")[0].split("_")[0].split(".")[0]
        by_split.setdefault(SPLIT_PREFIXES.get(prefix, "train"), []).append(shard)
    if "train" not in by_split:
        raise CliptuneError(f"{path} has shards for {', '.join(sorted(by_split))} but none for train (train-*.tar)")
    return path, by_split


def _class_names(folder: Path) -> Optional[List[str]]:
    file = folder / CLASSNAMES_TXT
    if not file.is_file():
        return None
    return [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]


def _cache_folder(shard: Path) -> Path:
    stat = shard.stat()
    key = hashlib.sha256(f"{shard.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:24]
    return user_cache_dir() / "shards" / key


def _index(shard: Path, names: Optional[List[str]]) -> List[Tuple[str, str, Optional[str]]]:
    """(image member, label, caption or None) of every sample of one shard, in tar order, from its headers (and its
    small label and caption members)."""
    samples: Dict[str, Dict[str, str]] = {}
    try:
        with tarfile.open(shard, "r:") as tar:
            for member in tar:  # headers only: the data of a member not read here is skipped over
                if not member.isfile():
                    continue
                folder, _, base = member.name.rpartition("/")
                stem, dot, extension = base.partition(".")  # webdataset's key: the name up to its first dot
                key = f"{folder}/{stem}" if folder else stem
                extension = "." + extension.lower() if dot else ""
                sample = samples.setdefault(key, {})
                if extension in IMAGE_EXTENSIONS:
                    sample["image"] = member.name
                elif extension in (*LABEL_MEMBERS, ".txt") and member.size <= SMALL_MEMBER:
                    sample[extension] = _read(tar, member).decode("utf-8", errors="replace").strip()
    except (tarfile.TarError, OSError) as exc:
        raise CliptuneError(f"{shard}: not a readable tar shard ({exc})") from None
    rows = []
    for key, sample in samples.items():
        if "image" not in sample:
            continue
        rows.append((sample["image"], _label(shard, key, sample, names), sample.get(".txt") or None))
    return rows


def _read(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    """A regular member's bytes (`extractfile` gives None only for other member types)."""
    handle = tar.extractfile(member)
    if handle is None:
        raise CliptuneError(f"shard member {member.name} is not a regular file")
    return handle.read()


def _label(shard: Path, key: str, sample: Dict[str, str], names: Optional[List[str]]) -> str:
    if sample.get(".label"):
        return sample[".label"]
    value = sample.get(".cls", "")
    if not value:
        raise CliptuneError(f"{shard}: sample '{key}' has no .cls or .label member")
    if names is None:
        return value
    try:
        return names[int(value)]
    except (ValueError, IndexError):
        raise CliptuneError(f"{shard}: sample '{key}' has class '{value}', not an index into the "
                            f"{len(names)} names of {CLASSNAMES_TXT}") from None


def load_shards(source: str | Path, val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0,
                shots: Optional[int] = None, classnames_file: Optional[str] = None, strict: bool = False,
                val_shots: Optional[int] = None) -> ImageFolderData:
    """The shards' samples as seeded, stratified splits with the labels as classes; only the images the splits keep
    are copied out of the shards."""
    folder, by_split = shard_files(source)
    names = _class_names(folder)
    per_split: Dict[str, Dict[str, List[Path]]] = {}
    members: Dict[Path, Tuple[Path, str]] = {}  # where an image will be copied to -> (shard, member)
    captions: Dict[Path, str] = {}
    for split, shards in by_split.items():
        for shard in shards:
            cache = _cache_folder(shard)
            for image, label, caption in _index(shard, names):
                file = cache / image
                members[file] = (shard, image)
                per_split.setdefault(split, {}).setdefault(label, []).append(file)
                if caption:
                    captions[file] = caption
    root = Path(str(source))  # classnames.yaml is looked for beside it (in it, for a folder)
    check_split_labels(root, per_split)
    data = assemble(root, per_split, 0, val_fraction, test_fraction, seed, shots, classnames_file, val_shots, captions)
    _copy_out(data, members)
    return data


def _copy_out(data: ImageFolderData, members: Dict[Path, Tuple[Path, str]]) -> None:
    """Copy the images the splits use out of their shards (once: a copied image is kept), one shard open at a time. The
    splits are drawn before any image is read, so an unreadable image is an error (`--strict` or not)."""
    needed: Dict[Path, List[Tuple[str, Path]]] = {}
    for split in data.splits.values():
        for file in split.files:
            if not file.is_file():
                shard, member = members[file]
                needed.setdefault(shard, []).append((member, file))
    for shard, wanted in needed.items():
        with tarfile.open(shard, "r:") as tar:
            by_name = {info.name: info for info in tar.getmembers()}  # getmember() would scan the list for every image
            for member, file in wanted:
                atomic_write(file, partial(Path.write_bytes, data=_read(tar, by_name[member])))
                if not readable_image(file):
                    file.unlink()
                    raise CliptuneError(f"{shard}: member {member} is not a readable image")
