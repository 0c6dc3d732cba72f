"""Labelled image data: ImageFolder scanning, class naming, seeded splits and few-shot sampling, transforms."""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import yaml
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import transforms as T

from cliptune.core.errors import CliptuneError

log = logging.getLogger("cliptune")

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
SPLIT_NAMES = ("train", "val", "test")
CLASSNAMES_FILE = "classnames.yaml"


def display_name(folder: str) -> str:
    """`Tomato___Late_blight` -> `tomato late blight`."""
    return re.sub(r"\s+", " ", re.sub(r"[_\-]+", " ", folder)).strip().lower()


@dataclass
class Split:
    files: List[Path] = field(default_factory=list)
    labels: List[int] = field(default_factory=list)  # multi-label data: each image's first label
    # multi-label data: (images, classes), each image's labels an equal share of 1 (cliptune.data.multilabel); None for
    # single-label data
    targets: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return len(self.files)

    def add(self, files: Sequence[Path], label: int) -> None:
        self.files.extend(files)
        self.labels.extend([label] * len(files))


@dataclass
class ImageFolderData:
    """Classes (folder names), their display names and descriptions, and the three splits."""

    root: Path
    classes: List[str]
    classnames: List[str]
    descriptions: Dict[str, List[str]]
    splits: Dict[str, Split]
    skipped_files: int = 0
    # image file -> its caption (a manifest's caption column, an ImageFolder image's `.txt` sidecar); contrastive
    # fine-tuning trains on them, evaluation stays class-based
    captions: Dict[Path, str] = field(default_factory=dict)

    @property
    def multi_label(self) -> bool:
        """True when each image has a set of labels (`Split.targets`)."""
        return self.splits["train"].targets is not None

    @property
    def named_descriptions(self) -> Dict[str, List[str]]:
        """Descriptions keyed by display name, as methods see classes."""
        return {self.classnames[self.classes.index(folder)]: texts for folder, texts in self.descriptions.items()}

    def split(self, name: str) -> Split:
        if name not in self.splits or len(self.splits[name]) == 0:
            available = ", ".join(n for n in SPLIT_NAMES if len(self.splits.get(n, ())) > 0)
            raise CliptuneError(f"split '{name}' is empty or missing in {self.root} (available: {available})")
        return self.splits[name]

    def restrict_to(self, folders: Sequence[str]) -> "ImageFolderData":
        """Keep only the given classes (in the given order), relabelled 0..k-1."""
        if self.multi_label:
            raise CliptuneError(f"{self.root} is multi-label: base-to-novel and continual tasks split single-label data by class")
        index = {c: i for i, c in enumerate(self.classes)}
        new_label = {index[c]: i for i, c in enumerate(folders)}
        splits = {}
        for name, split in self.splits.items():
            kept = Split()
            for path, label in zip(split.files, split.labels):
                if label in new_label:
                    kept.files.append(path)
                    kept.labels.append(new_label[label])
            splits[name] = kept
        return ImageFolderData(
            root=self.root,
            classes=list(folders),
            classnames=[self.classnames[index[c]] for c in folders],
            descriptions={c: self.descriptions[c] for c in folders if c in self.descriptions},
            splits=splits,
            skipped_files=self.skipped_files,
            captions=self.captions,
        )


def readable_image(path: Path) -> bool:
    try:
        with Image.open(path) as image:
            image.verify()
        return True
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return False


