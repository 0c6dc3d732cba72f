"""Continual learning over a sequence of tasks without losing zero-shot ability.

Each task is learned with a mergeable method (`full` or `lora`) on the shared engine; the strategy adds
a regulariser to that method's loss and/or post-processes the weights after the task:

- `naive`: sequential fine-tuning.
- `lwf`: distil the previous model's class logits on the current images (Li & Hoiem, LwF).
- `lwf-vr`: LwF with replayed vocabulary ("Don't Stop Learning", Ding et al. 2022): the distillation is
  over a random sample of a large vocabulary (the reference texts) instead of the current classes.
- `zscl`: ZSCL (Zheng et al., ICCV'23): distillation in feature space against the *initial* model on
  reference images and reference texts (image->text and text->image similarity distributions), plus
  a running average of the weights every `avg_every` steps, used as the task's result.
- `wise`: after each task, interpolate with the initial weights (WiSE-FT).

All distillation terms are KL divergences, so they are exactly zero when student equals teacher.
After each task every task's test split (with its own classes) and every control set are evaluated
with the current model's zero-shot head; the MTIL metrics (Transfer, Avg, Last) follow ZSCL.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import random
import uuid
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cliptune.config import RunConfig, check_config, load_config, parse_dataset_spec, save_config
from cliptune.data import IMAGE_EXTENSIONS, ImageFolderData, eval_transform, load_imagefolder
from cliptune.engine import Trainer, load_method_state
from cliptune.errors import CliptuneError
from cliptune.methods import build_method, methods_exporting
from cliptune.models import LoadedModel
from cliptune.progress import RESULT
from cliptune.runfolder import RunFolder, atomic_save_safetensors, atomic_write_json, read_json
from cliptune.session import Session, make_accelerator, model_from_config
from cliptune.templates import load_templates
from cliptune.wise import interpolate
from cliptune.zeroshot import zeroshot_weights

log = logging.getLogger("cliptune")
DEFAULT_REFERENCE_TEXTS = Path(__file__).parent / "assets" / "reference_texts.txt"
STRATEGIES = ("naive", "lwf", "lwf-vr", "zscl", "wise")


# ----- losses and weight averaging (pure functions, tested directly) -----
def distillation_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)) * T^2, averaged over rows: zero iff the distributions match."""
    teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
    student = F.log_softmax(student_logits / temperature, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * temperature**2


def feature_distillation(student_images, student_texts, teacher_images, teacher_texts, scale, temperature=2.0):
    """ZSCL's two terms: image->text and text->image similarity distributions, student vs teacher."""
    student = scale * F.normalize(student_images, dim=-1) @ F.normalize(student_texts, dim=-1).T
    teacher = scale * F.normalize(teacher_images, dim=-1) @ F.normalize(teacher_texts, dim=-1).T
    return distillation_kl(teacher, student, temperature), distillation_kl(teacher.T, student.T, temperature)


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
    data = load_imagefolder(root, config.val_fraction, config.test_fraction, config.seed, shots, None, config.strict)
    name = Path(root).name
    if classes:
        unknown = sorted(set(classes) - set(data.classes))
        if unknown:
            raise CliptuneError(f"{root} has no class folder '{unknown[0]}' (from '{spec}')")
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
    files = sorted(p for folder in folders for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
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
    """Wraps a task's method: same forward and parameters; the loss adds the strategy's distillation.

    Presents the engine's method interface (forward, loss, trainable_*, after_optimizer_step) by
    delegating to the wrapped method, so the shared training loop is unchanged.
    """

    def __init__(self, method, strategy: str, config: RunConfig, teacher: Optional[LoadedModel] = None,
                 ref_images: Optional[List[Path]] = None, vocabulary: Optional[List[str]] = None):
        super().__init__()
        self.method = method
        self.strategy = strategy
        self.settings = config
        self.teacher = teacher
        self.vocabulary = vocabulary or []
        self.average = WeightAverage() if strategy == "zscl" else None
        self.steps = 0
        self._regulariser = None
        self._student_images = None
        self._rng = random.Random(config.seed)
        self._reference = None
        if strategy == "zscl":
            model = method.model
            transform = eval_transform(model.image_size, model.mean, model.std, model.interpolation)
            loader = DataLoader(UnlabelledImages(ref_images, transform), batch_size=config.batch_size, shuffle=True,
                                generator=torch.Generator().manual_seed(config.seed), drop_last=len(ref_images) > config.batch_size)
            self._reference = loader
            self._reference_iter = iter(loader)
        self._hook = None
        if strategy == "lwf-vr" and not method.uses_image_features:
            # capture the student's image features during the wrapped forward (no second image pass)
            self._hook = method.clip.visual.register_forward_hook(self._capture_image_features)
        if teacher is not None:
            with torch.no_grad():
                if strategy == "lwf":
                    self._teacher_classes = zeroshot_weights(teacher.text, method.classnames, method.templates)
                elif strategy == "lwf-vr":
                    self._teacher_vocab = torch.cat([teacher.text.encode(teacher.text.tokenize(self.vocabulary[i:i + 256]))
                                                     for i in range(0, len(self.vocabulary), 256)])

    # engine interface
    name = property(lambda self: self.method.name)
    config = property(lambda self: self.method.config)
    model = property(lambda self: self.method.model)
    classnames = property(lambda self: self.method.classnames)
    uses_image_features = property(lambda self: self.method.uses_image_features)

    def trainable_parameters(self):
        return self.method.trainable_parameters()

    def trainable_state_dict(self):
        return self.method.trainable_state_dict()

    def load_trainable_state_dict(self, state):
        self.method.load_trainable_state_dict(state)

    def train(self, mode: bool = True):
        super().train(mode)
        self.method.train(mode)
        if self.teacher is not None:
            self.teacher.clip.eval()
        return self

    def _capture_image_features(self, _module, _inputs, output):
        self._student_images = output

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        self._student_images = None
        logits = self.method(inputs)
        if self.training and self.strategy in ("lwf", "lwf-vr", "zscl"):
            self._regulariser = self._distillation(inputs, logits)
        return logits

    def loss(self, logits, labels, label_smoothing: float = 0.0):
        loss = self.method.loss(logits, labels, label_smoothing)
        return loss + self._regulariser if self._regulariser is not None else loss

    def after_optimizer_step(self) -> None:
        self.method.after_optimizer_step()
        self.steps += 1
        if self.average is not None and self.steps % self.settings.avg_every == 0:
            self.average.add(self.trainable_state_dict())

    def finish_task(self) -> bool:
        """Detach from the model (hook, per-step tensors); for ZSCL load the running weight average.

        Returns True when the weight average became the task's result (else the best epoch is used).
        """
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._student_images = self._regulariser = None
        if self.average is not None and self.average.count:
            self.load_trainable_state_dict(self.average.mean)
            return True
        return False

    # distillation terms
    def _student_text(self, texts: Sequence[str]) -> torch.Tensor:
        text = self.method.model.text
        return text.encode(text.tokenize(texts), normalize=False)

    def _distillation(self, inputs: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        teacher, settings = self.teacher, self.settings
        scale = teacher.logit_scale
        if self.strategy == "zscl":
            return self._zscl_terms(inputs.device, scale)
        features_fed = self.method.uses_image_features  # cached features: the image tower is frozen
        student_images = inputs if features_fed else self._student_images
        with torch.no_grad():
            teacher_images = inputs if features_fed else teacher.image.encode(inputs, normalize=False)
            teacher_images = F.normalize(teacher_images.float(), dim=-1)
        if self.strategy == "lwf":
            if logits.shape[-1] != len(self.method.classnames):
                raise CliptuneError("lwf distils class logits: use it with a classification loss (e.g. --set full.loss=ce)")
            teacher_logits = scale * teacher_images @ self._teacher_classes.T
            return distillation_kl(teacher_logits, logits, settings.distill_temperature)
        chosen = self._rng.sample(range(len(self.vocabulary)), min(settings.vocab_per_step, len(self.vocabulary)))
        teacher_logits = scale * teacher_images @ F.normalize(self._teacher_vocab[chosen], dim=-1).T
        student_texts = F.normalize(self._student_text([self.vocabulary[i] for i in chosen]), dim=-1)
        student_logits = scale * F.normalize(student_images, dim=-1) @ student_texts.T
        return distillation_kl(teacher_logits, student_logits, settings.distill_temperature)

    def _zscl_terms(self, device, scale) -> torch.Tensor:
        settings, teacher = self.settings, self.teacher
        try:
            ref = next(self._reference_iter)
        except StopIteration:
            self._reference_iter = iter(self._reference)
            ref = next(self._reference_iter)
        ref = ref.to(device)
        texts = self._rng.sample(self.vocabulary, min(settings.vocab_per_step, len(self.vocabulary)))
        student_images = self.method.model.image.encode(ref, normalize=False)
        with torch.no_grad():
            teacher_images = teacher.image.encode(ref, normalize=False)
            teacher_texts = teacher.text.encode(teacher.text.tokenize(texts), normalize=False)
        image_side, text_side = feature_distillation(student_images, self._student_text(texts), teacher_images,
                                                     teacher_texts, scale, settings.distill_temperature)
        return settings.distill_image * image_side + settings.distill_text * text_side


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(1.2 * len(tasks) + 3, 0.9 * len(acc) + 2))
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
    tmp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(tmp, dpi=100)
    plt.close(figure)
    tmp.replace(path)


def continual(config: RunConfig, out: str | Path, overwrite: bool = False, resume: bool = False) -> Dict:
    """Learn `config.tasks` in order with `config.strategy`; returns (and writes) RUN/continual.json."""

    run = RunFolder(out)
    if resume:
        config = load_config(run.config)
    check_config(config)
    if not config.tasks:
        raise CliptuneError("no tasks given: pass --task DIR (one per task, in order) or a recipe with 'tasks:'")
    if config.strategy not in STRATEGIES:
        raise CliptuneError(f"unknown strategy '{config.strategy}' (available: {', '.join(STRATEGIES)})")
    mergeable = methods_exporting("merged")
    if config.method not in mergeable:
        raise CliptuneError(f"continual learning carries merged weights from task to task: use --method {' or '.join(mergeable)}")
    if config.strategy == "zscl" and not config.reference:
        raise CliptuneError("zscl needs reference images: pass --reference DIR (any folder of images, unlabelled)")
    run.check_reusable(overwrite=overwrite, resume=resume)
    tasks = [load_task(spec, config, config.shots) for spec in config.tasks]
    controls = [load_task(spec, config, None) for spec in config.controls]
    templates = load_templates(config.templates)
    ref_images = reference_images(config.reference) if config.strategy == "zscl" else None
    vocabulary = reference_texts(config.reference_texts) if config.strategy in ("lwf-vr", "zscl") else None
    accelerator = make_accelerator(config.mixed_precision)
    model = model_from_config(config, accelerator.device)
    if accelerator.is_main_process:
        run.prepare(overwrite=overwrite, resume=resume)
    accelerator.wait_for_everyone()
    handler = run.attach_log() if accelerator.is_main_process else None
    try:
        if accelerator.is_main_process and not resume:
            save_config(config, run.config)
        pristine = copy.deepcopy(model.clip)
        initial = dataclasses.replace(model, clip=copy.deepcopy(model.clip))
        initial_state = {k: v.detach().clone() for k, v in model.clip.state_dict().items()}
        names = [name for name, _ in tasks]
        progress_dir = run.checkpoints / "last"
        if resume and (progress_dir / "progress.json").is_file():
            from safetensors.torch import load_file

            progress = read_json(progress_dir / "progress.json")
            model = _with_weights(pristine, model, load_file(str(progress_dir / "model.safetensors")), f"task{len(progress['acc']) - 1}")
            log.info("resuming after task %d of %d", len(progress["acc"]), len(tasks))
        else:
            progress = {"acc": [], "control_acc": [],
                        "zeroshot": [_evaluate(config, model, d, templates, accelerator, run.cache) for _, d in tasks],
                        "zeroshot_control": [_evaluate(config, model, d, templates, accelerator, run.cache) for _, d in controls]}
        for index in range(len(progress["acc"]), len(tasks)):
            name, data = tasks[index]
            log.info("task %d/%d: %s (%d classes, %d training images)", index + 1, len(tasks), name, len(data.classes), len(data.splits["train"]))
            previous = dataclasses.replace(model, clip=copy.deepcopy(model.clip))
            teacher = initial if config.strategy == "zscl" else previous
            method = build_method(config.method, model, data.classnames, templates, config.method_options(), data.named_descriptions)
            learner = method if config.strategy in ("naive", "wise") else ContinualLearner(
                method, config.strategy, config, teacher, ref_images, vocabulary)
            session = Session(config, model, data, templates, accelerator, run.cache)
            train = session.inputs("train", method.uses_image_features, train=True)
            val = session.inputs("val", method.uses_image_features) if len(data.splits["val"]) else None
            task_run = RunFolder(run.root / "tasks" / f"{index + 1}")
            if accelerator.is_main_process:
                task_run.prepare(overwrite=True)
            trainer = Trainer(learner, config, task_run, accelerator)
            trainer.fit(train, val, data.classes)
            learner = accelerator.unwrap_model(trainer.model)
            averaged = learner.finish_task() if isinstance(learner, ContinualLearner) else False
            if not averaged:  # ZSCL keeps its weight average; the others their best epoch
                load_method_state(learner, task_run.checkpoints / "best")
            state = method.merged_state_dict()
            if config.strategy == "wise":
                state = interpolate(initial_state, state, config.wise_alpha)
            model = _with_weights(pristine, model, state, f"task{index}")
            progress["acc"].append([_evaluate(config, model, d, templates, accelerator, run.cache) for _, d in tasks])
            progress["control_acc"].append([_evaluate(config, model, d, templates, accelerator, run.cache) for _, d in controls])
            log.info("after %s: %s", name, "  ".join(f"{n} {a:.2%}" for n, a in zip(names, progress["acc"][-1])))
            if accelerator.is_main_process:
                from cliptune.runfolder import replace_dir

                staging = run.checkpoints / ".last-staging"
                atomic_save_safetensors(staging / "model.safetensors", model.clip.state_dict())
                atomic_write_json(staging / "progress.json", progress)
                replace_dir(staging, progress_dir)
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
    finally:
        if handler is not None:
            logging.getLogger("cliptune").removeHandler(handler)
            handler.close()
