"""The run folder: config.yaml, metrics.json, log.txt, checkpoints/ — every file written atomically.

`metrics.json` is written last, so a folder without it never looks like a finished run.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict

from cliptune.core.errors import CliptuneError

log = logging.getLogger("cliptune")


@functools.lru_cache(maxsize=1)
def _file_mode() -> int:
    """0o666 less the process umask: the mode `open()` would give a new file (mkstemp gives 0600)."""
    umask = os.umask(0)  # the only portable way to read it; restored at once
    os.umask(umask)
    return 0o666 & ~umask


def _atomic(path: Path, write: Callable[[Path], object]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, _file_mode())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Create `path` by `write(temporary path)` then a rename, so it is either absent or complete."""
    _atomic(path, write)


def atomic_write_text(path: Path, text: str) -> None:
    _atomic(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: Path, data: Dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def atomic_save_safetensors(path: Path, tensors: Dict[str, Any], metadata: Dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _atomic(path, lambda tmp: save_file(contiguous, str(tmp), metadata=metadata))


def atomic_torch_save(path: Path, obj: Any) -> None:
    import torch

    _atomic(path, lambda tmp: torch.save(obj, tmp))


def replace_dir(staging: Path, target: Path) -> None:
    """Swap a fully written staging folder into place, so readers never see a partial folder."""
    old = target.with_name(f".{target.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    if old.exists():
        shutil.rmtree(old)


class RunFolder:
    """Paths of one run, and the rules for (re)using an output folder."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    config = property(lambda self: self.root / "config.yaml")
    metrics = property(lambda self: self.root / "metrics.json")
    log_file = property(lambda self: self.root / "log.txt")
    checkpoints = property(lambda self: self.root / "checkpoints")
    cache = property(lambda self: self.root / "cache")

    def is_finished(self) -> bool:
        return self.metrics.is_file()

    def has_started(self) -> bool:
        """True once training wrote a checkpoint (a failed start leaves nothing worth resuming)."""
        return (self.checkpoints / "last").is_dir()

    def check_reusable(self, overwrite: bool = False, resume: bool = False) -> None:
        """Refuse to clobber a finished run unless asked; refuse to mix a new run into a started one."""
        if resume:
            if not self.config.is_file():
                raise CliptuneError(f"nothing to resume in {self.root} (no config.yaml)")
            if self.is_finished() and not overwrite:
                raise CliptuneError(f"{self.root} already holds a finished run; nothing to resume")
            if not self.has_started():
                raise CliptuneError(f"nothing to resume in {self.root}: it stopped before its first checkpoint; "
                                    "start it again without --resume")
            return
        if self.is_finished() and not overwrite:
            raise CliptuneError(f"{self.root} already holds a finished run (metrics.json); pass --overwrite to replace it")
        if self.has_started() and not overwrite:
            raise CliptuneError(f"{self.root} holds an unfinished run; pass --resume to continue it or --overwrite to start over")
        if self.root.exists() and not self.root.is_dir():
            raise CliptuneError(f"--out {self.root} exists and is not a folder")
        if self.root.is_dir() and any(self.root.iterdir()) and not self.config.is_file():
            raise CliptuneError(f"--out {self.root} is not empty and is not a cliptune run folder; choose another folder")

    def prepare(self, overwrite: bool = False, resume: bool = False) -> None:
        """Make the folder ready to write (after `check_reusable`): clear it unless resuming."""
        self.check_reusable(overwrite=overwrite, resume=resume)
        if resume:
            return
        if self.root.exists():
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def log_to_file(self, enabled: bool = True):
        """Within `with`, cliptune's log also goes to RUN/log.txt (on the main process: `enabled`)."""
        if not enabled:
            yield
            return
        handler = logging.FileHandler(self.log_file)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger = logging.getLogger("cliptune")
        logger.addHandler(handler)
        try:
            yield
        finally:
            logger.removeHandler(handler)
            handler.close()


def read_json(path: Path) -> Dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CliptuneError(f"could not read {path}: {exc}") from None
