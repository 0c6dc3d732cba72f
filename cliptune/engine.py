"""The one training loop every method shares, on `accelerate`.

Batches are drawn from a seeded per-epoch permutation of the whole training set; each process
takes its slice of every global batch and scales its loss so that, after DDP's gradient averaging,
the update equals the single-process update for the same global batch. Epoch-level and Ctrl-C
checkpoints store the RNG state, so `--resume` continues to the same result.

Ctrl-C does not interrupt the code wherever it happens to be (half-way through an optimizer step the
weights, the optimizer state and the step counter would disagree): it is recorded and honoured at
the next optimizer-step boundary, where the checkpoint is exactly the state of the uninterrupted run.
A second Ctrl-C stops at once, keeping the last consistent checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch.utils.data import DataLoader

from cliptune.config import RunConfig
from cliptune.data import ImageDataset
from cliptune.errors import CliptuneError, InterruptedRun
from cliptune.methods.base import Method
from cliptune.metrics import classification_metrics
from cliptune.progress import progress_bar
from cliptune.runfolder import RunFolder, atomic_save_safetensors, atomic_torch_save, atomic_write_json, replace_dir

log = logging.getLogger("cliptune")


@dataclass
class Inputs:
    """Either cached features ((N, D), or (views, N, D) with one view drawn per epoch) or an image dataset."""

    labels: torch.Tensor
    features: Optional[torch.Tensor] = None
    images: Optional[ImageDataset] = None

    def __len__(self) -> int:
        return int(self.labels.numel())


@dataclass
class TrainSummary:
    seconds: float = 0.0
    images_seen: int = 0
    epochs: int = 0
    best_epoch: Optional[int] = None
    history: List[Dict] = field(default_factory=list)
    # micro-batches run by this `fit` call (after a resume: only the remaining ones)
    batches_run: int = 0


def build_optimizer(config: RunConfig, parameters):
    if not parameters:
        raise CliptuneError(f"method '{config.method}' has no trainable parameters")
    if config.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.optimizer == "lion":
        from lion_pytorch import Lion

        return Lion(parameters, lr=config.lr, weight_decay=config.weight_decay)
    raise CliptuneError(f"unknown optimizer '{config.optimizer}' (available: adamw, sgd, lion)")


def cosine_with_warmup(optimizer, warmup_steps: int, total_steps: int):
    """Linear warmup to the base lr, then cosine decay to zero."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def rng_state() -> Dict:
    """Every generator training draws from on this process (CPU, and the GPUs when present)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class StopRequest:
    """Within `with`, Ctrl-C (SIGINT) sets `requested` instead of raising; a second one raises at once."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("stopping at the end of this optimizer step (Ctrl-C again to stop at once, losing it)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def agreed(self, accelerator) -> bool:
        """True when any process was asked to stop (all of them must stop at the same step)."""
        if accelerator.num_processes == 1:
            return self.requested
        flag = torch.tensor([float(self.requested)], device=accelerator.device)
        return bool(accelerator.reduce(flag, "sum").item() > 0)


