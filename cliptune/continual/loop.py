"""The task loop of `cliptune continual`: learn a sequence of tasks without losing zero-shot ability.

Each task is learned with a mergeable method (`full` or `lora`) on the shared engine; the run's strategy (one module
each in this package: naive, lwf, lwf-vr, zscl, wise, modx) adds a term to that method's loss, may replace the task's
result and post-processes the merged weights after the task. Every strategy can add ZSCL's `l2` pull toward the
task-start weights. After each task every task's test split (with its own classes) and every control set are
evaluated with the current model's zero-shot head; the MTIL metrics (Transfer, Avg, Last) follow ZSCL.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, cast

import torch
import torch.nn.functional as F
from torch import nn

from cliptune.config.run import RunConfig, check_config, load_config, parse_dataset_spec, save_config
from cliptune.continual import strategy_class
from cliptune.continual.base import Strategy
from cliptune.data.folders import ImageFolderData
from cliptune.data.sources import load_data
from cliptune.training.checkpoints import load_method_state
from cliptune.training.engine import Trainer
from cliptune.training.optim import training_length, with_budget_lr
from cliptune.core.metrics import retrieval_recall
from cliptune.core.errors import CliptuneError
from cliptune.core.figures import new_figure, save_figure
from cliptune.methods import build_method, method_class, methods_exporting
from cliptune.methods.base import Mergeable, Method
from cliptune.models.loading import LoadedModel
from cliptune.core.progress import RESULT
from cliptune.core.runfolder import RunFolder, atomic_save_safetensors, atomic_write_json, read_json
from cliptune.training.session import Session, data_source, make_accelerator, model_from_config, tracked_settings
from cliptune.data.templates import load_templates

log = logging.getLogger("cliptune")


def continual_defaults(config: RunConfig) -> Dict:
    """The defaults layer of a continual run, above the method's training defaults (`build_config(protocol=...)`):
    the last iterate carries on to the next task (ZSCL keeps no best-val epoch), the method's continual
    settings (ZSCL's protocol for full fine-tuning) and the strategy's own."""
    return {"select": "last", **method_class(config.method).continual_defaults(),
            **strategy_class(config.strategy).defaults}


def accuracy_scalars(tasks: Sequence[float], controls: Sequence[float]) -> Dict[str, float]:
    """A tracker's record of one row of the accuracy matrix: `acc/taskN` and `control/N` (1-based)."""
    return {**{f"acc/task{j + 1}": a for j, a in enumerate(tasks)}, **{f"control/{k + 1}": a for k, a in enumerate(controls)}}


def mtil_metrics(acc: Sequence[Sequence[float]]) -> Dict[str, float]:
    """ZSCL's MTIL summary of acc[i][j] (task j's accuracy after learning task i).

    Transfer: for each task j > 0, the mean of acc[i][j] over i < j (before j is learned), then the
    mean over j. Avg: the mean of every entry. Last: the mean of the final row.
    """
    n = len(acc)
    transfer = [sum(acc[i][j] for i in range(j)) / j for j in range(1, len(acc[0]))] if n > 1 else []
    return {
        "transfer": sum(transfer) / len(transfer) if transfer else float("nan"),
        "avg": sum(sum(row) for row in acc) / sum(len(row) for row in acc),
        "last": sum(acc[-1]) / len(acc[-1]),
    }


# ----- data -----
def load_task(spec: str, config: RunConfig, shots: Optional[int]) -> tuple[str, ImageFolderData]:
    root, classes = parse_dataset_spec(spec)
    data = load_data(root, config.val_fraction, config.test_fraction, config.seed, shots, None, config.strict,
                     **data_source(config))
    name = Path(root).name
    if classes:
        unknown = sorted(set(classes) - set(data.classes))
        if unknown:
            raise CliptuneError(f"{root} has no class '{unknown[0]}' (from '{spec}')")
        data = data.restrict_to(classes)
        name = f"{name}:{'+'.join(classes)}" if len(classes) <= 3 else f"{name}:{classes[0]}..{classes[-1]}"
    return name, data


# ----- the strategy wrapper the engine trains -----
class ContinualLearner(nn.Module):
    """Wraps a task's method: same forward and parameters; the loss adds the strategy's regulariser and the L2 pull.

    Presents the engine's method interface (forward, loss, trainable_*, after_optimizer_step) by delegating to the
    wrapped method, so the shared training loop is unchanged.
    """

    def __init__(self, method, strategy: Strategy, config: RunConfig):
        super().__init__()
        self.method = method
        self.strategy = strategy
        self.settings = config
        # ZSCL's `l2_model` starts from the task-start weights
        self.anchor = method.trainable_state_dict() if config.l2 > 0 else None
        self._inputs: Optional[torch.Tensor] = None

    # engine interface
    name = property(lambda self: self.method.name)
    config = property(lambda self: self.method.config)
    model = property(lambda self: self.method.model)
    classnames = property(lambda self: self.method.classnames)
    uses_image_features = property(lambda self: self.method.uses_image_features)
    # a FLYP-loss task all-gathers its batch: every process must reach the loss (an empty slice included)
    gathers_across_processes = property(lambda self: self.method.gathers_across_processes)
    reads_sample_ids = property(lambda self: self.method.reads_sample_ids or self.strategy.reads_sample_ids)

    def trainable_parameters(self):
        return self.method.trainable_parameters()

    def trainable_state_dict(self):
        return self.method.trainable_state_dict()

    def learned_state_dict(self):
        return self.method.learned_state_dict()

    def load_learned_state_dict(self, state):
        self.method.load_learned_state_dict(state)

    def prepare(self, train, val=None) -> None:
        self.method.prepare(train, val)

    def after_epoch(self, epoch: int) -> None:
        self.method.after_epoch(epoch)

    def final_state(self, val=None):
        """The strategy's result for the task (ZSCL's weight average), else the method's."""
        state = self.strategy.task_state(self.method)
        return state if state is not None else self.method.final_state(val)

    def train(self, mode: bool = True):
        super().train(mode)
        self.method.train(mode)
        return self

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        self._inputs = inputs if self.training else None
        return self.method(inputs)

    def loss(self, logits, labels, label_smoothing: float = 0.0, **batch):
        loss = self.method.loss(logits, labels, label_smoothing, **(batch if self.method.reads_sample_ids else {}))
        if self.anchor is not None:
            own = dict(self.method.named_parameters())
            loss = loss + self.settings.l2 * l2_to_anchor(own, self.anchor)
        if self._inputs is not None:
            extra = self.strategy.regulariser(self.method, self._inputs, labels, batch.get("sample_ids"))
            loss = loss if extra is None else loss + extra
        return loss

    def after_optimizer_step(self) -> None:
        self.method.after_optimizer_step()
        self.strategy.after_optimizer_step(self.method)

    def release(self) -> None:
        """Drop per-step tensors once the task is learned."""
        self._inputs = None


def l2_to_anchor(parameters: Dict[str, torch.Tensor], anchor: Dict[str, torch.Tensor]) -> torch.Tensor:
    """ZSCL's `helpers.py::l2_loss`: the sum over weights of `(θ - θ_task_start)²`."""
    return torch.stack([F.mse_loss(parameters[name], value, reduction="sum") for name, value in anchor.items()]).sum()


# ----- the task loop -----
def _evaluate(config: RunConfig, model: LoadedModel, data: ImageFolderData, templates, accelerator, cache_dir) -> float:
    """Top-1 of the model's zero-shot head (the classifier of full/LoRA runs) on a task's test split."""
    return Session(config, model, data, templates, accelerator, cache_dir).zeroshot_metrics("test")["top1"]


def _retrieval(config: RunConfig, model: LoadedModel, data: ImageFolderData, templates, accelerator,
               cache_dir) -> Optional[Dict[str, float]]:
    """Image-text retrieval recall@1/5 over a task's test images that have a caption (Mod-X's evaluation); None
    without captions."""
    split = data.split("test")
    rows = [i for i, file in enumerate(split.files) if file in data.captions]
    if not rows:
        return None
    images = Session(config, model, data, templates, accelerator, cache_dir).features("test")[rows]
    text = model.text
    with torch.no_grad():
        tokens = text.tokenize([data.captions[split.files[i]] for i in rows])
        texts = torch.cat([text.encode(chunk, normalize=True) for chunk in tokens.split(256)])
    return {**retrieval_recall(F.normalize(images.to(texts.device).float(), dim=-1), texts), "n": len(rows)}


def _with_weights(pristine: nn.Module, model: LoadedModel, state: Dict[str, torch.Tensor], revision: str) -> LoadedModel:
    """A plain CLIP (no adapters) holding `state`, with a unique spec revision so no cached feature of
    other weights (in memory or on disk) is ever reused for it."""
    clip = copy.deepcopy(pristine)
    clip.load_state_dict(state)
    unique = f"{revision}-{uuid.uuid4().hex}"
    return dataclasses.replace(model, clip=clip, spec=dataclasses.replace(model.spec, revision=unique))


def _plot(path: Path, acc, tasks, title: str) -> None:
    figure, axes = new_figure(figsize=(1.2 * len(tasks) + 3, 0.9 * len(acc) + 2))
    image = axes.imshow(acc, vmin=0, vmax=1, cmap="viridis")
    for i, row in enumerate(acc):
        for j, value in enumerate(row):
            axes.text(j, i, f"{100 * value:.1f}", ha="center", va="center", color="white" if value < 0.6 else "black")
    axes.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
    axes.set_yticks(range(len(acc)), [f"after {t}" for t in tasks[: len(acc)]])
    axes.set_xlabel("evaluated on")
    axes.set_title(title)
    figure.colorbar(image, ax=axes, label="top-1")
    figure.tight_layout()
    save_figure(figure, path, dpi=100)


def continual(config: RunConfig, out: str | Path, overwrite: bool = False, resume: bool = False) -> Dict:
    """Learn `config.tasks` in order with `config.strategy`; returns (and writes) RUN/continual.json."""
    run = RunFolder(out)
    if resume:
        config = load_config(run.config)
    _check_continual(config)
    run.check_reusable(overwrite=overwrite, resume=resume)
    tasks = [load_task(spec, config, config.shots) for spec in config.tasks]
    controls = [load_task(spec, config, None) for spec in config.controls]
    templates = load_templates(config.templates)
    strategy = strategy_class(config.strategy)(config)
    accelerator = make_accelerator(config.mixed_precision, config.report_to, run.root)
    model = model_from_config(config, accelerator.device)
    if accelerator.is_main_process:
        run.prepare(overwrite=overwrite, resume=resume)
    accelerator.wait_for_everyone()
    with run.log_to_file(accelerator.is_main_process):
        if accelerator.is_main_process and not resume:
            save_config(config, run.config)
        if config.report_to != "none":
            accelerator.init_trackers("cliptune", config=tracked_settings(config))
        sequence = _Sequence(config, run, accelerator, templates, tasks, controls, strategy, pristine=copy.deepcopy(model.clip),
                             initial=dataclasses.replace(model, clip=copy.deepcopy(model.clip)))
        model, progress = sequence.start(model, resume)
        for index in range(len(progress["acc"]), len(tasks)):
            model = sequence.learn(model, index, progress.get("steps", 0))
            sequence.record(model, progress, index)
        names = [name for name, _ in tasks]
        result = {"strategy": config.strategy, "method": config.method, "tasks": names,
                  "controls": [name for name, _ in controls], "acc": progress["acc"], "zeroshot": progress["zeroshot"],
                  "control_acc": progress["control_acc"], "zeroshot_control": progress["zeroshot_control"],
                  **mtil_metrics(progress["acc"])}
        if any(progress.get("zeroshot_retrieval") or []):  # tasks with captions: retrieval recall after every task
            result.update(retrieval=progress["retrieval"], zeroshot_retrieval=progress["zeroshot_retrieval"])
        if accelerator.is_main_process:
            _plot(run.root / "continual.png", progress["acc"], names, f"{config.strategy} ({config.method})")
            atomic_write_json(run.root / "continual.json", result)
            atomic_write_json(run.metrics, result)
        log.info("transfer %.2f%%  avg %.2f%%  last %.2f%%", 100 * result["transfer"], 100 * result["avg"], 100 * result["last"],
                 extra=RESULT)
        accelerator.log({f"mtil/{key}": result[key] for key in ("transfer", "avg", "last")}, step=progress.get("steps", 0))
        accelerator.end_training()
        return result


def _check_continual(config: RunConfig) -> None:
    """Refuse, before any work, a task list, strategy or method that cannot make a continual run."""
    check_config(config)
    if not config.tasks:
        raise CliptuneError("no tasks given: pass --task DIR (one per task, in order) or a recipe with 'tasks:'")
    strategy = strategy_class(config.strategy)
    mergeable = methods_exporting("merged")
    if config.method not in mergeable:
        raise CliptuneError(f"continual learning carries merged weights from task to task: use --method {' or '.join(mergeable)}")
    problem = method_class(config.method).continual_problem(config.method_options())
    if problem:
        raise CliptuneError(problem)
    problem = strategy.problem(config)
    if problem:
        raise CliptuneError(problem)


@dataclasses.dataclass
class _Sequence:
    """One continual run's fixed parts: the tasks, the untouched CLIP (`pristine`: the module each task's weights are
    loaded into; `initial`: ZSCL's teacher), and where progress is checkpointed."""

    config: RunConfig
    run: RunFolder
    accelerator: Any  # accelerate's Accelerator
    templates: List[str]
    tasks: List[tuple]
    controls: List[tuple]
    strategy: Strategy
    pristine: nn.Module
    initial: LoadedModel
    task_steps: int = 0  # optimizer updates of the task `learn` trained last (a tracker's step axis)

    def __post_init__(self):
        self.initial_state = {k: v.detach().clone() for k, v in self.initial.clip.state_dict().items()}

    @property
    def progress_dir(self) -> Path:
        return self.run.checkpoints / "last"

    def evaluate(self, model: LoadedModel, tasks: List[tuple]) -> List[float]:
        return [_evaluate(self.config, model, data, self.templates, self.accelerator, self.run.cache) for _, data in tasks]

    def retrieval(self, model: LoadedModel) -> List[Optional[Dict[str, float]]]:
        return [_retrieval(self.config, model, data, self.templates, self.accelerator, self.run.cache) for _, data in self.tasks]

    def start(self, model: LoadedModel, resume: bool) -> tuple:
        """(model, progress): after the last finished task when resuming, else the zero-shot model and its accuracies."""
        if resume and (self.progress_dir / "progress.json").is_file():
            from safetensors.torch import load_file

            progress = read_json(self.progress_dir / "progress.json")
            model = _with_weights(self.pristine, model, load_file(str(self.progress_dir / "model.safetensors")),
                                  f"task{len(progress['acc']) - 1}")
            log.info("resuming after task %d of %d", len(progress["acc"]), len(self.tasks))
            return model, progress
        progress = {"acc": [], "control_acc": [], "zeroshot": self.evaluate(model, self.tasks),
                    "zeroshot_control": self.evaluate(model, self.controls), "steps": 0,
                    "retrieval": [], "zeroshot_retrieval": self.retrieval(model)}
        self.accelerator.log(accuracy_scalars(progress["zeroshot"], progress["zeroshot_control"]), step=0)
        return model, progress

    def learn(self, model: LoadedModel, index: int, steps_before: int = 0) -> LoadedModel:
        """Train task `index` from `model`; returns the model holding its (strategy-merged) weights."""
        config, accelerator = self.config, self.accelerator
        name, data = self.tasks[index]
        log.info("task %d/%d: %s (%d classes, %d training images)", index + 1, len(self.tasks), name, len(data.classes),
                 len(data.splits["train"]))
        previous = dataclasses.replace(model, clip=copy.deepcopy(model.clip))
        method = build_method(config.method, model, data.classnames, self.templates, config.method_options(),
                              data.named_descriptions, seed=config.seed)
        strategy = self.strategy
        teacher = strategy.teacher(self.initial, previous)
        teacher.clip.eval()
        strategy.start_task(method, teacher, data, self.templates)
        learner = ContinualLearner(method, strategy, config)
        session = Session(config, model, data, self.templates, accelerator, self.run.cache)
        train = session.inputs("train", method.uses_image_features, train=True)
        val = session.inputs("val", method.uses_image_features) if len(data.splits["val"]) else None
        task_run = RunFolder(self.run.root / "tasks" / f"{index + 1}")
        if accelerator.is_main_process:
            task_run.prepare(overwrite=True)
        budget = with_budget_lr(config, len(train))
        self.task_steps = training_length(budget, len(train))[2]  # the optimizer updates this task makes
        engine_method = cast(Method, learner)  # the learner presents a Method's engine interface by delegation
        trainer = Trainer(engine_method, budget, task_run, accelerator, tracker_step_offset=steps_before)
        trainer.fit(train, val, data.classes)
        accelerator.unwrap_model(trainer.model).release()
        load_method_state(engine_method, task_run.checkpoints / "best")  # the selected epoch, or ZSCL's weight average
        merged = cast(Mergeable, method).merged_state_dict()  # continual methods export "merged" (checked up front)
        state = strategy.merge(merged, previous.clip.state_dict(), self.initial_state)
        return _with_weights(self.pristine, model, state, f"task{index}")

    def record(self, model: LoadedModel, progress: Dict, index: int) -> None:
        """Accuracies after task `index` on every task and control, checkpointed with the weights (for --resume)."""
        progress["acc"].append(self.evaluate(model, self.tasks))
        progress["control_acc"].append(self.evaluate(model, self.controls))
        progress.setdefault("retrieval", []).append(self.retrieval(model))
        progress["steps"] = progress.get("steps", 0) + self.task_steps
        self.accelerator.log(accuracy_scalars(progress["acc"][-1], progress["control_acc"][-1]), step=progress["steps"])
        log.info("after %s: %s", self.tasks[index][0],
                 "  ".join(f"{name} {a:.2%}" for (name, _), a in zip(self.tasks, progress["acc"][-1])))
        if self.accelerator.is_main_process:
            from cliptune.core.runfolder import replace_dir

            staging = self.run.checkpoints / ".last-staging"
            atomic_save_safetensors(staging / "model.safetensors", model.clip.state_dict())
            atomic_write_json(staging / "progress.json", progress)
            replace_dir(staging, self.progress_dir)
