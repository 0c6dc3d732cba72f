"""What every command sets up before it works: the accelerator, the model, the data and the templates.

`api`, `export`, `wise` and `continual` build on this module and not on each other, so the library
has no import cycles (tests/test_imports.py walks them).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F

from cliptune.config.run import RunConfig, load_config
from torch.utils.data import Dataset
from torchvision import transforms as T

from cliptune.data.folders import (ImageDataset, split_key, ImageFolderData, augments, eval_geometry, eval_transform, labels_tensor,
                           loader_settings, train_transform)
from cliptune.training.checkpoints import load_method_state
from cliptune.training.engine import Inputs
from cliptune.core.cachedir import feature_cache
from cliptune.core.errors import CliptuneError
from cliptune.models.features import FeatureMemory, image_features, zeroshot_text_features
from cliptune.models.zeroshot import PAIR_TEMPLATES
from cliptune.data.imagecache import DecodedImages, decode_split, train_size
from cliptune.data.manifest import ManifestColumns
from cliptune.data.sources import load_data
from cliptune.methods import build_method
from cliptune.methods.base import Method
from cliptune.core.metrics import classification_metrics
from cliptune.models.loading import LoadedModel, load_model
from cliptune.core.runfolder import RunFolder, read_json
from cliptune.data.templates import load_templates


def model_from_config(config: RunConfig, device: str | torch.device = "cpu") -> LoadedModel:
    """The base model a run config names (what every command that rebuilds a run starts from)."""
    model = load_model(config.model, config.pretrained, config.model_config, device=device, seed=config.seed)
    if config.grad_checkpointing:  # only acts while gradients flow, so evaluation-only commands are unaffected
        model.clip.set_grad_checkpointing(True)
    return model


def validation_shots(config: RunConfig) -> Optional[int]:
    """Validation images kept per class: `val_shots` (0 = all), by default min(shots, 4) with --shots (Dassl)."""
    if config.val_shots is not None:
        return config.val_shots or None
    return min(config.shots, 4) if config.shots else None


TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def make_accelerator(mixed_precision: str = "no", report_to: str = "none", project_dir: Optional[Path] = None):
    """An Accelerator for one run of this process (logging to `report_to`'s tracker under `project_dir/tracking`).

    accelerate keeps one process-wide `AcceleratorState` whose mixed precision cannot change once set (and has
    no public way to start over): the runs of one Python process (the API, notebooks, `compare`, `sweep`) share
    the first run's precision, and a run asking for another one is refused with one line instead of a traceback."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, is_initialized

    if is_initialized() and AcceleratorState().mixed_precision != mixed_precision:
        raise CliptuneError(f"mixed precision '{mixed_precision}' cannot follow '{AcceleratorState().mixed_precision}' in one "
                            "Python process (accelerate fixes it per process): run it in a new process")
    mps = getattr(torch.backends, "mps", None)
    has_accelerator = torch.cuda.is_available() or bool(mps and mps.is_available())
    try:
        # cpu=True on CPU-only machines is what makes accelerate use gloo under torchrun
        return Accelerator(mixed_precision=mixed_precision, cpu=not has_accelerator, **tracking(report_to, project_dir))
    except ValueError as exc:
        raise CliptuneError(f"mixed precision '{mixed_precision}' is not available here: {exc}") from None


def tracking(report_to: str, project_dir: Optional[Path]) -> Dict[str, Any]:
    """Accelerator arguments for an experiment tracker; one line when its package is not installed."""
    if report_to == "none":
        return {}
    import importlib.util

    if importlib.util.find_spec(TRACKER_PACKAGES[report_to]) is None:
        raise CliptuneError(f"--report-to {report_to} needs the {TRACKER_PACKAGES[report_to]} package: "
                            f"pip install {TRACKER_PACKAGES[report_to]} (or cliptune[tracking] for tensorboard)")
    return {"log_with": report_to, "project_dir": str(Path(project_dir or ".") / "tracking")}


def tracked_settings(config: RunConfig) -> Dict[str, Any]:
    """The run's settings as a tracker's hyperparameters: the scalar ones (trackers take no lists or None)."""
    return {key: value for key, value in config.to_dict().items() if isinstance(value, (str, int, float, bool))}


def report_summary(config: RunConfig, root: Path, name: str, records: Dict[int, Dict[str, float]]) -> None:
    """A command's summary (compare's table by shots, a sweep's trials by number) to `config.report_to`'s tracker,
    under ROOT/tracking/NAME: one record of scalars per step."""
    if config.report_to == "none":
        return
    accelerator = make_accelerator(config.mixed_precision, config.report_to, root)
    accelerator.init_trackers(name, config=tracked_settings(config))
    for step, scalars in sorted(records.items()):
        accelerator.log(scalars, step=step)
    accelerator.end_training()


def evaluation_config(config: RunConfig, data_dir: Optional[str] = None, classnames: Optional[str] = None) -> RunConfig:
    """A finished run's config for evaluating on `data_dir` (its own data when None): every image of the splits (no
    shots), and another dataset's own class names (its folder names or classnames.yaml) unless `classnames` is given."""
    config = dataclasses.replace(config, shots=None)
    if classnames:
        config.classnames = classnames
    elif data_dir and Path(data_dir).resolve() != Path(config.data or "").resolve():
        config.classnames = None
    return config


def data_source(config: RunConfig) -> Dict[str, Any]:
    """How the run reads `--data` and continual task specs: their format and a manifest's column names."""
    multi_label = {"auto": None, "single-label": False, "multi-label": True}[config.task]
    columns = ManifestColumns(config.path_col, config.label_col, config.split_col, config.caption_col, multi_label, config.label_sep)
    return {"data_format": config.data_format, "columns": columns}


@dataclass
class Session:
    """Model, data and templates of one command, on the accelerator's device."""

    config: RunConfig
    model: LoadedModel
    data: ImageFolderData
    templates: list
    accelerator: Any  # accelerate's Accelerator
    cache_dir: Optional[Path]
    # decoded-image caches by the key of their files and size (shared with base/novel halves of the session)
    decoded: Dict[str, Optional[torch.Tensor]] = field(default_factory=dict)
    # seconds spent decoding into those caches (a shared dict, so the halves add to one figure)
    stats: Dict[str, float] = field(default_factory=lambda: {"decode": 0.0})
    # image-tower methods: encode (zero-shot) features from the decoded-image cache that training and evaluation use
    images_for_features: bool = False
    # image features of the last few splits, shared with the sessions `reused` from this one (a sweep's trials)
    memory: FeatureMemory = field(default_factory=FeatureMemory)
    # where image features are cached on disk (`use_feature_cache`); None: `cache_dir`, with the decoded images
    feature_dir: Optional[Path] = None

    def use_feature_cache(self, run_cache: Path) -> None:
        """Cache features where the config says (the shared user cache by default), decoded images in `run_cache`."""
        self.cache_dir = run_cache
        self.feature_dir = feature_cache(self.config.cache_dir, run_cache)

    @classmethod
    def open(cls, config: RunConfig, accelerator, cache_dir: Optional[Path] = None, data_dir: Optional[str] = None) -> "Session":
        data_dir = data_dir or config.data
        if not data_dir:
            raise CliptuneError("no data given: pass --data DIR (an ImageFolder root) or --data FILE (a CSV/TSV/JSONL manifest)")
        data = load_data(data_dir, config.val_fraction, config.test_fraction, config.seed, config.shots, config.classnames,
                         config.strict, validation_shots(config), **data_source(config))
        if config.zeroshot_pairs and not data.multi_label:
            raise CliptuneError(f"--zeroshot-pairs scores multi-label data; {data.root} has one label per image")
        templates = load_templates(config.templates)
        model = model_from_config(config, accelerator.device)
        return cls(config, model, data, templates, accelerator, cache_dir)

    def reused(self, config: RunConfig, accelerator) -> "Session":
        """This session for another run of the same data and model (a sweep trial): the data, templates and
        decoded images are shared; a method that trains inside the towers gets its own copy of the model."""
        from cliptune.methods import method_class

        model = self.model if method_class(config.method).uses_image_features else copy.deepcopy(self.model)
        return dataclasses.replace(self, config=config, model=model, accelerator=accelerator)

    @property
    def eval_transform(self):
        m = self.model
        return eval_transform(m.image_size, m.mean, m.std, m.interpolation)

    @property
    def train_transform(self):
        c, m = self.config, self.model
        return train_transform(m.image_size, m.mean, m.std, c.aug_crop_scale, c.aug_hflip, c.aug_color_jitter, m.interpolation)

    @property
    def num_workers(self) -> int:
        return loader_settings(self.config.num_workers, self.accelerator.device)["num_workers"]

    def features(self, split: str, augmented: bool = False) -> torch.Tensor:
        c = self.config
        views = c.aug_views if augmented else 0
        transform = self.train_transform if views > 0 else self.eval_transform
        return image_features(
            self.model, self.data.split(split), transform, views=views, seed=c.seed,
            cache_dir=self.feature_dir if self.feature_dir is not None else self.cache_dir,
            batch_size=c.eval_batch_size, num_workers=self.num_workers, accelerator=self.accelerator, desc=f"{split} features",
            images=self.images(split) if views == 0 and self.images_for_features and c.image_cache != "off" else None,
            memory=self.memory,
        )

    def images(self, split: str, train: bool = False) -> Dataset:
        """The split's images as the image tower takes them: through the decoded-image cache, or decoded at use (`off`)."""
        c, m = self.config, self.model
        files = self.data.split(split)
        augmenting = train and augments(c.aug_crop_scale, c.aug_hflip, c.aug_color_jitter)
        if c.image_cache != "off":
            size = train_size(m.image_size, files) if augmenting else tuple(m.image_size)
            geometry = T.Compose(eval_geometry(size, m.interpolation))
            key = split_key([repr(geometry)], files)
            if key not in self.decoded:
                began = time.perf_counter()
                self.decoded[key] = decode_split(files, geometry, size, [repr(geometry)], mode=c.image_cache, cache_dir=self.cache_dir,
                                                 num_workers=self.num_workers, accelerator=self.accelerator, desc=f"decoding {split}")
                self.stats["decode"] += time.perf_counter() - began
            decoded = self.decoded[key]
            if decoded is not None:
                return DecodedImages(decoded, files.labels, m.mean, m.std, self.train_transform if augmenting else None)
        return ImageDataset(files, self.train_transform if train else self.eval_transform)

    def inputs(self, split: str, use_features: bool, train: bool = False) -> Inputs:
        files = self.data.split(split)
        labels = labels_tensor(files)
        # training inputs carry the images' captions (what a contrastive loss pairs them with), when the data has any
        captions = [self.data.captions.get(f) for f in files.files] if train and self.data.captions else None
        if use_features and not (train and self.config.aug_per_step):
            return Inputs(labels=labels, features=self.features(split, augmented=train), captions=captions)
        return Inputs(labels=labels, images=self.images(split, train), captions=captions)

    @property
    def zeroshot_scoring(self) -> str:
        """How zero-shot logits become multi-label probabilities: a sigmoid for prompt pairs, else the softmax."""
        return "sigmoid" if self.config.zeroshot_pairs else "softmax"

    def zeroshot_logits(self, split: str) -> torch.Tensor:
        """The zero-shot head on `split`: the templates' class features, or (`zeroshot_pairs`) each class's positive
        minus its negative prompt feature (`PAIR_TEMPLATES`)."""
        def encoded(templates):
            return zeroshot_text_features(self.model, self.data.classnames, templates, cache_dir=self.feature_dir,
                                          memory=self.memory)

        if self.config.zeroshot_pairs:
            weights = encoded(PAIR_TEMPLATES[:1]) - encoded(PAIR_TEMPLATES[1:])
        else:
            weights = encoded(self.templates)
        features = F.normalize(self.features(split).to(weights.device), dim=-1)
        return self.model.logit_scale * features @ weights.T

    def zeroshot_metrics(self, split: str, thresholds: Optional[List[float]] = None) -> Dict:
        """Zero-shot metrics of `split` (multi-label: at per-class `thresholds`, else fitted on the split)."""
        return classification_metrics(self.zeroshot_logits(split), labels_tensor(self.data.split(split)), self.data.classes,
                                      thresholds=thresholds, scoring=self.zeroshot_scoring)


def finished_run(run_dir: str | Path) -> tuple:
    """A finished run's config, its best-weights folder and that folder's method.json."""
    run = RunFolder(run_dir)
    config = load_config(run.config)
    best = run.checkpoints / "best"
    if not (best / "method.json").is_file():
        raise CliptuneError(f"{run.root} has no trained weights (checkpoints/best is missing)")
    if kept_zeroshot(run):
        raise CliptuneError(f"{run.root} kept the zero-shot classifier (--fallback zero-shot), not its trained weights; "
                            "use `cliptune predict` or `cliptune export --format classifier`")
    return config, best, read_json(best / "method.json")


def kept_zeroshot(run: RunFolder) -> bool:
    """True when a finished run's result is the zero-shot classifier (`--fallback zero-shot` fired)."""
    return run.metrics.is_file() and read_json(run.metrics).get("result") == "zero-shot"


def load_run_method(run_dir: str | Path, device: str | torch.device = "cpu") -> Method:
    """The run's method with its best weights, on the base model the run was trained from."""
    config, best, sidecar = finished_run(run_dir)
    model = model_from_config(config, device)
    method = build_method(sidecar["method"], model, sidecar["classes"], load_templates(config.templates), sidecar["config"])
    load_method_state(method, best)
    return method.to(device).eval()