class Trainer:
    def __init__(self, method: Method, config: RunConfig, run: Optional[RunFolder], accelerator):
        self.method = method
        self.config = config
        self.run = run
        self.accelerator = accelerator

    # ----- batching -----
    def _epoch_batches(self, n: int, epoch: int) -> List[torch.Tensor]:
        generator = torch.Generator().manual_seed(self.config.seed * 100_003 + epoch)
        order = torch.randperm(n, generator=generator)
        return [order[i : i + self.config.batch_size] for i in range(0, n, self.config.batch_size)]

    def _view_choice(self, inputs: Inputs, epoch: int) -> Optional[torch.Tensor]:
        if inputs.features is None or inputs.features.dim() != 3:
            return None
        generator = torch.Generator().manual_seed(self.config.seed * 7_919 + epoch)
        return torch.randint(inputs.features.shape[0], (len(inputs),), generator=generator)

    def _local_batches(self, inputs: Inputs, batches: List[torch.Tensor], views: Optional[torch.Tensor], mid_epoch: bool):
        """Yield (x, y) for this process's slice of each global batch."""
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        local = [b[rank::world] for b in batches]
        device = self.accelerator.device
        if inputs.features is not None:
            for index in local:
                x = inputs.features[views[index], index] if views is not None else inputs.features[index]
                yield x.to(device), inputs.labels[index].to(device)
            return
        # A starting loader draws its workers' seed from the global RNG that augmentation and dropout use. An
        # epoch resumed mid-way drew it before its checkpoint's RNG state, so it must not draw it again (or
        # every later number would shift): it gets a generator of its own.
        own = torch.Generator().manual_seed(self.config.seed) if mid_epoch else None
        loader = DataLoader(inputs.images, batch_sampler=[b.tolist() for b in local], num_workers=self.config.num_workers,
                            generator=own)
        for x, y in loader:
            yield x.to(device), y.to(device)

    # ----- evaluation -----
    @torch.no_grad()
    def predict(self, inputs: Inputs) -> torch.Tensor:
        method = self.accelerator.unwrap_model(self.model) if hasattr(self, "model") else self.method
        method.eval()
        outputs = []
        size = self.config.eval_batch_size
        if inputs.features is not None:
            features = inputs.features if inputs.features.dim() == 2 else inputs.features[0]
            chunks = (features[i : i + size] for i in range(0, len(features), size))
        else:
            chunks = (x for x, _ in DataLoader(inputs.images, batch_size=size, num_workers=self.config.num_workers))
        for x in chunks:
            with self.accelerator.autocast():
                outputs.append(method(x.to(self.accelerator.device)).float().cpu())
        return torch.cat(outputs)

    def evaluate(self, inputs: Inputs, classes) -> Dict:
        return classification_metrics(self.predict(inputs), inputs.labels, classes)

    # ----- checkpoints -----
    def _save_last(self, state: Dict) -> None:
        if not self.accelerator.is_main_process or self.run is None:
            return
        staging = self.run.checkpoints / ".last-staging"
        atomic_save_safetensors(staging / "trainable.safetensors", self._unwrapped().trainable_state_dict())
        atomic_torch_save(staging / "state.pt", state)
        replace_dir(staging, self.run.checkpoints / "last")

    def save_best(self) -> None:
        if not self.accelerator.is_main_process or self.run is None:
            return
        save_method(self._unwrapped(), self.run.checkpoints / "best")

    def _unwrapped(self) -> Method:
        return self.accelerator.unwrap_model(self.model)

    # ----- training -----
    def fit(self, train: Inputs, val: Optional[Inputs], classes, resume: bool = False) -> TrainSummary:
        """Train for `config.epochs` (or the epochs left in RUN/checkpoints/last with `resume`)."""
        with StopRequest() as self._stop:
            return self._fit(train, val, classes, resume)

    def _fit(self, train: Inputs, val: Optional[Inputs], classes, resume: bool) -> TrainSummary:
        config, accelerator = self.config, self.accelerator
        steps_per_epoch = math.ceil(len(train) / config.batch_size)
        updates_per_epoch = math.ceil(steps_per_epoch / config.grad_accum)
        optimizer = build_optimizer(config, self.method.trainable_parameters())
        scheduler = cosine_with_warmup(optimizer, config.warmup_steps, updates_per_epoch * config.epochs)
        self.model, optimizer = accelerator.prepare(self.method, optimizer)
        summary = TrainSummary()
        start_epoch, start_step, best_top1 = 0, 0, -1.0
        resumed_rng, partial_loss = None, (0.0, 0)
        if resume:
            state = self._load_last(optimizer, scheduler)
            start_epoch, start_step, best_top1 = state["epoch"], state["step_in_epoch"], state["best_top1"]
            summary = TrainSummary(state["seconds"], state["images_seen"], state["epoch"], state["best_epoch"], state["history"])
            resumed_rng = state["rng"]
            partial_loss = tuple(state.get("partial_loss", (0.0, 0)))
            log.info("resuming at epoch %d step %d", start_epoch + 1, start_step)

        for epoch in range(start_epoch, config.epochs):
            resuming_mid_epoch = epoch == start_epoch and start_step > 0
            if resuming_mid_epoch:
                set_rng_state(resumed_rng)
            else:
                torch.manual_seed(config.seed * 1_000_003 + epoch)
            first_step = start_step if epoch == start_epoch else 0
            batches = self._epoch_batches(len(train), epoch)
            views = self._view_choice(train, epoch)
            self.model.train()
            began = time.perf_counter()
            loss_sum, seen = (partial_loss if resuming_mid_epoch else (0.0, 0))
            bar = progress_bar(total=len(batches), initial=first_step, desc=f"epoch {epoch + 1}/{config.epochs}",
                               main_process=accelerator.is_local_main_process, leave=False)
            stream = self._local_batches(train, batches[first_step:], views, resuming_mid_epoch)
            for step, (x, y) in enumerate(stream, start=first_step):
                sync = (step + 1) % config.grad_accum == 0 or step == len(batches) - 1
                global_n = len(batches[step])
                # each image weighs 1/(images in its accumulation group): k micro-batches = one k-times batch
                group_start = step - step % config.grad_accum
                group_n = sum(len(b) for b in batches[group_start : group_start + config.grad_accum])
                with (accelerator.no_sync(self.model) if not sync else nullcontext()):
                    with accelerator.autocast():
                        logits = self.model(x)
                        if len(y):
                            loss = self._unwrapped().loss(logits, y, config.label_smoothing)
                            scaled = loss * (len(y) / group_n) * accelerator.num_processes
                        else:  # an empty slice of a tiny last batch still joins the all-reduce
                            loss, scaled = logits.sum() * 0, logits.sum() * 0
                    accelerator.backward(scaled)
                loss_sum += float(loss.detach()) * len(y)
                seen += len(y)
                summary.images_seen += global_n
                summary.batches_run += 1
                if sync:
                    if config.max_grad_norm:
                        accelerator.clip_grad_norm_(self.method.trainable_parameters(), config.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    self._unwrapped().after_optimizer_step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum / max(1, seen):.4f}")
                # Ctrl-C: stop here, where the state is whole (in the last step: after the epoch's checkpoint)
                if sync and step + 1 < len(batches) and self._stop.agreed(accelerator):
                    bar.close()
                    summary.seconds += time.perf_counter() - began
                    state = self._state(optimizer, scheduler, epoch, step + 1, best_top1, summary, rng_state())
                    state["partial_loss"] = [loss_sum, seen]
                    self._save_last(state)
                    raise InterruptedRun(f"interrupted in epoch {epoch + 1}; checkpoint saved, continue with --resume")
            bar.close()
            summary.seconds += time.perf_counter() - began
            summary.epochs = epoch + 1
            totals = accelerator.reduce(torch.tensor([loss_sum, seen], dtype=torch.float64, device=accelerator.device), "sum")
            record = {"epoch": epoch + 1, "loss": float(totals[0] / totals[1].clamp(min=1))}
            improved = True
            if val is not None and len(val):
                record["val_top1"] = self.evaluate(val, classes)["top1"]
                improved = record["val_top1"] > best_top1
                best_top1 = max(best_top1, record["val_top1"])
            if improved:
                summary.best_epoch = epoch + 1
                self.save_best()
            summary.history.append(record)
            log.info("epoch %d/%d %s%s", epoch + 1, config.epochs,
                     " ".join(f"{k} {v:.4f}" for k, v in record.items() if k != "epoch"), " (best)" if improved else "")
            self._save_last(self._state(optimizer, scheduler, epoch + 1, 0, best_top1, summary, rng_state()))
            if self._stop.agreed(accelerator):
                raise InterruptedRun(f"interrupted after epoch {epoch + 1}; checkpoint saved, continue with --resume")
        accelerator.wait_for_everyone()
        return summary

    def _state(self, optimizer, scheduler, epoch, step_in_epoch, best_top1, summary: TrainSummary, rng) -> Dict:
        return {
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "best_top1": best_top1,
            "best_epoch": summary.best_epoch,
            "seconds": summary.seconds,
            "images_seen": summary.images_seen,
            "history": json.loads(json.dumps(summary.history)),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng,
        }

    def _load_last(self, optimizer, scheduler) -> Dict:
        from safetensors.torch import load_file

        folder = self.run.checkpoints / "last" if self.run is not None else None
        if folder is None or not (folder / "state.pt").is_file():
            raise CliptuneError(f"nothing to resume: no {folder / 'state.pt' if folder else 'run folder'}")
        state = torch.load(folder / "state.pt", weights_only=True)
        self._unwrapped().load_trainable_state_dict(load_file(str(folder / "trainable.safetensors")))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        return state


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
    atomic_save_safetensors(folder / "method.safetensors", method.trainable_state_dict(), metadata={"method": method.name})
    atomic_write_json(folder / "method.json", sidecar)


def load_method_state(method: Method, folder: Path) -> None:
    from safetensors.torch import load_file

    path = folder / "method.safetensors"
    if not path.is_file():
        raise CliptuneError(f"no trained weights in {folder} (the run did not finish an epoch)")
    try:
        method.load_trainable_state_dict(load_file(str(path)))
    except (ValueError, RuntimeError) as exc:
        raise CliptuneError(f"saved weights in {folder} do not fit this model/method: {exc}") from None
