"""ZSCL (Zheng et al., "Preventing Zero-Shot Transfer Degradation in Continual Learning of Vision-Language Models",
ICCV'23; Thunderbeee/ZSCL `mtil/src/models/finetune.py::finetune`): distillation in feature space against the
*initial* model on reference images and all reference texts, plus the weight ensemble of the task-start weights and
a snapshot every `avg_every` steps from the first, used as the task's result; ZSCL.sh adds the L2 pull toward the
task-start weights (`--l2 1`)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

import torch

from cliptune.config.run import parse_dataset_spec
from cliptune.continual.base import FeatureDistillation, encode_texts
from cliptune.core.errors import CliptuneError
from cliptune.data.folders import image_files_under

DEFAULT_REFERENCE_TEXTS = Path(__file__).resolve().parents[1] / "assets" / "reference_texts.txt"


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


class ZSCL(FeatureDistillation):
    name = "zscl"
    summary = "distil the initial model on reference images and texts, and average the weights along each task"
    defaults = {"l2": 1.0}  # ZSCL.sh:13-26 adds --l2 1 to the ZSCL runs (not to lwf.sh, finetune.sh)

    def __init__(self, config):
        super().__init__(config)
        self.references = reference_images(config.reference), reference_texts(config.reference_texts)

    @classmethod
    def problem(cls, config):
        if not config.reference:
            return "zscl needs reference images: pass --reference DIR (any folder of images, unlabelled)"
        return None

    def teacher(self, initial, previous):
        return initial

    def distillation_inputs(self, teacher, data, templates):
        images, phrases = self.references
        return images, encode_texts(teacher.text, teacher.text.tokenize(phrases))

    def start_task(self, method, teacher, data, templates) -> None:
        super().start_task(method, teacher, data, templates)
        self.average = WeightAverage()  # ZSCL's `we_model` starts as a copy of the task-start model
        self.average.add(method.trainable_state_dict())
        self.steps = 0

    def after_optimizer_step(self, method) -> None:
        """A snapshot at iterations 0, avg_every, 2·avg_every, ... (each after its update)."""
        self.steps += 1
        if (self.steps - 1) % self.config.avg_every == 0:
            self.average.add(method.trainable_state_dict())

    def task_state(self, method):
        return {**method.learned_state_dict(), **self.average.mean}
