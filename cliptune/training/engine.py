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
from typing import Callable, Dict, List, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from cliptune.config.run import RunConfig
from cliptune.data.folders import loader_settings
from cliptune.core.errors import CliptuneError, InterruptedRun
from cliptune.methods.base import Method
from cliptune.core.metrics import classification_metrics
from cliptune.core.progress import progress_bar
from cliptune.core.runfolder import RunFolder, atomic_save_safetensors, atomic_torch_save, atomic_write_json, replace_dir
from cliptune.core.seeding import isolated_rng

log = logging.getLogger("cliptune")


@dataclass
class Inputs:
    """Either cached features ((N, D), or (views, N, D) with one view drawn per epoch) or an image dataset."""

    labels: torch.Tensor
    features: Optional[torch.Tensor] = None
    images: Optional[Dataset] = None  # ImageDataset (files) or DecodedImages (the decoded-image cache)

    def __len__(self) -> int:
        return int(self.labels.numel())


@dataclass
class TrainSummary:
    seconds: float = 0.0
    images_seen: int = 0
    epochs: int = 0
    best_epoch: Optional[int] = None
    history: List[Dict] = field(default_factory=list)
    eval_seconds: float = 0.0  # validation passes between epochs
    # micro-batches run by this `fit` call (after a resume: only the remaining ones)
    batches_run: int = 0


def build_optimizer(config: RunConfig, parameters, lr: Optional[float] = None):
    if not parameters:
        raise CliptuneError(f"method '{config.method}' has no trainable parameters")
    lr = config.lr if lr is None else lr
    if config.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=config.weight_decay, eps=config.adam_eps)
    if config.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.optimizer == "lion":
        from lion_pytorch import Lion

        return Lion(parameters, lr=lr, weight_decay=config.weight_decay)
    raise CliptuneError(f"unknown optimizer '{config.optimizer}' (available: adamw, sgd, lion)")


def cosine_with_warmup(optimizer, warmup_steps: int, total_steps: int, constant_steps: int = 0, constant_factor: float = 0.0,
                       min_factor: float = 0.0, steps_per_epoch: Optional[int] = None):
    """Cosine decay to `min_factor` x lr after a warm-up: `constant_steps` at `constant_factor` x lr (Dassl's
    WARMUP_TYPE constant), then `warmup_steps` of linear warm-up to the base lr, `(step + 1) / warmup_steps`
    as in wise-ft/FLYP/ZSCL `_warmup_lr` (src/models/utils.py:15-16).

    As in Dassl (ConstantWarmupScheduler around CosineAnnealingLR(T_max=max_epoch), WARMUP_RECOUNT), the
    cosine starts counting after the constant warm-up but keeps the whole budget as its period, so it
    does not quite reach zero when the constant warm-up is used. `steps_per_epoch` holds the lr for a whole
    epoch (Dassl steps its scheduler once per epoch: CoOp trainers/coop.py:281-282), so epoch e >= 1 trains at
    `lr * 0.5 * (1 + cos(pi * (e - 1) / epochs))`. `min_factor` is CosineAnnealingLR's `eta_min / lr`.
    """

    def factor(step: int) -> float:
        if steps_per_epoch:
            step -= step % steps_per_epoch
        if step < constant_steps:
            return constant_factor
        step -= constant_steps
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


WARMUP_SHARE = 0.2  # a linear warm-up never takes more than this share of the run's optimizer updates


def warmup_length(config: RunConfig, total_updates: int) -> int:
    """The run's linear warm-up: `config.warmup_steps`, capped at a fifth of the run (WiSE-FT's and FLYP's 500 steps
    are ~2 % of an ImageNet run; on a few-shot run of 50 updates they would never reach the lr)."""
    return min(config.warmup_steps, int(WARMUP_SHARE * total_updates))


