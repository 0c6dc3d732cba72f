"""Figures without process-wide state: every plot is a `matplotlib.figure.Figure` object.

matplotlib's stateful interface (`plt`) keeps a registry of open figures and selects a backend for the
whole process, which would change the plotting of a notebook or program that imports cliptune. A bare `Figure` needs
neither: `savefig` renders it with the Agg renderer its file format asks for, and it is freed like any
other object. Every figure cliptune writes goes through `save_figure` (a file, written atomically) or
`png_bytes` (embedded in an HTML report); both render through `_render`, so all figures are saved alike.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Tuple


def new_figure(figsize: Tuple[float, float], nrows: int = 1, ncols: int = 1) -> Tuple[Any, Any]:
    """(figure, axes) as `plt.subplots(nrows, ncols, figsize=figsize)` gives them, without its figure registry."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=figsize)
    return figure, figure.subplots(nrows, ncols)


def _render(figure, target, fmt: str, **savefig_options) -> None:
    figure.savefig(target, format=fmt, **savefig_options)


def save_figure(figure, path: str | Path, **savefig_options) -> None:
    """Write `figure` to `path` in the format its suffix names (png when none): to a temporary file in the
    same folder, then a rename, so `path` is either absent, the previous figure or the complete new one."""
    from cliptune.core.runfolder import atomic_write

    fmt = Path(path).suffix.lstrip(".") or "png"
    atomic_write(Path(path), lambda tmp: _render(figure, tmp, fmt, **savefig_options))


def png_bytes(figure, **savefig_options) -> bytes:
    """`figure` as the bytes of a PNG file (for figures embedded in a page rather than saved)."""
    buffer = io.BytesIO()
    _render(figure, buffer, "png", **savefig_options)
    return buffer.getvalue()