def visible_files(folder: Path) -> List[Path]:
    """Every file under `folder` (recursively, sorted), leaving out hidden ones: any part of the path below
    `folder` starting with a dot (`.DS_Store`, `.ipynb_checkpoints/`, ...). The one rule for every image walker."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def image_files_under(folder: Path) -> List[Path]:
    """The image files (by extension) under `folder`, as `visible_files` finds them."""
    return [p for p in visible_files(folder) if p.suffix.lower() in IMAGE_EXTENSIONS]


def sidecar_captions(files: Sequence[Path]) -> Dict[Path, str]:
    """The captions of images that have one in a text file of the same name (`0001.jpg` + `0001.txt`, the layout
    img2dataset and webdataset use); an empty file is no caption."""
    captions = {}
    for path in files:
        sidecar = path.with_suffix(".txt")
        if sidecar.is_file():
            text = " ".join(sidecar.read_text(encoding="utf-8", errors="replace").split())
            if text:
                captions[path] = text
    return captions


def _scan_class_dirs(root: Path, strict: bool) -> tuple[Dict[str, List[Path]], int]:
    """Map each class folder under `root` to its readable image files; count skipped files."""
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files: Dict[str, List[Path]] = {}
    skipped = 0
    for class_dir in class_dirs:
        images = []
        found = visible_files(class_dir)
        stems = {path.with_suffix("") for path in found if path.suffix.lower() in IMAGE_EXTENSIONS}
        for path in found:
            if path.suffix.lower() == ".txt" and path.with_suffix("") in stems:
                continue  # an image's caption (`sidecar_captions`), not a file to skip
            if path.suffix.lower() in IMAGE_EXTENSIONS and readable_image(path):
                images.append(path)
            elif strict:
                raise CliptuneError(f"not a readable image: {path} (remove it, or drop --strict to skip such files)")
            else:
                skipped += 1
        files[class_dir.name] = images
    return files, skipped


def _load_classnames(path: Optional[Path], classes: Sequence[str]) -> tuple[List[str], Dict[str, List[str]]]:
    names = {c: display_name(c) for c in classes}
    descriptions: Dict[str, List[str]] = {}
    if path is None:
        return [names[c] for c in classes], descriptions
    try:
        mapping = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise CliptuneError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(mapping, dict):
        raise CliptuneError(f"{path} must map classes (folder names or manifest labels) to display names")
    unknown = sorted(set(mapping) - set(classes))
    if unknown:
        raise CliptuneError(f"{path} names classes the data does not have: {', '.join(map(str, unknown))}")
    for folder, value in mapping.items():
        if isinstance(value, str):
            names[folder] = value
        elif isinstance(value, dict) and isinstance(value.get("name", names[folder]), str):
            names[folder] = value.get("name", names[folder])
            described = value.get("descriptions", [])
            if not isinstance(described, list) or not all(isinstance(d, str) for d in described):
                raise CliptuneError(f"{path}: descriptions of '{folder}' must be a list of strings")
            descriptions[folder] = described
        else:
            raise CliptuneError(f"{path}: '{folder}' must map to a name or to {{name: ..., descriptions: [...]}}")
    return [names[c] for c in classes], descriptions


def _carve(files: List[Path], fraction: float, rng: random.Random) -> tuple[List[Path], List[Path]]:
    """Split off round(len*fraction) files (at least one when fraction > 0 and two or more files)."""
    if fraction <= 0 or len(files) < 2:
        return files, []
    shuffled = list(files)
    rng.shuffle(shuffled)
    n = min(len(files) - 1, max(1, round(len(files) * fraction)))
    return sorted(shuffled[n:]), sorted(shuffled[:n])


def load_imagefolder(
    root: str | Path,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    shots: Optional[int] = None,
    classnames_file: Optional[str] = None,
    strict: bool = False,
    val_shots: Optional[int] = None,
) -> ImageFolderData:
    """Scan an ImageFolder root (with or without train/val/test) into seeded, stratified splits.

    `shots`/`val_shots` keep that many images per class of train/val (few-shot protocols validate on a
    few-shot split too: Dassl samples min(K, 4) validation images per class).
    """
    root = Path(root)
    if not root.is_dir():
        raise CliptuneError(f"data directory not found: {root}")
    per_split, skipped = _scan_splits(root, strict)
    captions = sidecar_captions([f for labels in per_split.values() for files in labels.values() for f in files])
    return assemble(root, per_split, skipped, val_fraction, test_fraction, seed, shots, classnames_file, val_shots, captions)


def assemble(root: Path, per_split: Dict[str, Dict[str, List[Path]]], skipped: int, val_fraction: float,
             test_fraction: float, seed: int, shots: Optional[int], classnames_file: Optional[str],
             val_shots: Optional[int], captions: Optional[Dict[Path, str]] = None) -> ImageFolderData:
    """The dataset of `{split: {class: files}}` (an ImageFolder's folders, a manifest's rows) and the files' captions:
    seeded splits carved where a split is missing, few-shot sampling, and class names (`classnames_file`, else
    `classnames.yaml` beside the data)."""
    classes = sorted(per_split["train"])
    splits = _stratified_splits(per_split, classes, val_fraction, test_fraction, seed)
    if shots is not None:
        splits["train"] = _few_shot(splits["train"], classes, shots, seed)
    if val_shots is not None:
        splits["val"] = _few_shot(splits["val"], classes, val_shots, seed, split_name="val")
    if skipped:
        log.warning("skipped %d file(s) that are not readable images (use --strict to make this an error)", skipped)
    names, descriptions = class_names(root, classnames_file, classes)
    return ImageFolderData(root, classes, names, descriptions, splits, skipped, captions or {})


def class_names(root: Path, classnames_file: Optional[str], classes: Sequence[str]) -> tuple[List[str], Dict[str, List[str]]]:
    """Display names and descriptions of `classes`: from `classnames_file`, else `classnames.yaml` beside the data."""
    classnames_path = Path(classnames_file) if classnames_file else (root if root.is_dir() else root.parent) / CLASSNAMES_FILE
    if classnames_file and not classnames_path.is_file():
        raise CliptuneError(f"classnames file not found: {classnames_file}")
    return _load_classnames(classnames_path if classnames_path.is_file() else None, classes)


def _scan_splits(root: Path, strict: bool) -> tuple:
    """({split: {class: files}}, files skipped): the split folders when `root/train` exists (the root itself is
    "train" otherwise); refuses fewer than two classes, an empty class, and a class missing from train."""
    has_splits = (root / "train").is_dir()
    per_split: Dict[str, Dict[str, List[Path]]] = {}
    skipped = 0
    for name in SPLIT_NAMES if has_splits else ("train",):
        split_root = root / name if has_splits else root
        if split_root.is_dir():
            per_split[name], count = _scan_class_dirs(split_root, strict)
            skipped += count
    train_root = root / "train" if has_splits else root
    classes = sorted(per_split["train"])
    if len(classes) < 2:
        raise CliptuneError(f"{train_root} has {len(classes)} class folder(s); need at least 2")
    empty = [c for c in classes if not per_split["train"][c]]
    if empty:
        raise CliptuneError(f"class folder '{empty[0]}' in {train_root} has no readable images")
    for name, dirs in per_split.items():
        extra = sorted(set(dirs) - set(classes))
        if extra:
            raise CliptuneError(f"{root / name} has class folder '{extra[0]}' that is not in {root / 'train'}")
    return per_split, skipped


def _stratified_splits(per_split: Dict[str, Dict[str, List[Path]]], classes: List[str], val_fraction: float,
                       test_fraction: float, seed: int) -> Dict[str, Split]:
    """Train/val/test: the given split folders, the missing ones carved per class (seeded) out of train."""
    rng = random.Random(seed)
    splits = {name: Split() for name in SPLIT_NAMES}
    for label, cls in enumerate(classes):
        train = per_split["train"][cls]
        if "test" in per_split:
            test = per_split["test"].get(cls, [])
        else:
            train, test = _carve(train, test_fraction, rng)
        if "val" in per_split:
            val = per_split["val"].get(cls, [])
        else:
            train, val = _carve(train, val_fraction, rng)
        splits["train"].add(train, label)
        splits["val"].add(val, label)
        splits["test"].add(test, label)
    return splits


def _few_shot(split: Split, classes: Sequence[str], shots: int, seed: int, split_name: str = "train") -> Split:
    """K images per class, the same images for the same seed; a class with fewer keeps all (warned)."""
    flag = "--shots" if split_name == "train" else "--val-shots"
    if shots < 1:
        raise CliptuneError(f"{flag} must be at least 1 (got {shots})")
    rng = random.Random(f"shots-{seed}" if split_name == "train" else f"{split_name}-shots-{seed}")
    sampled = Split()
    for label, cls in enumerate(classes):
        files = [f for f, y in zip(split.files, split.labels) if y == label]
        if len(files) < shots:
            if split_name == "train":
                log.warning("class '%s' has only %d training images (< %d shots); using all of them", cls, len(files), shots)
            chosen = files
        else:
            chosen = sorted(rng.sample(files, shots))
        sampled.add(chosen, label)
    return sampled


class ImageDataset(Dataset):
    """Decoded, transformed images with labels; decoding errors here mean a file changed after the scan."""

    def __init__(self, split: Split, transform):
        self.split = split
        self.transform = transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int):
        with Image.open(self.split.files[index]) as image:
            return self.transform(image.convert("RGB")), self.split.labels[index]


_INTERPOLATION = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}


def eval_geometry(image_size, interpolation: str = "bicubic") -> list:
    """The deterministic, pixel-space part of CLIP's evaluation preprocessing: resize the short side, centre crop."""
    mode = _INTERPOLATION.get(interpolation, T.InterpolationMode.BICUBIC)
    return [T.Resize(image_size[0], interpolation=mode), T.CenterCrop(image_size)]


