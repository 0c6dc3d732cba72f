"""Console output: tqdm progress bars on the local main process only (none with `--quiet`), and the marker
for log records that are results."""

from __future__ import annotations

from tqdm.auto import tqdm

ENABLED = True
# `log.info(..., extra=RESULT)`: a result that the command prints on stdout; the CLI's console log skips it
# (it still reaches RUN/log.txt and any handler a library user adds), so results appear once.
RESULT = {"result": True}


def progress_bar(iterable=None, *, main_process: bool = True, **kwargs):
    return tqdm(iterable, disable=not (ENABLED and main_process), **kwargs)
