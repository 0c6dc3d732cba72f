"""Progress bars: tqdm on the local main process only, and none at all with `--quiet`."""

from __future__ import annotations

from tqdm.auto import tqdm

ENABLED = True


def progress_bar(iterable=None, *, main_process: bool = True, **kwargs):
    return tqdm(iterable, disable=not (ENABLED and main_process), **kwargs)
