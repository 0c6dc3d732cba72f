"""Feature cache for frozen towers: image features and zero-shot class text features, computed once, kept in
memory and on disk (the shared user cache, or the run folder).

An image key covers everything the features depend on: model identity, transform, file list (with size
and mtime), number of augmented views, seed and precision. With `views > 0` the training images are
augmented `views` times once (Tip-Adapter style) and each epoch draws one view per image, so caching
never silently drops augmentation. A text key covers the model identity, its weights' dtype, the class
names and the templates.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import DataLoader, Dataset

from cliptune.data.folders import ImageDataset, Split, split_key
from cliptune.models.loading import LoadedModel
from cliptune.models.zeroshot import zeroshot_weights
from cliptune.core.cachedir import mark_used, prune
from cliptune.core.progress import progress_bar
from cliptune.core.seeding import isolated_rng

log = logging.getLogger("cliptune")


class FeatureMemory(OrderedDict):
    """The features of a session's last few splits (a run uses three; a sweep's trials revisit them), owned by the
    session that computed them, so nothing outlives it or leaks between sessions."""

    def __init__(self, entries: int = 8):
        super().__init__()
        self.entries = entries

    def recall(self, key: str) -> Optional[torch.Tensor]:
        """The features under `key`, now the most recently used, or None."""
        if key not in self:
            return None
        self.move_to_end(key)
        return self[key]

    def remember(self, key: str, features: torch.Tensor) -> None:
        self[key] = features
        self.move_to_end(key)
        while len(self) > self.entries:
            self.popitem(last=False)


def cache_key(model: LoadedModel, split: Split, transform, views: int, seed: int, precision: str) -> str:
    return split_key([model.spec.fingerprint(), repr(transform), str(views), str(seed), precision], split)


@torch.no_grad()
def _encode(model: LoadedModel, images: Dataset, batch_size: int, num_workers: int, accelerator, desc: str) -> torch.Tensor:
    loader = DataLoader(images, batch_size=batch_size, num_workers=num_workers)
    chunks = []
    device = accelerator.device if accelerator is not None else torch.device("cpu")
    main_process = accelerator is None or accelerator.is_local_main_process
    for batch, _ in progress_bar(loader, desc=desc, leave=False, main_process=main_process):
        with accelerator.autocast() if accelerator is not None else torch.autocast("cpu", enabled=False):
            chunks.append(model.image.encode(batch.to(device), normalize=False).float().cpu())
    return torch.cat(chunks)


def image_features(
    model: LoadedModel,
    split: Split,
    transform,
    *,
    views: int = 0,
    seed: int = 0,
    cache_dir: Optional[Path] = None,
    batch_size: int = 128,
    num_workers: int = 0,
    accelerator=None,
    desc: str = "features",
    images: Optional[Dataset] = None,
    memory: Optional[FeatureMemory] = None,
) -> torch.Tensor:
    """(N, D) features, or (views, N, D) when `views > 0` (each view seeded: same views every time).

    `images`: the split's images already decoded and transformed as `transform` would (the decoded-image
    cache); by default each file is decoded here. `memory`: the calling session's in-memory features, checked first.
    """
    precision = accelerator.mixed_precision if accelerator is not None else "no"
    key = cache_key(model, split, transform, views, seed, precision)
    recalled = memory.recall(key) if memory is not None else None
    if recalled is not None:
        return recalled
    path = Path(cache_dir) / f"features-{key}.safetensors" if cache_dir else None
    is_main = accelerator is None or accelerator.is_main_process
    shared = path is not None and accelerator is not None and accelerator.num_processes > 1
    if path is not None and _cached_everywhere(path, accelerator if shared else None):
        features = _load(path)
    elif shared and not is_main and path is not None:
        accelerator.wait_for_everyone()  # the main process computes and writes; the others read it
        features = _load(path)
    else:
        features = _compute(model, split, transform, views, seed, batch_size, num_workers, accelerator, desc, images)
        if path is not None:
            _store(path, features, desc)
        if shared:
            accelerator.wait_for_everyone()
    if features is None:  # another process's size limit removed the file between the check and the read
        features = _compute(model, split, transform, views, seed, batch_size, num_workers, accelerator, desc, images)
    if memory is not None:
        memory.remember(key, features)
    return features


def zeroshot_text_features(model: LoadedModel, classnames, templates, *, cache_dir: Optional[Path] = None,
                           memory: Optional[FeatureMemory] = None) -> torch.Tensor:
    """`zeroshot_weights` of the model's (frozen) text tower, read from `memory` or `cache_dir` when the same model,
    class names and templates were encoded before (by any process; each process computes a missing entry itself,
    and the atomic write makes concurrent writers safe). A thousand classes times 80 templates through a ViT-B
    text tower is minutes on a CPU: paid once."""
    dtype = next(model.clip.parameters()).dtype
    digest = hashlib.sha256("\0".join([model.spec.fingerprint(), str(dtype), *classnames, "", *templates]).encode())
    key = f"text-{digest.hexdigest()[:24]}"
    recalled = memory.recall(key) if memory is not None else None
    if recalled is not None:
        return recalled
    path = Path(cache_dir) / f"features-{key}.safetensors" if cache_dir else None
    weights = _load(path) if path is not None and path.is_file() else None
    if weights is None:
        weights = zeroshot_weights(model.text, classnames, templates)
        if path is not None:
            _store(path, weights, "zero-shot text features")
    weights = weights.to(model.text.device)
    if memory is not None:
        memory.remember(key, weights)
    return weights


def _cached_everywhere(path: Path, accelerator=None) -> bool:
    """Whether `path` is cached, agreed by all processes (`accelerator`) before any of them writes it: a process
    that looked only after a faster main process had written the file would skip the barrier the others wait at."""
    present = path.is_file()
    if accelerator is None:
        return present
    votes = accelerator.reduce(torch.tensor([float(present)], device=accelerator.device), "sum")
    return bool(votes.item() == accelerator.num_processes)


def _load(path: Path) -> Optional[torch.Tensor]:
    from safetensors.torch import load_file

    try:
        features = load_file(str(path))["features"]
    except FileNotFoundError:
        return None
    mark_used(path)
    return features


def _store(path: Path, features: torch.Tensor, desc: str) -> None:
    """Write atomically (readers never see half a file), then keep the cache folder within its size limit."""
    from cliptune.core.runfolder import atomic_save_safetensors

    atomic_save_safetensors(path, {"features": features})
    log.info("cached %s %s at %s", desc, tuple(features.shape), path)
    prune(path.parent)


def _compute(model: LoadedModel, split: Split, transform, views: int, seed: int, batch_size: int, num_workers: int,
             accelerator, desc: str, images: Optional[Dataset]) -> torch.Tensor:
    images = images if images is not None else ImageDataset(split, transform)
    if views == 0:
        with isolated_rng():  # a DataLoader draws its workers' base seed from the global generator
            return _encode(model, images, batch_size, num_workers, accelerator, desc)
    stacked = []
    for view in range(views):
        # the random transforms draw from the global generator: seeded per view, restored afterwards
        with isolated_rng(seed * 1000 + view + 1):
            stacked.append(_encode(model, images, batch_size, num_workers, accelerator, f"{desc} view {view + 1}/{views}"))
    return torch.stack(stacked)
