"""Continual learning over a sequence of tasks without losing zero-shot ability.

Each task is learned with a mergeable method (`full` or `lora`) on the shared engine; the strategy adds
a regulariser to that method's loss and/or post-processes the weights after the task:

- `naive`: sequential fine-tuning.
- `lwf`: LwF (Li & Hoiem) as ZSCL's baseline runs it (Thunderbeee/ZSCL `mtil/scripts/lwf.sh`: the ZSCL code
  path with `--ref-dataset` the current task and `--ref-model` the previous one): the previous model's
  features of the current task's class prompts, scored on a separate stream of the current task's training
  images read with the eval transform (`finetune.py:140-145`, `:172-175`).
- `lwf-vr`: LwF with a virtual vocabulary ("Don't Stop Learning", Ding et al. 2022), as ZSCL's code runs it
  (`mtil/src/models/helpers.py::virtual_vocab`, `lwf_vr.sh` with `--ref-sentences random`): `vocab_size`
  fixed random token sequences of `vocab_length` tokens instead of the class prompts, all of them every step.
- `zscl`: ZSCL (Zheng et al., ICCV'23; `mtil/src/models/finetune.py::finetune`): distillation in feature
  space against the *initial* model on reference images and all reference texts, plus the weight
  ensemble of the task-start weights and a snapshot every `avg_every` steps from the first, used as
  the task's result.
- `wise`: after each task, interpolate with the task-start (or initial) weights (WiSE-FT).

Feature distillation (every distilling strategy) follows ZSCL: the teacher's text features on both sides, student
and teacher image features, KL of the image->text and of the text->image distributions. Every strategy
can add ZSCL's `l2` pull toward the task-start weights. All distillation terms are KL divergences
(ZSCL's cross-entropy minus the teacher's entropy: same gradient), so they are exactly zero when
student equals teacher. After each task every task's test split (with its own classes) and every
control set are evaluated with the current model's zero-shot head; the MTIL metrics (Transfer, Avg,
Last) follow ZSCL.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import uuid
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cliptune.config.run import RunConfig, check_config, load_config, parse_dataset_spec, save_config
from cliptune.data.folders import ImageFolderData, eval_transform, image_files_under
from cliptune.data.sources import load_data
from cliptune.training.checkpoints import load_method_state
from cliptune.training.engine import Trainer
from cliptune.training.optim import with_budget_lr
from cliptune.core.errors import CliptuneError
from cliptune.core.figures import new_figure, save_figure
from cliptune.core.options import choices_of
from cliptune.methods import build_method, method_class, methods_exporting
from cliptune.models.loading import LoadedModel
from cliptune.core.progress import RESULT
from cliptune.core.runfolder import RunFolder, atomic_save_safetensors, atomic_write_json, read_json
from cliptune.training.session import Session, data_source, make_accelerator, model_from_config
from cliptune.data.templates import load_templates
from cliptune.models.towers import TextTower
from cliptune.models.interpolation import interpolate
from cliptune.models.zeroshot import zeroshot_weights

log = logging.getLogger("cliptune")
DEFAULT_REFERENCE_TEXTS = Path(__file__).resolve().parents[1] / "assets" / "reference_texts.txt"
STRATEGIES = choices_of(RunConfig, "strategy")
DISTILLING = ("lwf", "lwf-vr", "zscl")
STRATEGY_DEFAULTS = {"zscl": {"l2": 1.0}}  # ZSCL.sh:13-26 adds --l2 1 to the ZSCL runs (not to lwf.sh, finetune.sh)


def continual_defaults(config: RunConfig) -> Dict:
    """The defaults layer of a continual run, above the method's training defaults (`build_config(protocol=...)`):
    the last iterate carries on to the next task (ZSCL keeps no best-val epoch), the method's continual
    settings (ZSCL's protocol for full fine-tuning) and the strategy's own."""
    return {"select": "last", **method_class(config.method).continual_defaults(),
            **STRATEGY_DEFAULTS.get(config.strategy, {})}


# ----- losses and weight averaging (pure functions, tested directly) -----
def distillation_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)) * T^2, averaged over rows: zero iff the distributions match."""
    teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
    student = F.log_softmax(student_logits / temperature, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * temperature**2


def symmetric_distillation(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 2.0):
    """(image->text, text->image) distillation of (images, texts) logits: the rows, then the columns."""
    return (distillation_kl(teacher_logits, student_logits, temperature),
            distillation_kl(teacher_logits.T, student_logits.T, temperature))


def feature_distillation(student_images, teacher_images, teacher_texts, scale, temperature=2.0):
    """ZSCL's two terms on reference images: logits `scale * image @ text.T` of the student's and the
    teacher's image features, both against the *teacher's* text features (`finetune.py`: `logits_current
    = logit_scale.exp() * ref_out_current @ ref_embeddings.t()`, `logits_ref = ... ref_out @ ...`)."""
    texts = F.normalize(teacher_texts, dim=-1)
    student = scale * F.normalize(student_images, dim=-1) @ texts.T
    teacher = scale * F.normalize(teacher_images, dim=-1) @ texts.T
    return symmetric_distillation(teacher, student, temperature)


def l2_to_anchor(parameters: Dict[str, torch.Tensor], anchor: Dict[str, torch.Tensor]) -> torch.Tensor:
    """ZSCL's `helpers.py::l2_loss`: the sum over weights of `(θ - θ_task_start)²`."""
    return sum(F.mse_loss(parameters[name], value, reduction="sum") for name, value in anchor.items())


class WeightAverage:
    """Running mean of parameter snapshots: one snapshot is itself, two are their mean."""

    def __init__(self):
        self.count = 0
        self.mean: Dict[str, torch.Tensor] = {}

    def add(self, state: Dict[str, torch.Tensor]) -> None:
        self.count += 1
        for name, value in state.items():
            value = value.detach().float()
            if name not in self.mean:
                self.mean[name] = value.clone()
            else:
                self.mean[name] += (value - self.mean[name]) / self.count


def virtual_vocabulary(text: TextTower, size: int = 1000, length: int = 10, seed: int = 0) -> torch.Tensor:
    """(size, context) token ids of random "sentences": start token, `length` random tokens, end token, padding.

    ZSCL's `helpers.py::virtual_vocab(length=10, n_class=1000)`, seeded. Unlike the original the random
    tokens never are the start, end or pad token (the original draws from the whole vocabulary, so a
    drawn end token could end a sentence early).
    """
    layout = text.tokenize([""])[0].cpu()  # [start, end, pad, ...]
    start, end, pad = int(layout[0]), int(layout[1]), text.pad_id
    if length + 2 > text.context_length:
        raise CliptuneError(f"vocab_length {length} does not fit the text context of {text.context_length} tokens")
    special = torch.tensor(sorted({start, end, pad}))
    ordinary = torch.arange(text.vocab_size)
    ordinary = ordinary[~torch.isin(ordinary, special)]
    generator = torch.Generator().manual_seed(seed)
    drawn = ordinary[torch.randint(len(ordinary), (size, length), generator=generator)]
    tokens = torch.full((size, text.context_length), pad, dtype=torch.long)
    tokens[:, 0], tokens[:, 1 : length + 1], tokens[:, length + 1] = start, drawn, end
    return tokens.to(text.device)


@torch.no_grad()
def encode_texts(text: TextTower, tokens: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Unit-norm features of many token sequences, `chunk` at a time."""
    return torch.cat([text.encode(piece, normalize=True) for piece in tokens.split(chunk)])


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


class UnlabelledImages(Dataset):
    def __init__(self, files: List[Path], transform):
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        with Image.open(self.files[index]) as image:
            return self.transform(image.convert("RGB"))


def reference_images(spec: str) -> List[Path]:
    root, classes = parse_dataset_spec(spec)
    base = Path(root)
    if not base.is_dir():
        raise CliptuneError(f"reference image folder not found: {root}")
    folders = [base / c for c in classes] if classes else [base]
    files = sorted(p for folder in folders for p in image_files_under(folder))
    if not files:
        raise CliptuneError(f"no images found under reference folder {spec}")
    return files


def reference_texts(path: Optional[str]) -> List[str]:
    source = Path(path) if path else DEFAULT_REFERENCE_TEXTS
    if not source.is_file():
        raise CliptuneError(f"reference texts file not found: {source}")
    texts = [line.strip() for line in source.read_text().splitlines() if line.strip()]
    if len(texts) < 2:
        raise CliptuneError(f"{source} needs at least 2 phrases (one per line)")
    return texts


# ----- the strategy wrapper the engine trains -----
class ContinualLearner(nn.Module):
    """Wraps a task's method: same forward and parameters; the loss adds the strategy's regularisers.

    Presents the engine's method interface (forward, loss, trainable_*, after_optimizer_step) by
    delegating to the wrapped method, so the shared training loop is unchanged. A distilling strategy
    scores `images` (the reference images for zscl, the current task's training images for lwf and
    lwf-vr), read with the eval transform as a stream of their own, against `text_features`: the teacher's
    features of the reference texts, the class prompts or the virtual vocabulary (`distillation_inputs`).
    """

    def __init__(self, method, strategy: str, config: RunConfig, teacher: Optional[LoadedModel] = None,
                 images: Optional[List[Path]] = None, text_features: Optional[torch.Tensor] = None):
        super().__init__()
        self.method = method
        self.strategy = strategy
        self.settings = config
        self.teacher = teacher
        self._regulariser = None
        self._generator = torch.Generator().manual_seed(config.seed)
        # ZSCL's `l2_model` and weight ensemble both start from the task-start weights
        self.anchor = method.trainable_state_dict() if config.l2 > 0 else None
        self.average = None
        self.steps = 0
        if strategy == "zscl":
            self.average = WeightAverage()
            self.average.add(method.trainable_state_dict())
        self._stream = None
        if strategy in DISTILLING:
            model = method.model
            transform = eval_transform(model.image_size, model.mean, model.std, model.interpolation)
            self._stream = DataLoader(UnlabelledImages(images, transform), batch_size=config.batch_size, shuffle=True,
                                      generator=torch.Generator().manual_seed(config.seed), drop_last=len(images) > config.batch_size)
            self._stream_iter = iter(self._stream)
            self._teacher_texts = text_features

    # engine interface
    name = property(lambda self: self.method.name)
    config = property(lambda self: self.method.config)
    model = property(lambda self: self.method.model)
    classnames = property(lambda self: self.method.classnames)
    uses_image_features = property(lambda self: self.method.uses_image_features)
    # a FLYP-loss task all-gathers its batch: every process must reach the loss (an empty slice included)
    gathers_across_processes = property(lambda self: self.method.gathers_across_processes)

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
        """ZSCL: the running weight average is the task's result; the other strategies keep the method's."""
        if self.average is not None and self.average.count:
            return {**self.method.learned_state_dict(), **self.average.mean}
        return self.method.final_state(val)

    def train(self, mode: bool = True):
        super().train(mode)
        self.method.train(mode)
        if self.teacher is not None:
            self.teacher.clip.eval()
        return self

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        logits = self.method(inputs)
        if self.training and self.strategy in DISTILLING:
            image_side, text_side = self._feature_terms(inputs.device, self.teacher.logit_scale)
            self._regulariser = self.settings.distill_image * image_side + self.settings.distill_text * text_side
        return logits

    def loss(self, logits, labels, label_smoothing: float = 0.0):
        loss = self.method.loss(logits, labels, label_smoothing)
        if self.anchor is not None:
            own = dict(self.method.named_parameters())
            loss = loss + self.settings.l2 * l2_to_anchor(own, self.anchor)
        return loss + self._regulariser if self._regulariser is not None else loss

    def after_optimizer_step(self) -> None:
        """ZSCL's ensemble adds a snapshot at iterations 0, avg_every, 2·avg_every, ... (each after its update)."""
        self.method.after_optimizer_step()
        self.steps += 1
        if self.average is not None and (self.steps - 1) % self.settings.avg_every == 0:
            self.average.add(self.trainable_state_dict())

    def release(self) -> None:
        """Drop per-step tensors once the task is learned."""
        self._regulariser = None

    # distillation terms
    def _next_images(self, device) -> torch.Tensor:
        try:
            batch = next(self._stream_iter)
        except StopIteration:
            self._stream_iter = iter(self._stream)
            batch = next(self._stream_iter)
        return batch.to(device)

    def _feature_terms(self, device, scale):
        images = self._next_images(device)
        texts = self._teacher_texts
        per_step = self.settings.vocab_per_step
        if per_step is not None and per_step < len(texts):  # a random subset per step (cliptune <= 0.x)
            texts = texts[torch.randperm(len(texts), generator=self._generator)[:per_step].to(texts.device)]
        student_images = self.method.model.image.encode(images, normalize=True)
        with torch.no_grad():
            teacher_images = self.teacher.image.encode(images, normalize=True)
        return feature_distillation(student_images, teacher_images, texts, scale, self.settings.distill_temperature)


# ----- the task loop -----
def _evaluate(config: RunConfig, model: LoadedModel, data: ImageFolderData, templates, accelerator, cache_dir) -> float:
    """Top-1 of the model's zero-shot head (the classifier of full/LoRA runs) on a task's test split."""
    return Session(config, model, data, templates, accelerator, cache_dir).zeroshot_metrics("test")["top1"]


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
    references = ((reference_images(config.reference), reference_texts(config.reference_texts)) if config.strategy == "zscl"
                  else (None, None))
    accelerator = make_accelerator(config.mixed_precision)
    model = model_from_config(config, accelerator.device)
    if accelerator.is_main_process:
        run.prepare(overwrite=overwrite, resume=resume)
    accelerator.wait_for_everyone()
    with run.log_to_file(accelerator.is_main_process):
        if accelerator.is_main_process and not resume:
            save_config(config, run.config)
        sequence = _Sequence(config, run, accelerator, templates, tasks, controls, references, pristine=copy.deepcopy(model.clip),
                             initial=dataclasses.replace(model, clip=copy.deepcopy(model.clip)))
        model, progress = sequence.start(model, resume)
        for index in range(len(progress["acc"]), len(tasks)):
            model = sequence.learn(model, index)
            sequence.record(model, progress, index)
        names = [name for name, _ in tasks]
        result = {"strategy": config.strategy, "method": config.method, "tasks": names,
                  "controls": [name for name, _ in controls], "acc": progress["acc"], "zeroshot": progress["zeroshot"],
                  "control_acc": progress["control_acc"], "zeroshot_control": progress["zeroshot_control"],
                  **mtil_metrics(progress["acc"])}
        if accelerator.is_main_process:
            _plot(run.root / "continual.png", progress["acc"], names, f"{config.strategy} ({config.method})")
            atomic_write_json(run.root / "continual.json", result)
            atomic_write_json(run.metrics, result)
        log.info("transfer %.2f%%  avg %.2f%%  last %.2f%%", 100 * result["transfer"], 100 * result["avg"], 100 * result["last"],
                 extra=RESULT)
        return result


def _check_continual(config: RunConfig) -> None:
    """Refuse, before any work, a task list, strategy or method that cannot make a continual run."""
    check_config(config)
    if not config.tasks:
        raise CliptuneError("no tasks given: pass --task DIR (one per task, in order) or a recipe with 'tasks:'")
    if config.strategy not in STRATEGIES:
        raise CliptuneError(f"unknown strategy '{config.strategy}' (available: {', '.join(STRATEGIES)})")
    mergeable = methods_exporting("merged")
    if config.method not in mergeable:
        raise CliptuneError(f"continual learning carries merged weights from task to task: use --method {' or '.join(mergeable)}")
    problem = method_class(config.method).continual_problem(config.method_options())
    if problem:
        raise CliptuneError(problem)
    if config.strategy == "zscl" and not config.reference:
        raise CliptuneError("zscl needs reference images: pass --reference DIR (any folder of images, unlabelled)")


@dataclasses.dataclass
class _Sequence:
    """One continual run's fixed parts: the tasks, the untouched CLIP (`pristine`: the module each task's weights are
    loaded into; `initial`: ZSCL's teacher), and where progress is checkpointed."""

    config: RunConfig
    run: RunFolder
    accelerator: object
    templates: List[str]
    tasks: List[tuple]
    controls: List[tuple]
    references: tuple  # ZSCL's (reference images, reference texts), else (None, None)
    pristine: nn.Module
    initial: LoadedModel

    def __post_init__(self):
        self.initial_state = {k: v.detach().clone() for k, v in self.initial.clip.state_dict().items()}

    @property
    def progress_dir(self) -> Path:
        return self.run.checkpoints / "last"

    def evaluate(self, model: LoadedModel, tasks: List[tuple]) -> List[float]:
        return [_evaluate(self.config, model, data, self.templates, self.accelerator, self.run.cache) for _, data in tasks]

    def start(self, model: LoadedModel, resume: bool) -> tuple:
        """(model, progress): after the last finished task when resuming, else the zero-shot model and its accuracies."""
        if resume and (self.progress_dir / "progress.json").is_file():
            from safetensors.torch import load_file

            progress = read_json(self.progress_dir / "progress.json")
            model = _with_weights(self.pristine, model, load_file(str(self.progress_dir / "model.safetensors")),
                                  f"task{len(progress['acc']) - 1}")
            log.info("resuming after task %d of %d", len(progress["acc"]), len(self.tasks))
            return model, progress
        return model, {"acc": [], "control_acc": [], "zeroshot": self.evaluate(model, self.tasks),
                       "zeroshot_control": self.evaluate(model, self.controls)}

    def learner(self, method, teacher: LoadedModel, data: ImageFolderData):
        """The method, wrapped with the strategy's extra losses when it has any."""
        config = self.config
        if config.strategy in DISTILLING:
            return ContinualLearner(method, config.strategy, config, teacher, *self.distillation_inputs(teacher, data))
        if config.l2 > 0:
            return ContinualLearner(method, config.strategy, config, teacher)
        return method

    def distillation_inputs(self, teacher: LoadedModel, data: ImageFolderData) -> tuple:
        """(images, the teacher's text features) a distilling strategy scores, as ZSCL's scripts give them: the
        reference images and sentences (zscl), else the task's training images with its class prompts (lwf) or
        the virtual vocabulary (lwf-vr)."""
        config = self.config
        if config.strategy == "zscl":
            images, phrases = self.references
            return images, encode_texts(teacher.text, teacher.text.tokenize(phrases))
        if config.strategy == "lwf-vr":
            vocabulary = virtual_vocabulary(teacher.text, config.vocab_size, config.vocab_length, config.seed)
            return data.split("train").files, encode_texts(teacher.text, vocabulary)
        return data.split("train").files, zeroshot_weights(teacher.text, data.classnames, self.templates)

    def learn(self, model: LoadedModel, index: int) -> LoadedModel:
        """Train task `index` from `model`; returns the model holding its (strategy-merged) weights."""
        config, accelerator = self.config, self.accelerator
        name, data = self.tasks[index]
        log.info("task %d/%d: %s (%d classes, %d training images)", index + 1, len(self.tasks), name, len(data.classes),
                 len(data.splits["train"]))
        previous = dataclasses.replace(model, clip=copy.deepcopy(model.clip))
        method = build_method(config.method, model, data.classnames, self.templates, config.method_options(),
                              data.named_descriptions, seed=config.seed)
        learner = self.learner(method, self.initial if config.strategy == "zscl" else previous, data)
        session = Session(config, model, data, self.templates, accelerator, self.run.cache)
        train = session.inputs("train", method.uses_image_features, train=True)
        val = session.inputs("val", method.uses_image_features) if len(data.splits["val"]) else None
        task_run = RunFolder(self.run.root / "tasks" / f"{index + 1}")
        if accelerator.is_main_process:
            task_run.prepare(overwrite=True)
        trainer = Trainer(learner, with_budget_lr(config, len(train)), task_run, accelerator)
        trainer.fit(train, val, data.classes)
        learner = accelerator.unwrap_model(trainer.model)
        if isinstance(learner, ContinualLearner):
            learner.release()
        load_method_state(learner, task_run.checkpoints / "best")  # the selected epoch, or ZSCL's weight average
        state = method.merged_state_dict()
        if config.strategy == "wise":  # ZSCL's WiSE-FT baseline: with the task-start weights (`--wise_merge`)
            anchor = previous.clip.state_dict() if config.wise_anchor == "task-start" else self.initial_state
            state = interpolate(anchor, state, config.wise_alpha)
        return _with_weights(self.pristine, model, state, f"task{index}")

    def record(self, model: LoadedModel, progress: Dict, index: int) -> None:
        """Accuracies after task `index` on every task and control, checkpointed with the weights (for --resume)."""
        progress["acc"].append(self.evaluate(model, self.tasks))
        progress["control_acc"].append(self.evaluate(model, self.controls))
        log.info("after %s: %s", self.tasks[index][0],
                 "  ".join(f"{name} {a:.2%}" for (name, _), a in zip(self.tasks, progress["acc"][-1])))
        if self.accelerator.is_main_process:
            from cliptune.core.runfolder import replace_dir

            staging = self.run.checkpoints / ".last-staging"
            atomic_save_safetensors(staging / "model.safetensors", model.clip.state_dict())
            atomic_write_json(staging / "progress.json", progress)
            replace_dir(staging, self.progress_dir)
