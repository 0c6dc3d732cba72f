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

import logging
import math
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cliptune.config.run import RunConfig
from cliptune.data.folders import loader_settings
from cliptune.core.errors import CliptuneError, InterruptedRun
from cliptune.methods.base import Method
from cliptune.core.metrics import classification_metrics, headline, score
from cliptune.core.progress import progress_bar
from cliptune.core.runfolder import RunFolder
from cliptune.core.seeding import isolated_rng
from cliptune.training.checkpoints import load_last, load_method_state, save_last, save_method, set_rng_state, training_state
from cliptune.training.optim import batches_per_epoch, build_optimizer, build_schedule, training_length

log = logging.getLogger("cliptune")


@dataclass
class Inputs:
    """Either cached features ((N, D), or (views, N, D) with one view drawn per epoch) or an image dataset."""

    labels: torch.Tensor
    features: Optional[torch.Tensor] = None
    images: Optional[Dataset] = None  # ImageDataset (files) or DecodedImages (the decoded-image cache)
    captions: Optional[List[Optional[str]]] = None  # each image's caption (None: it has none), when the data has any

    def __len__(self) -> int:
        return int(self.labels.shape[0])


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


EVAL_SHARE = 0.2  # auto --eval-every keeps validation under about this share of training time


def doubling(epoch: int) -> bool:
    """Epochs 1, 2, 4, 8, ...: a sparse validation cadence (what a sweep's pruner reads)."""
    return epoch & (epoch - 1) == 0


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
                 on_validated: Optional[Callable[[int, float], None]] = None, resumable: bool = True,
                 sparse_validation: bool = False, tracker_step_offset: int = 0):
        self.method = method
        # added to the optimizer step of every tracker record (a continual run's tasks log on one axis)
        self.tracker_step_offset = tracker_step_offset
        # what trains: the method as the accelerator prepared it (`_start`; e.g. wrapped in DDP), `method` inside it
        self.model: nn.Module = method
        self.on_validated = on_validated  # called with (epoch, val --metric score) after each validation pass
        # False: no per-epoch checkpoints (a sweep trial is rerun, not resumed); the selected state is kept in memory
        # and written once at the end
        self.resumable = resumable
        # True: a run that selects its latest epoch validates only on `doubling` epochs and the last (its result does
        # not depend on validation; a sweep's pruner reads no other epoch)
        self.sparse_validation = sparse_validation
        self._best_state: Optional[Dict[str, torch.Tensor]] = None
        self.config = config
        self.run = run
        self.accelerator = accelerator
        self._loaders: Dict[int, tuple] = {}  # id(dataset) -> (dataset, DataLoader with persistent workers)
        # validation logits of the selected epoch so far, by epoch: the final report scores them instead of a second pass
        self.validated: Dict[int, torch.Tensor] = {}
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
        """Yield (x, y, the rows of `inputs` they are) for this process's slice of each global batch."""
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        local = [b[rank::world] for b in batches]
        device = self.accelerator.device
        if inputs.features is not None:
            for index in local:
                x = inputs.features[views[index], index] if views is not None else inputs.features[index]
                yield x.to(device), inputs.labels[index].to(device), index
            return
        images: Any = inputs.images  # ImageDataset or DecodedImages
        if not getattr(images, "random", True):  # decoded and deterministic: whole batches at once, no loader
            for index in local:
                yield images.batch(index).to(device), inputs.labels[index].to(device), index
            return
        for (x, _), index in zip(self._loader(images, [b.tolist() for b in local], epoch), local):
            # the labels of `inputs`, not the dataset's: multi-label targets are rows of a tensor
            yield x.to(device, non_blocking=True), inputs.labels[index].to(device, non_blocking=True), index

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
        method = self.method
        method.eval()
        outputs = []
        size = self.config.eval_batch_size
        images: Any = inputs.images  # ImageDataset or DecodedImages, when there are no features
        if inputs.features is not None:
            features = inputs.features if inputs.features.dim() == 2 else inputs.features[0]
            chunks = (features[i : i + size] for i in range(0, len(features), size))
        elif not getattr(images, "random", True):  # decoded and deterministic: slices, no loader
            chunks = (images.batch(slice(i, i + size)) for i in range(0, len(images), size))
        else:
            settings = loader_settings(self.config.num_workers, self.accelerator.device)
            loader = DataLoader(images, batch_size=size, num_workers=settings["num_workers"], pin_memory=settings["pin_memory"])
            chunks = (x for x, _ in loader)
        for x in chunks:
            with self.accelerator.autocast():
                outputs.append(method(x.to(self.accelerator.device)).float().cpu())
        return torch.cat(outputs)

    def evaluate(self, inputs: Inputs, classes, thresholds=None) -> Dict:
        """Metrics of `inputs` (multi-label: at per-class `thresholds`, else fitted on these images)."""
        return classification_metrics(self.predict(inputs), inputs.labels, classes, thresholds=thresholds)

    # ----- checkpoints -----
    def _save_last(self, state: Dict) -> None:
        if self.accelerator.is_main_process and self.run is not None and self.resumable:
            save_last(self.run.checkpoints / "last", self.method, state)

    def save_best(self) -> None:
        if self.accelerator.is_main_process and self.run is not None:
            save_method(self.method, self.run.checkpoints / "best")

    def _keep_best(self, fit: "_Fit") -> None:
        """The selected epoch's state: on disk (a resumable run), else in memory until `_finish`, where a run that
        selects its latest epoch (`select: last`, or no val) needs no copy: training ends with that state."""
        if self.resumable:
            self.save_best()
        elif not fit.selects_latest:
            self._best_state = self.method.learned_state_dict()

    # ----- training -----
    def fit(self, train: Inputs, val: Optional[Inputs], classes, resume: bool = False) -> TrainSummary:
        """Train for `config.epochs` (or the epochs left in RUN/checkpoints/last with `resume`).

        Each epoch reseeds torch's global generators (augmentation, dropout); the caller's are restored afterwards."""
        with StopRequest() as self._stop, isolated_rng():
            preparing = time.perf_counter()
            self.method.prepare(train, val)
            prepare_seconds = time.perf_counter() - preparing  # fitting (e.g. the L-BFGS probe) is training time
            if not self.method.trainable_parameters():  # nothing to train (Tip-Adapter, an L-BFGS probe): fitted in prepare()
                return self._finish(TrainSummary(seconds=prepare_seconds), val, trained=False)
            fit = self._start(train, val, resume)
            fit.summary.seconds += prepare_seconds
            for epoch in range(fit.start_epoch, fit.epochs):
                loss = self._train_epoch(fit, train, epoch)
                self._end_epoch(fit, val, classes, epoch, loss)
            self.accelerator.wait_for_everyone()
            return self._finish(fit.summary, val, trained=True)

    def _start(self, train: Inputs, val: Optional[Inputs], resume: bool) -> "_Fit":
        """Optimizer, schedule and length of the run, on the accelerator; with `resume`, where the last checkpoint left off."""
        config, accelerator = self.config, self.accelerator
        parameters = self.method.trainable_parameters()
        epochs, last_epoch_batches, total_updates = training_length(config, len(train))
        sources = config.sources
        log.info("%d trainable parameters; optimizer %s (set by %s), lr %g (set by %s); %d optimizer steps",
                 sum(p.numel() for p in parameters), config.optimizer, sources.get("optimizer", "engine defaults"),
                 config.lr, sources.get("lr", "engine defaults"), total_updates)
        optimizer = build_optimizer(config, parameters)
        scheduler = build_schedule(config, optimizer, len(train))
        self.model, optimizer = accelerator.prepare(self.method, optimizer)
        every = eval_interval(config, train, val)
        if val is not None and len(val) and every > 1:
            log.info("validation every %d epochs and after the last (--eval-every)", every)
        fit = _Fit(optimizer, scheduler, epochs, last_epoch_batches, every, TrainSummary(),
                   selects_latest=config.select == "last" or val is None or not len(val))
        if resume:
            if self.run is None:
                raise CliptuneError("nothing to resume: no run folder")
            state = load_last(self.run.checkpoints / "last", self.method, optimizer, scheduler)
            fit.start_epoch, fit.start_step, fit.best_score = state["epoch"], state["step_in_epoch"], state["best_score"]
            fit.summary = TrainSummary(state["seconds"], state["images_seen"], state["epoch"], state["best_epoch"], state["history"],
                                       eval_seconds=state.get("eval_seconds", 0.0))
            fit.resumed_rng = state["rng"]
            fit.partial_loss = tuple(state.get("partial_loss", (0.0, 0)))
            log.info("resuming at epoch %d step %d", fit.start_epoch + 1, fit.start_step)
        self.earlier_seconds = (fit.summary.seconds, fit.summary.eval_seconds)  # spent before a resume (for this process's timings)
        return fit

    def _train_epoch(self, fit: "_Fit", train: Inputs, epoch: int) -> float:
        """One epoch (or what is left of it after a mid-epoch resume); returns its mean loss over all processes."""
        config, accelerator, summary = self.config, self.accelerator, fit.summary
        resuming_mid_epoch = epoch == fit.start_epoch and fit.start_step > 0
        if resuming_mid_epoch:
            assert fit.resumed_rng is not None, "a mid-epoch resume restores the checkpoint's generators"
            set_rng_state(fit.resumed_rng)
        else:  # inside fit's isolated_rng: the caller's generators are restored when training ends
            torch.manual_seed(config.seed * 1_000_003 + epoch)
        first_step = fit.start_step if epoch == fit.start_epoch else 0
        batches = self._epoch_batches(len(train), epoch)
        if epoch == fit.epochs - 1:
            batches = batches[: fit.last_epoch_batches]  # a --steps budget may end mid-epoch
        views = self._view_choice(train, epoch)
        if not self.method.training:  # the first epoch, or after a validation pass
            self.model.train()
        began = time.perf_counter()
        loss_sum, seen = (fit.partial_loss if resuming_mid_epoch else (0.0, 0))
        bar = progress_bar(total=len(batches), initial=first_step, desc=f"epoch {epoch + 1}/{fit.epochs}",
                           main_process=accelerator.is_local_main_process, leave=False)
        encode = train.images is not None and self.method.uses_image_features  # --aug-per-step: re-augmented images, frozen tower
        for step, (x, y, rows) in enumerate(self._local_batches(train, batches[first_step:], views, epoch), start=first_step):
            if encode:
                x = self._frozen_image_features(x)
            loss, synced = self._micro_step(fit, x, y, batches, step, rows)
            loss_sum += loss * len(y)
            seen += len(y)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / max(1, seen):.4f}", refresh=False)  # shown at the bar's next (rate-limited) refresh
            # Ctrl-C: stop here, where the state is whole (in the last step: after the epoch's checkpoint)
            if synced and step + 1 < len(batches) and self._stop.agreed(accelerator):
                bar.close()
                summary.seconds += time.perf_counter() - began
                state = training_state(fit.optimizer, fit.scheduler, epoch, step + 1, fit.best_score, summary)
                state["partial_loss"] = [loss_sum, seen]
                self._save_last(state)
                raise InterruptedRun(f"interrupted in epoch {epoch + 1}; checkpoint saved, continue with --resume")
        bar.close()
        summary.seconds += time.perf_counter() - began
        summary.epochs = epoch + 1
        self.method.after_epoch(epoch + 1)
        totals = accelerator.reduce(torch.tensor([loss_sum, seen], dtype=torch.float64, device=accelerator.device), "sum")
        return float(totals[0] / totals[1].clamp(min=1))

    def _micro_step(self, fit: "_Fit", x: torch.Tensor, y: torch.Tensor, batches: List[torch.Tensor], step: int,
                    rows: torch.Tensor) -> tuple:
        """Forward and backward of this process's slice of micro-batch `step` (`rows` of the training inputs), and the
        optimizer update that ends its accumulation group; returns (this slice's mean loss, whether the update ran)."""
        config, accelerator = self.config, self.accelerator
        synced = (step + 1) % config.grad_accum == 0 or step == len(batches) - 1
        # each image weighs 1/(images in its accumulation group): k micro-batches = one k-times batch
        group_start = step - step % config.grad_accum
        group_n = sum(len(b) for b in batches[group_start : group_start + config.grad_accum])
        with (accelerator.no_sync(self.model) if not synced else nullcontext()):
            with accelerator.autocast():
                logits = self.model(x)
                # a loss that all-gathers the batch must run on every process, even on an empty slice
                if len(y) or self.method.gathers_across_processes:
                    batch = {"sample_ids": rows.to(y.device)} if self.method.reads_sample_ids else {}
                    loss = self.method.loss(logits, y, config.label_smoothing, **batch)
                    scaled = loss * (len(y) / group_n) * accelerator.num_processes
                else:  # an empty slice of a tiny last batch still joins the all-reduce
                    loss, scaled = logits.sum() * 0, logits.sum() * 0
            accelerator.backward(scaled)
        fit.summary.images_seen += len(batches[step])
        fit.summary.batches_run += 1
        if synced:
            if config.max_grad_norm:
                accelerator.clip_grad_norm_(self.method.trainable_parameters(), config.max_grad_norm)
            fit.optimizer.step()
            fit.scheduler.step()
            fit.optimizer.zero_grad(set_to_none=True)
            self.method.after_optimizer_step()
            if accelerator.trackers:  # --report-to: this micro-batch's loss and the lr the next step uses
                accelerator.log({"train/loss": float(loss.detach()), "train/lr": fit.scheduler.get_last_lr()[0]},
                                step=self.tracker_step_offset + fit.scheduler.last_epoch)
        return float(loss.detach()), synced

    def _end_epoch(self, fit: "_Fit", val: Optional[Inputs], classes, epoch: int, loss: float) -> None:
        """Validate (when due), keep the selected state, log, checkpoint, and honour a Ctrl-C."""
        summary = fit.summary
        record = {"epoch": epoch + 1, "loss": loss}
        improved = self._validate_and_select(fit, val, classes, epoch, record)
        if improved:
            summary.best_epoch = epoch + 1
            self._keep_best(fit)
        summary.history.append(record)
        self.accelerator.log({f"epoch/{key}": value for key, value in record.items()},
                             step=self.tracker_step_offset + fit.scheduler.last_epoch)
        marker = (" (best)" if self.config.select == "best-val" else "") if improved else ""
        log.info("epoch %d/%d %s%s", epoch + 1, fit.epochs,
                 " ".join(f"{k} {v:.4f}" for k, v in record.items() if k != "epoch"), marker)
        if self.resumable:
            self._save_last(training_state(fit.optimizer, fit.scheduler, epoch + 1, 0, fit.best_score, summary))
        if self._stop.agreed(self.accelerator):
            raise InterruptedRun(f"interrupted after epoch {epoch + 1}; checkpoint saved, continue with --resume")

    def _validate_and_select(self, fit: "_Fit", val: Optional[Inputs], classes, epoch: int, record: Dict) -> bool:
        """Whether this epoch becomes the selected one: without val always; with `select: last` always (validated
        for the record when due); with `best-val` when its validation `--metric` beats every earlier one."""
        config = self.config
        if val is None or not len(val):
            return True
        improved = config.select == "last"  # best-val: the best is chosen among validated epochs
        due = doubling(epoch + 1) if self.sparse_validation and fit.selects_latest else (epoch + 1) % fit.every == 0
        if due or epoch + 1 == fit.epochs:
            evaluating = time.perf_counter()
            logits = self.predict(val)
            # only what selection needs, per epoch; `validated` keeps the logits for the full metrics at the end
            result = classification_metrics(logits, val.labels, classes, imbalance=config.metric != "top1")
            fit.summary.eval_seconds += time.perf_counter() - evaluating
            name, value = headline(result)
            record[f"val_{name}"] = value
            value = score(result, config.metric)
            if config.metric != name and config.metric in result:
                record[f"val_{config.metric}"] = value
            if self.on_validated is not None:
                self.on_validated(epoch + 1, value)
            if config.select == "best-val":
                improved = value > fit.best_score
            fit.best_score = max(fit.best_score, value)
            if improved:
                self.validated = {epoch + 1: logits}
        return improved

    def _finish(self, summary: TrainSummary, val: Optional[Inputs], trained: bool) -> TrainSummary:
        """Load the selected checkpoint, let the method replace it (`final_state`), and save the result as best."""
        method = self.method
        if trained and self._best_state is not None:
            method.load_learned_state_dict(self._best_state)
        elif trained and self.run is not None and self.resumable:
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
            return self.method.model.image.encode(images, normalize=False).float()


@dataclass
class _Fit:
    """One `fit` call's optimisation state, shared by its start, epoch, validation and checkpoint steps."""

    optimizer: Any
    scheduler: Any
    epochs: int
    last_epoch_batches: int  # micro-batches of the last epoch (a --steps budget may end mid-epoch)
    every: int  # epochs between validation passes
    summary: TrainSummary
    selects_latest: bool = False  # every epoch becomes the selected one (select: last, or no val)
    best_score: float = -1.0  # the best validation --metric so far
    start_epoch: int = 0
    start_step: int = 0
    resumed_rng: Optional[Dict] = None
    partial_loss: tuple = (0.0, 0)
