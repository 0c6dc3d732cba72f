"""The feature cache that runs share: where it lives and how large it may grow.

Frozen-tower image features are cached under a key of the model (weights files, or a random init's seed), the
preprocessing and every file of the split (path, label, size, mtime), and a run's zero-shot head under a key of
the model, the class names and the templates, so any run, `compare` cell or `sweep` trial on the same data and
model reuses them, in this process or a later one. Files are written atomically
(readers never see half a file) and the least recently used are removed once the folder passes its size limit.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from cliptune.core.errors import CliptuneError

CACHE_ENV = "CLIPTUNE_CACHE"  # the cache folder (default: $XDG_CACHE_HOME/cliptune, else ~/.cache/cliptune)
LIMIT_ENV = "CLIPTUNE_CACHE_GB"  # its size limit in GB (default 20)
DEFAULT_LIMIT_GB = 20.0
RUN_LOCAL = "run"  # `cache_dir: run`: keep the features in the run's own cache/ (nothing shared)


def user_cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cliptune"


def feature_cache(setting: Optional[str], run_cache: Path) -> Path:
    """The folder a run caches features in (image features and its zero-shot head): `setting` (a path), the run's own
    cache for "run", else the user cache's `features/`."""
    if setting == RUN_LOCAL:
        return run_cache
    return Path(setting) if setting else user_cache_dir() / "features"


def limit_bytes() -> int:
    value = os.environ.get(LIMIT_ENV) or str(DEFAULT_LIMIT_GB)
    try:
        return int(float(value) * 1e9)
    except ValueError:
        raise CliptuneError(f"{LIMIT_ENV}={value!r} is not a number of gigabytes") from None


def mark_used(path: Path) -> None:
    """Refresh a cached file's time, so the size limit removes the least recently used first."""
    try:
        os.utime(path)
    except OSError:
        pass  # removed by another process in the meantime: the caller has already read it


def prune(folder: Path, limit: Optional[int] = None, pattern: str = "features-*.safetensors") -> list:
    """Remove the least recently used cache files until the folder holds at most `limit` bytes; returns them."""
    limit = limit_bytes() if limit is None else limit
    entries = []
    for path in folder.glob(pattern):
        try:
            stat = path.stat()
        except FileNotFoundError:
            continue  # another process pruned it
        entries.append((stat.st_mtime, stat.st_size, path))
    total, removed = sum(size for _, size, _ in entries), []
    for _, size, path in sorted(entries):
        if total <= limit:
            break
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        total -= size
        removed.append(path)
    return removed
