"""Decoded-image cache: every image is decoded and resized once and kept as a uint8 tensor.

Image-tower methods otherwise decode and resize every file at every epoch and every evaluation.

- Evaluation caches the deterministic, pixel-space part of CLIP's evaluation transform (resize the short
  side, centre crop) as uint8. Converting to float (/255) and normalising at use is the arithmetic of
  ToTensor + Normalize, so logits through the cache equal those of decoding each file, bit for bit.
- Training with augmentation caches a larger centre square (`TRAIN_MARGIN` x the input size, at most the
  smallest image's side) so that random resized crops still have pixels to choose from; each item is then
  the run's own training transform (random resized crop, flip, jitter, normalise) applied to the cached
  pixels, with the same RNG draws as from the file. The crops come from that square rather than the whole
  original image; for images no larger than it (nothing cut, nothing resampled) training through the
  cache is bitwise training from the files. Without augmentation training uses the evaluation cache.

Where (`--image-cache`): `memory` keeps the tensor in RAM; `disk` writes it once under the run's cache
folder (key as for cached features: the identity of the preprocessing plus every file's path, label,
size and mtime) and memory-maps it; `auto` (default) uses memory when the split takes at most
`MEMORY_SHARE` of the available RAM, else disk; `off` decodes each file at use.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from cliptune.data.folders import Split, split_key
from cliptune.core.progress import progress_bar
from cliptune.core.runfolder import atomic_write

log = logging.getLogger("cliptune")

MODES = ("auto", "memory", "disk", "off")
TRAIN_MARGIN = 1.15  # the training cache's side / the model's input side (224 -> 258, about CLIP's 256)
MEMORY_SHARE = 0.25  # auto: in memory when the split's tensor fits in this share of the available RAM


class _DecodeFiles(Dataset):
    """Each file decoded, passed through `geometry` (PIL in, PIL out) and returned as a (3, H, W) uint8 tensor."""

    def __init__(self, split: Split, geometry: Callable):
        self.split, self.geometry = split, geometry

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> torch.Tensor:
        from torchvision.transforms.functional import pil_to_tensor

        with Image.open(self.split.files[index]) as image:
            return pil_to_tensor(self.geometry(image.convert("RGB")))


class DecodedImages(Dataset):
    """A split's decoded uint8 images with their labels; items come out normalised like the file transforms.

    `augment` (PIL image -> normalised tensor: the training transform) makes items random; without it
    every item is deterministic and whole batches can be taken at once with `batch()`.
    """

    def __init__(self, pixels: torch.Tensor, labels: Sequence[int], mean, std, augment: Optional[Callable] = None):
        self.pixels = pixels
        self.labels = list(labels)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.augment = augment

    @property
    def random(self) -> bool:
        return self.augment is not None

    def __len__(self) -> int:
        return len(self.labels)

    def _normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        # exactly ToTensor's float conversion (x / 255) followed by Normalize's (x - mean) / std
        return (pixels.to(torch.float32).div(255) - self.mean) / self.std

    def __getitem__(self, index: int):
        if self.augment is not None:
            from torchvision.transforms.functional import to_pil_image

            return self.augment(to_pil_image(self.pixels[index])), self.labels[index]
        return self._normalise(self.pixels[index]), self.labels[index]

    def batch(self, index) -> torch.Tensor:
        """Normalised images `index` (a slice or index tensor) in one go; only without augmentation."""
        if self.augment is not None:
            raise RuntimeError("batch() needs a deterministic dataset (no augmentation)")
        return self._normalise(self.pixels[index])


def _available_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def choose_mode(mode: str, n_bytes: int, cache_dir: Optional[Path]) -> str:
    """memory, disk or off for a split of `n_bytes` under `--image-cache mode` (see the module docstring)."""
    if mode == "disk" and cache_dir is None:
        mode = "auto"  # no run folder (e.g. `cliptune eval`): keep it in memory when it fits
    if mode != "auto":
        return mode
    if n_bytes <= MEMORY_SHARE * _available_memory():
        return "memory"
    return "disk" if cache_dir is not None else "off"


def _decode_into(out: np.ndarray | torch.Tensor, split: Split, geometry: Callable, num_workers: int, desc: str,
                 main_process: bool) -> None:
    loader = DataLoader(_DecodeFiles(split, geometry), batch_size=64, num_workers=num_workers)
    start = 0
    for chunk in progress_bar(loader, desc=desc, leave=False, main_process=main_process):
        out[start : start + len(chunk)] = chunk.numpy() if isinstance(out, np.ndarray) else chunk
        start += len(chunk)


def decode_split(
    split: Split,
    geometry: Callable,
    size: Sequence[int],
    identity: Sequence[str],
    *,
    mode: str = "auto",
    cache_dir: Optional[Path] = None,
    num_workers: int = 0,
    accelerator=None,
    desc: str = "decoding",
) -> Optional[torch.Tensor]:
    """(N, 3, H, W) uint8 images of `split` after `geometry`, in memory or memory-mapped; None for `off`.

    `identity` names what `geometry` does (it goes into the disk cache's key with the file list).
    """
    n_bytes = len(split) * 3 * int(size[0]) * int(size[1])
    chosen = choose_mode(mode, n_bytes, cache_dir)
    if accelerator is not None and accelerator.num_processes > 1:  # one choice for all: disk mode synchronises them
        from accelerate.utils import broadcast_object_list

        chosen = broadcast_object_list([chosen])[0]
    if chosen == "off":
        return None
    main_process = accelerator is None or accelerator.is_local_main_process
    shape = (len(split), 3, int(size[0]), int(size[1]))
    began = time.perf_counter()
    if chosen == "memory":
        pixels = torch.empty(shape, dtype=torch.uint8)
        _decode_into(pixels, split, geometry, num_workers, desc, main_process)
    else:
        assert cache_dir is not None, "the disk image cache needs a folder"
        path = Path(cache_dir) / f"images-{split_key(list(identity) + [str(shape)], split)}.npy"
        is_main = accelerator is None or accelerator.is_main_process
        if not path.is_file() and is_main:

            def write(tmp: Path) -> None:
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
                _decode_into(out, split, geometry, num_workers, desc, main_process)
                out.flush()
                del out

            atomic_write(path, write)
        if accelerator is not None:
            accelerator.wait_for_everyone()  # the main process decodes and writes; the others map the file
        # copy-on-write mapping: writable for torch, never written back to the file
        pixels = torch.from_numpy(np.load(path, mmap_mode="c"))
    seconds = time.perf_counter() - began
    log.info("decoded %d images to %s uint8 (%s, %.1f MB) in %.1f s", len(split), "x".join(map(str, shape[1:])),
             chosen, n_bytes / 2**20, seconds)
    return pixels


def _short_side(path) -> int:
    with Image.open(path) as image:  # reads the header only, no decoding
        return min(image.size)


def train_size(image_size: Sequence[int], split: Split) -> tuple:
    """Size of the training cache's centre square: `TRAIN_MARGIN` x the model's input size, but never larger than
    the smallest image (upsampling adds no pixels to crop from, only a second resampling) nor smaller than the input."""
    smallest = min(_short_side(path) for path in split.files)
    return tuple(max(int(s), min(int(math.ceil(TRAIN_MARGIN * s)), smallest)) for s in image_size)
