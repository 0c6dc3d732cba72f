"""Console output: tqdm progress bars on the local main process only (none with `--quiet`), and the marker
for log records that are results."""

from __future__ import annotations

import logging

from tqdm.auto import tqdm

# Progress bars are shown while this logger is enabled for INFO (the default); `--quiet`, or a library
# user, turns them off through ordinary logging configuration: logging.getLogger("cliptune.progress").setLevel(WARNING).
PROGRESS_LOGGER = logging.getLogger("cliptune.progress")
PROGRESS_LOGGER.setLevel(logging.INFO)
# `log.info(..., extra=RESULT)`: a result that the command prints on stdout; the CLI's console log skips it
# (it still reaches RUN/log.txt and any handler a library user adds), so results appear once.
RESULT = {"result": True}


def progress_bar(iterable=None, *, main_process: bool = True, **kwargs):
    return tqdm(iterable, disable=not (main_process and PROGRESS_LOGGER.isEnabledFor(logging.INFO)), **kwargs)
