"""What a run folder's checkpoints hold and how they are written: the method's learned state (`best/`, with a JSON
sidecar naming method and model) and the resumable training state (`last/`: weights, optimizer, scheduler, counters
and every RNG), each written to a staging folder and swapped in whole."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

import torch

from cliptune.core.errors import CliptuneError
from cliptune.core.runfolder import atomic_save_safetensors, atomic_torch_save, atomic_write_json, replace_dir
from cliptune.methods.base import Method


def rng_state() -> Dict:
    """Every generator training draws from on this process (CPU, and the GPUs when present)."""
    state: Dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])



def save_last(folder: Path, method: Method, state: Dict) -> None:
    """`folder` (a run's checkpoints/last) replaced whole: the learned weights and the training `state`."""
    staging = folder.with_name(".last-staging")
    atomic_save_safetensors(staging / "trainable.safetensors", method.learned_state_dict())
    atomic_torch_save(staging / "state.pt", state)
    replace_dir(staging, folder)


def load_last(folder: Path, method: Method, optimizer, scheduler) -> Dict:
    """Restore weights, optimizer and scheduler from `save_last`'s folder; returns the training state."""
    from safetensors.torch import load_file

    if not (folder / "state.pt").is_file():
        raise CliptuneError(f"nothing to resume: no {folder / 'state.pt'}")
    state = torch.load(folder / "state.pt", weights_only=True)
    method.load_learned_state_dict(load_file(str(folder / "trainable.safetensors")))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state


def training_state(optimizer, scheduler, epoch: int, step_in_epoch: int, best_score: float, summary) -> Dict:
    """What `--resume` needs beyond the weights: position, counters, history, optimizer/scheduler and RNG state."""
    return {
        "epoch": epoch,
        "step_in_epoch": step_in_epoch,
        "best_score": best_score,
        "best_epoch": summary.best_epoch,
        "seconds": summary.seconds,
        "eval_seconds": summary.eval_seconds,
        "images_seen": summary.images_seen,
        "history": json.loads(json.dumps(summary.history)),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
    }


def save_method(method: Method, folder: Path) -> None:
    """Learned parameters as safetensors plus a JSON sidecar naming the method and model."""
    spec = method.model.spec
    sidecar = {
        "method": method.name,
        "config": method.config.to_dict(),
        "classes": method.classnames,
        "model": spec.model,
        "pretrained": spec.pretrained,
        "model_config": spec.model_config,
    }
    atomic_save_safetensors(folder / "method.safetensors", method.learned_state_dict(), metadata={"method": method.name})
    atomic_write_json(folder / "method.json", sidecar)


def load_method_state(method: Method, folder: Path) -> None:
    from safetensors.torch import load_file

    path = folder / "method.safetensors"
    if not path.is_file():
        raise CliptuneError(f"no trained weights in {folder} (the run did not finish an epoch)")
    try:
        method.load_learned_state_dict(load_file(str(path)))
    except (CliptuneError, ValueError, RuntimeError) as exc:
        raise CliptuneError(f"saved weights in {folder} do not fit this model/method: {exc}") from None
