"""Seeded work that leaves the caller's random generators as they were.

torchvision's random transforms, `nn.init` and dropout draw from torch's global generators, so the
reproducible parts of cliptune (random initialisation, augmented feature views, each training epoch)
seed those. They do so inside `isolated_rng`, a `torch.random.fork_rng`: the numbers drawn inside are
exactly those of a plain `torch.manual_seed(seed)`, and afterwards the global generators are back to
the caller's state, so a program that imports cliptune keeps its own random sequence.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch


def _initialised_gpus() -> list:
    """The CUDA devices whose generators to restore: all of them once CUDA is initialised (torch.manual_seed
    seeds every GPU), none before (asking for their state would initialise CUDA)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return list(range(torch.cuda.device_count()))
    return []


@contextmanager
def isolated_rng(seed: Optional[int] = None) -> Iterator[None]:
    """Within `with`: torch's global generators, seeded with `seed` when given (as `torch.manual_seed`);
    afterwards: the CPU generator, and the GPUs' once CUDA is initialised, as they were before `with`."""
    with torch.random.fork_rng(devices=_initialised_gpus()):
        if seed is not None:
            torch.manual_seed(seed)
        yield