def budget_lr_factor(config: RunConfig, updates_per_epoch: int) -> float:
    """How much a default lr is raised when `--steps` cuts the method's default budget.

    A step budget B below the method's default budget B0 (its default steps, or default epochs x
    updates per epoch) gets lr x min(10, sqrt(B0 / B)): fewer, larger steps, so that a CPU-sized
    budget still adapts (e.g. CLIP-LoRA's 2e-4 over 8000 steps becomes ~1.8e-3 over 100). Only when
    `config.scale_lr` (by default: the steps are yours, the lr is the method's default).
    """
    if not config.scale_lr or not config.steps:
        return 1.0
    from cliptune.methods import method_class

    defaults = method_class(config.method).training_defaults(config.shots)
    reference = defaults.get("steps") or defaults.get("epochs", RunConfig.epochs) * updates_per_epoch
    return min(10.0, math.sqrt(reference / config.steps)) if reference > config.steps else 1.0


def batches_per_epoch(config: RunConfig, train_size: int) -> int:
    """Micro-batches in one epoch; `drop_last` drops a last partial batch as Dassl's train loader does
    (`drop_last=is_train and len(data_source) >= batch_size`: dassl/data/data_manager.py:43)."""
    if config.drop_last and train_size >= config.batch_size:
        return train_size // config.batch_size
    return math.ceil(train_size / config.batch_size)


def updates_per_epoch(config: RunConfig, train_size: int) -> int:
    """Optimizer updates in one epoch: micro-batches grouped by gradient accumulation."""
    return math.ceil(batches_per_epoch(config, train_size) / config.grad_accum)


def training_length(config: RunConfig, train_size: int) -> tuple:
    """(epochs, micro-batches in the last epoch, optimizer updates in all) for `--epochs` or a `--steps` budget."""
    batches = batches_per_epoch(config, train_size)
    per_epoch = updates_per_epoch(config, train_size)
    if not config.steps:
        return config.epochs, batches, per_epoch * config.epochs
    epochs = math.ceil(config.steps / per_epoch)
    last_updates = config.steps - (epochs - 1) * per_epoch
    return epochs, min(batches, last_updates * config.grad_accum), config.steps


EVAL_SHARE = 0.2  # auto --eval-every keeps validation under about this share of training time


def eval_interval(config: RunConfig, train: Inputs, val: Optional[Inputs]) -> int:
    """Epochs between validation passes: `config.eval_every`, or the smallest N that keeps validation under ~20 %.

    Cost model: on cached features a validation pass is one small matrix product, so every epoch. On
    images a training image costs a forward and a backward (about 3 forwards) and a validation image one
    forward, so validating every N epochs costs n_val / (3 * n_train * N) of training:
    N = ceil(n_val / (3 * EVAL_SHARE * n_train)). The last epoch is always validated.
    """
    if config.eval_every is not None:
        return config.eval_every
    if val is None or val.features is not None or len(train) == 0:
        return 1
    return max(1, math.ceil(len(val) / (3 * EVAL_SHARE * len(train))))