def eval_transform(image_size, mean, std, interpolation: str = "bicubic"):
    """CLIP's evaluation preprocessing: resize the short side, centre crop, normalise."""
    return T.Compose([*eval_geometry(image_size, interpolation), T.ToTensor(), T.Normalize(mean, std)])


def augments(crop_scale=(0.5, 1.0), hflip=True, color_jitter=0.0) -> bool:
    """False when every augmentation is off (crop scale [1, 1], no flip, no jitter): training then sees eval preprocessing."""
    return tuple(crop_scale) != (1.0, 1.0) or bool(hflip) or bool(color_jitter)


def train_transform(image_size, mean, std, crop_scale=(0.5, 1.0), hflip=True, color_jitter=0.0, interpolation="bicubic"):
    """Random resized crop (+ optional flip / colour jitter), as in CoOp's training pipeline; eval's without augmentation."""
    if not augments(crop_scale, hflip, color_jitter):
        return eval_transform(image_size, mean, std, interpolation)
    mode = _INTERPOLATION.get(interpolation, T.InterpolationMode.BICUBIC)
    steps = [T.RandomResizedCrop(image_size, scale=tuple(crop_scale), interpolation=mode)]
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    if color_jitter:
        steps.append(T.ColorJitter(color_jitter, color_jitter, color_jitter))
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)


def labels_tensor(split: Split) -> torch.Tensor:
    """(N,) class indices, or the (N, classes) targets of multi-label data."""
    if split.targets is not None:
        return split.targets
    return torch.tensor(split.labels, dtype=torch.long)


def loader_settings(num_workers: Optional[int], device: torch.device) -> Dict:
    """DataLoader options per device: `num_workers` (None = 0 on CPU, where workers would only compete with the
    compute threads and resume is exact without them; else up to 8 per process), persistent workers when
    there are any, pinned memory on CUDA."""
    if num_workers is None:
        if device.type == "cpu":
            num_workers = 0
        else:
            cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            num_workers = max(1, min(8, cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))))
    return {"num_workers": num_workers, "persistent_workers": num_workers > 0, "pin_memory": device.type == "cuda"}


def split_key(parts: Sequence[str], split: Split) -> str:
    """Cache key of what was computed from `split`'s files: the identity `parts`, then each file's path, label, size and mtime."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode())
        digest.update(b"\0")
    for path, label in zip(split.files, split.labels):
        stat = Path(path).stat()
        digest.update(f"{path}|{label}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24]