class _EpochBatches:
    """A batch sampler whose batches are set per epoch, so one DataLoader (and its persistent workers) serves every epoch."""

    def __init__(self):
        self.batches: List[List[int]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


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
    def __init__(self, method: Method, config: RunConfig, run: Optional[RunFolder], accelerator,
                 on_validated: Optional[Callable[[int, float], None]] = None, resumable: bool = True):
        self.method = method
        self.on_validated = on_validated  # called with (epoch, val top-1) after each validation pass
        # False: no per-epoch checkpoints (a sweep trial is rerun, not resumed); the selected state is kept in memory
        # and written once at the end
        self.resumable = resumable
        self._best_state: Optional[Dict[str, torch.Tensor]] = None
        self.config = config
        self.run = run
        self.accelerator = accelerator
        self._loaders: Dict[int, tuple] = {}  # id(dataset) -> (dataset, DataLoader with persistent workers)
        # validation metrics of the best epoch so far, by epoch: the final report reuses them instead of a second pass
        self.validated: Dict[int, Dict] = {}
        self.earlier_seconds = (0.0, 0.0)  # training / validation seconds spent before a resume

    # ----- batching -----
    def _epoch_batches(self, n: int, epoch: int) -> List[torch.Tensor]:
        generator = torch.Generator().manual_seed(self.config.seed * 100_003 + epoch)
        order = torch.randperm(n, generator=generator)
        size = self.config.batch_size
        return [order[i : i + size] for i in range(0, n, size)][: batches_per_epoch(self.config, n)]

    def _view_choice(self, inputs: Inputs, epoch: int) -> Optional[torch.Tensor]:
        if inputs.features is None or inputs.features.dim() != 3:
            return None
        generator = torch.Generator().manual_seed(self.config.seed * 7_919 + epoch)
        return torch.randint(inputs.features.shape[0], (len(inputs),), generator=generator)

    def _local_batches(self, inputs: Inputs, batches: List[torch.Tensor], views: Optional[torch.Tensor], epoch: int = 0):
        """Yield (x, y) for this process's slice of each global batch."""
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        local = [b[rank::world] for b in batches]
        device = self.accelerator.device
        if inputs.features is not None:
            for index in local:
                x = inputs.features[views[index], index] if views is not None else inputs.features[index]
                yield x.to(device), inputs.labels[index].to(device)
            return
        images = inputs.images
        if not getattr(images, "random", True):  # decoded and deterministic: whole batches at once, no loader
            for index in local:
                yield images.batch(index).to(device), inputs.labels[index].to(device)
            return
        for x, y in self._loader(images, [b.tolist() for b in local], epoch):
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    def _loader(self, images, batches: List[List[int]], epoch: int) -> DataLoader:
        """The DataLoader of one epoch's batches, with the device's defaults (`loader_settings`).

        Without workers (CPU default) a fresh loader per epoch with its own generator: starting it draws
        nothing from the global RNG the augmentation uses, so a resumed epoch augments like the
        uninterrupted one. With workers, one loader for the whole fit keeps them alive between epochs;
        their augmentation is seeded once, so the run is reproducible but a mid-run resume is not bitwise.
        """
        settings = loader_settings(self.config.num_workers, self.accelerator.device)
        if settings["num_workers"] == 0:
            return DataLoader(images, batch_sampler=batches, generator=torch.Generator().manual_seed(self.config.seed * 1_009 + epoch),
                              **settings)
        if id(images) not in self._loaders or self._loaders[id(images)][0] is not images:
            loader = DataLoader(images, batch_sampler=_EpochBatches(), generator=torch.Generator().manual_seed(self.config.seed * 1_009),
                                **settings)
            self._loaders[id(images)] = (images, loader)
        loader = self._loaders[id(images)][1]
        loader.batch_sampler.batches = batches
        return loader

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
        elif not getattr(inputs.images, "random", True):  # decoded and deterministic: slices, no loader
            chunks = (inputs.images.batch(slice(i, i + size)) for i in range(0, len(inputs.images), size))
        else:
            settings = loader_settings(self.config.num_workers, self.accelerator.device)
            loader = DataLoader(inputs.images, batch_size=size, num_workers=settings["num_workers"], pin_memory=settings["pin_memory"])
            chunks = (x for x, _ in loader)
        for x in chunks:
            with self.accelerator.autocast():
                outputs.append(method(x.to(self.accelerator.device)).float().cpu())
        return torch.cat(outputs)

    def evaluate(self, inputs: Inputs, classes) -> Dict:
        return classification_metrics(self.predict(inputs), inputs.labels, classes)

    # ----- checkpoints -----
    def _save_last(self, state: Dict) -> None:
        if not self.accelerator.is_main_process or self.run is None or not self.resumable:
            return
        staging = self.run.checkpoints / ".last-staging"
        atomic_save_safetensors(staging / "trainable.safetensors", self._unwrapped().learned_state_dict())
        atomic_torch_save(staging / "state.pt", state)
        replace_dir(staging, self.run.checkpoints / "last")

    def save_best(self) -> None:
        if not self.accelerator.is_main_process or self.run is None:
            return
        save_method(self._unwrapped(), self.run.checkpoints / "best")

    def _keep_best(self) -> None:
        """The selected epoch's state: on disk (a resumable run), or in memory until `_finish`."""
        if self.resumable:
            self.save_best()
        else:
            self._best_state = self._unwrapped().learned_state_dict()

    def _unwrapped(self) -> Method:
        return self.accelerator.unwrap_model(self.model) if hasattr(self, "model") else self.method

    # ----- training -----
    def fit(self, train: Inputs, val: Optional[Inputs], classes, resume: bool = False) -> TrainSummary:
        """Train for `config.epochs` (or the epochs left in RUN/checkpoints/last with `resume`).

        Each epoch reseeds torch's global generators (augmentation, dropout); the caller's are restored afterwards."""
        with StopRequest() as self._stop, isolated_rng():
            return self._fit(train, val, classes, resume)

    def _fit(self, train: Inputs, val: Optional[Inputs], classes, resume: bool) -> TrainSummary:
        config, accelerator = self.config, self.accelerator
        preparing = time.perf_counter()
        self.method.prepare(train, val)
        prepare_seconds = time.perf_counter() - preparing  # fitting (e.g. the L-BFGS probe) is training time
        parameters = self.method.trainable_parameters()
        if not parameters:  # nothing to train (e.g. Tip-Adapter, an L-BFGS linear probe): fitted in prepare()
            self.model = self.method
            return self._finish(TrainSummary(seconds=prepare_seconds), val, trained=False)
        epochs, last_epoch_batches, total_updates = training_length(config, len(train))
        per_epoch = updates_per_epoch(config, len(train))
        lr = config.lr * budget_lr_factor(config, per_epoch)
        sources = config.sources
        log.info("%d trainable parameters; optimizer %s (set by %s), lr %g (set by %s)%s; %d optimizer steps",
                 sum(p.numel() for p in parameters), config.optimizer,
                 sources.get("optimizer", "engine defaults"), config.lr, sources.get("lr", "engine defaults"),
                 f" raised to {lr:g} for the --steps budget (--set scale_lr=false keeps it)" if lr != config.lr else "",
                 total_updates)
        optimizer = build_optimizer(config, parameters, lr)
        # warm-up epochs keep their share of the epoch budget when a --steps budget replaces it
        constant_steps = (round(config.steps * config.warmup_epochs / max(1, config.epochs)) if config.steps
                          else config.warmup_epochs * per_epoch)
        warmup = warmup_length(config, total_updates)
        if warmup < config.warmup_steps:
            log.info("warm-up of %d steps capped at %d, a fifth of the run's %d optimizer steps", config.warmup_steps, warmup,
                     total_updates)
        scheduler = cosine_with_warmup(optimizer, warmup, total_updates, constant_steps=constant_steps,
                                       constant_factor=config.warmup_lr / lr, min_factor=min(1.0, config.min_lr / lr),
                                       # a --steps budget has no epochs of the method's protocol to hold the lr for
                                       steps_per_epoch=per_epoch if config.lr_per_epoch and not config.steps else None)
        self.model, optimizer = accelerator.prepare(self.method, optimizer)
        every = eval_interval(config, train, val)
        if val is not None and len(val) and every > 1:
            log.info("validation every %d epochs and after the last (--eval-every)", every)
        summary = TrainSummary()
        start_epoch, start_step, best_top1 = 0, 0, -1.0
        resumed_rng, partial_loss = None, (0.0, 0)
        if resume:
            state = self._load_last(optimizer, scheduler)
            start_epoch, start_step, best_top1 = state["epoch"], state["step_in_epoch"], state["best_top1"]
            summary = TrainSummary(state["seconds"], state["images_seen"], state["epoch"], state["best_epoch"], state["history"],
                                   eval_seconds=state.get("eval_seconds", 0.0))
            resumed_rng = state["rng"]
            partial_loss = tuple(state.get("partial_loss", (0.0, 0)))
            log.info("resuming at epoch %d step %d", start_epoch + 1, start_step)
        self.earlier_seconds = (summary.seconds, summary.eval_seconds)  # spent before a resume (for this process's timings)
        summary.seconds += prepare_seconds

        for epoch in range(start_epoch, epochs):
            resuming_mid_epoch = epoch == start_epoch and start_step > 0
            if resuming_mid_epoch:
                set_rng_state(resumed_rng)
            else:  # inside fit's isolated_rng: the caller's generators are restored when training ends
                torch.manual_seed(config.seed * 1_000_003 + epoch)
            first_step = start_step if epoch == start_epoch else 0
            batches = self._epoch_batches(len(train), epoch)
            if epoch == epochs - 1:
                batches = batches[:last_epoch_batches]  # a --steps budget may end mid-epoch
            views = self._view_choice(train, epoch)
            self.model.train()
            began = time.perf_counter()
            loss_sum, seen = (partial_loss if resuming_mid_epoch else (0.0, 0))
            bar = progress_bar(total=len(batches), initial=first_step, desc=f"epoch {epoch + 1}/{epochs}",
                               main_process=accelerator.is_local_main_process, leave=False)
            stream = self._local_batches(train, batches[first_step:], views, epoch)
            for step, (x, y) in enumerate(stream, start=first_step):
                if train.images is not None and self.method.uses_image_features:
                    x = self._frozen_image_features(x)  # --aug-per-step: re-augmented images, frozen tower
                sync = (step + 1) % config.grad_accum == 0 or step == len(batches) - 1
                global_n = len(batches[step])
                # each image weighs 1/(images in its accumulation group): k micro-batches = one k-times batch
                group_start = step - step % config.grad_accum
                group_n = sum(len(b) for b in batches[group_start : group_start + config.grad_accum])
                with (accelerator.no_sync(self.model) if not sync else nullcontext()):
                    with accelerator.autocast():
                        logits = self.model(x)
                        # a loss that all-gathers the batch must run on every process, even on an empty slice
                        if len(y) or self._unwrapped().gathers_across_processes:
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
            self._unwrapped().after_epoch(epoch + 1)
            totals = accelerator.reduce(torch.tensor([loss_sum, seen], dtype=torch.float64, device=accelerator.device), "sum")
            record = {"epoch": epoch + 1, "loss": float(totals[0] / totals[1].clamp(min=1))}
            improved = True
            if val is not None and len(val):
                improved = config.select == "last"  # best-val: the best is chosen among validated epochs
                if (epoch + 1) % every == 0 or epoch + 1 == epochs:
                    evaluating = time.perf_counter()
                    result = self.evaluate(val, classes)
                    summary.eval_seconds += time.perf_counter() - evaluating
                    record["val_top1"] = result["top1"]
                    if self.on_validated is not None:
                        self.on_validated(epoch + 1, result["top1"])
                    if config.select == "best-val":
                        improved = record["val_top1"] > best_top1
                    best_top1 = max(best_top1, record["val_top1"])
                    if improved:
                        self.validated = {epoch + 1: result}
            if improved:
                summary.best_epoch = epoch + 1
                self._keep_best()
            summary.history.append(record)
            marker = (" (best)" if config.select == "best-val" else "") if improved else ""
            log.info("epoch %d/%d %s%s", epoch + 1, epochs,
                     " ".join(f"{k} {v:.4f}" for k, v in record.items() if k != "epoch"), marker)
            self._save_last(self._state(optimizer, scheduler, epoch + 1, 0, best_top1, summary, rng_state()))
            if self._stop.agreed(accelerator):
                raise InterruptedRun(f"interrupted after epoch {epoch + 1}; checkpoint saved, continue with --resume")
        accelerator.wait_for_everyone()
        return self._finish(summary, val, trained=True)

    def _finish(self, summary: TrainSummary, val: Optional[Inputs], trained: bool) -> TrainSummary:
        """Load the selected checkpoint, let the method replace it (`final_state`), and save the result as best."""
        method = self._unwrapped()
        if trained and self._best_state is not None:
            method.load_learned_state_dict(self._best_state)
        elif trained and self.run is not None:
            load_method_state(method, self.run.checkpoints / "best")
        final = method.final_state(val)
        if final is not None:
            method.load_learned_state_dict(final)
            self.validated = {}  # validation results of the selected epoch no longer describe the method
        if final is not None or not trained or not self.resumable:
            self.save_best()
        return summary

    @torch.no_grad()
    def _frozen_image_features(self, images: torch.Tensor) -> torch.Tensor:
        with self.accelerator.autocast():
            return self._unwrapped().model.image.encode(images, normalize=False).float()

    def _state(self, optimizer, scheduler, epoch, step_in_epoch, best_top1, summary: TrainSummary, rng) -> Dict:
        return {
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "best_top1": best_top1,
            "best_epoch": summary.best_epoch,
            "seconds": summary.seconds,
            "eval_seconds": summary.eval_seconds,
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
        self._unwrapped().load_learned_state_dict(load_file(str(folder / "trainable.safetensors")))
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
