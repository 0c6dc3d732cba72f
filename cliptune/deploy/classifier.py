"""Use an adapted model: `cliptune.load(RUN_OR_EXPORT)` gives a `Classifier`; `export_classifier` writes one.

A `Classifier` works the same for every method, through the method registry: a run's method is rebuilt
with `build_method` and its learned state loaded (`load_method_state`), then fed what it was trained on
(image features when `method.uses_image_features`, else images). Zero-shot runs, and runs whose method
folds into CLIP's weights (`merged_state_dict()`), classify with the zero-shot head: class text
features of the (merged) text tower, averaged over the run's templates.

A classifier export (`cliptune export RUN --format classifier --output DIR`) needs no training data:

- `classifier.json`: classes, class names, templates, preprocessing, method and its options, base model;
- `model.safetensors`: the open_clip weights (merged where the method merges; the base weights when
  they are a local file or random, so the export does not depend on a file elsewhere), absent when the
  base is a published open_clip tag (then `classifier.json` names it);
- `model-config.json`: the open_clip model config, when the run used `--model-config`;
- `head.safetensors` (zero-shot head: fixed class features and logit scale) or `method.safetensors`
  (the method's learned parameters, loaded onto the rebuilt method).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union, cast

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from cliptune.config.run import load_config
from cliptune.data.folders import eval_transform, image_files_under
from cliptune.data.manifest import is_manifest, manifest_images
from cliptune.training.checkpoints import load_method_state
from cliptune.core.errors import CliptuneError
from cliptune.core.metrics import label_scores
from cliptune.methods import build_method
from cliptune.methods.base import Mergeable, Method
from cliptune.models.loading import LoadedModel, _resolve_local_text_paths, load_model
from cliptune.core.progress import progress_bar
from cliptune.core.runfolder import RunFolder, atomic_save_safetensors, atomic_write_json, read_json, replace_dir
from cliptune.training.session import finished_run, load_run_method, model_from_config
from cliptune.data.templates import load_templates
from cliptune.models.zeroshot import PAIR_TEMPLATES, zeroshot_weights

SIDECAR = "classifier.json"
MODEL_WEIGHTS = "model.safetensors"
MODEL_CONFIG = "model-config.json"
HEAD_WEIGHTS = "head.safetensors"
METHOD_WEIGHTS = "method.safetensors"
FORMAT_VERSION = 1
SELF_CHECK_TOLERANCE = 1e-4

ImageInput = Union[str, Path, Image.Image]


class ZeroShotHead(nn.Module):
    """Images -> logits against fixed class text features (zero-shot runs and merged methods)."""

    # buffers (registered in __init__/prepare; declared for type checkers)
    class_features: torch.Tensor
    logit_scale: torch.Tensor

    def __init__(self, model: LoadedModel, class_features: torch.Tensor, logit_scale: torch.Tensor):
        super().__init__()
        self.model = model
        self.clip = model.clip  # registered, so that .to(device) moves it
        self.register_buffer("class_features", class_features.detach().clone())
        self.register_buffer("logit_scale", logit_scale.detach().clone().reshape(()))

    @classmethod
    def of(cls, model: LoadedModel, classnames: Sequence[str], templates: Sequence[str], pairs: bool = False) -> "ZeroShotHead":
        """The templates' head, or with `pairs` the prompt-pair head (positive minus negative prompt features)."""
        if pairs:
            positive, negative = (zeroshot_weights(model.text, classnames, [template]) for template in PAIR_TEMPLATES)
            return cls(model, positive - negative, model.logit_scale)
        return cls(model, zeroshot_weights(model.text, classnames, templates), model.logit_scale)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.image.encode(images, normalize=True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * self.image_features(images) @ self.class_features.T


class ImageClassifier(nn.Module):
    """Preprocessed images -> class logits through a method, fed what it trained on (features or images)."""

    def __init__(self, method: Method):
        super().__init__()
        self.method = method

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embeddings; a method with a prompted image tower (MaPLe) supplies its own."""
        return F.normalize(self.method.image_features(images), dim=-1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.method.uses_image_features:
            return self.method(self.method.model.image.encode(images, normalize=False))
        return self.method(images)


def preprocessing_of(model: LoadedModel) -> Dict:
    """CLIP's evaluation preprocessing as data (for the JSON sidecars): resize short side, centre crop, normalise."""
    return {"resize": int(model.image_size[0]), "crop": [int(s) for s in model.image_size], "mean": list(model.mean),
            "std": list(model.std), "interpolation": model.interpolation, "channels": "RGB", "layout": "NCHW"}


class Classifier:
    """An adapted CLIP classifier: `classes`, `preprocess` (PIL -> tensor), `predict`, `logits`, `encode_image`."""

    def __init__(self, network: nn.Module, classes: Sequence[str], classnames: Sequence[str], templates: Sequence[str],
                 preprocessing: Dict, info: Dict, thresholds: Optional[Dict[str, float]] = None, scoring: str = "softmax"):
        self.network: Any = network.eval()  # a ZeroShotHead or an ImageClassifier
        # multi-label: each class's probability threshold (fitted on the run's val split); None for single-label
        self.thresholds = thresholds
        self.scoring = scoring  # how logits become probabilities: softmax, or sigmoid (multi-label zero-shot prompt pairs)
        self.classes = list(classes)
        self.classnames = list(classnames)
        self.templates = list(templates)
        self.preprocessing = preprocessing
        self.info = info  # method, its options, the base model, where it came from
        p = preprocessing
        self._transform = eval_transform((p["crop"][0], p["crop"][1]), p["mean"], p["std"], p["interpolation"])
        self.device = torch.device("cpu")

    @property
    def method(self) -> str:
        return self.info["method"]

    def __repr__(self) -> str:
        return f"Classifier(method={self.method!r}, classes={len(self.classes)}, source={self.info['source']!r})"

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """(3, H, W) input tensor for one PIL image, as at evaluation."""
        return self._transform(image.convert("RGB"))

    def to(self, device: str | torch.device) -> "Classifier":
        self.device = torch.device(device)
        self.network.to(self.device)
        return self

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """(batch, classes) logits for a batch of preprocessed images."""
        return self.network(images.to(self.device)).float()

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(batch, dim) unit-norm image embeddings of the classifier's (adapted) image tower."""
        return self.network.image_features(images.to(self.device)).float()

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return label_scores(logits, self.scoring)

    def _top(self, probabilities: torch.Tensor, topk: int) -> List[List[Tuple[str, float]]]:
        """Per image, its top-k (class, probability) pairs; multi-label: every class above its threshold, most likely
        first (none when no class is)."""
        if self.thresholds is not None:
            cut = torch.tensor([self.thresholds[c] for c in self.classes], device=probabilities.device)
            return [sorted(((self.classes[i], float(row[i])) for i in (row >= cut).nonzero().flatten().tolist()),
                           key=lambda pair: -pair[1]) for row in probabilities]
        values, indices = probabilities.topk(min(topk, len(self.classes)), dim=1)
        return [[(self.classes[i], float(v)) for v, i in zip(row_v, row_i)] for row_v, row_i in zip(values.tolist(), indices.tolist())]

    def predict(self, images: Sequence[ImageInput], topk: int = 5, batch_size: int = 32) -> List[List[Tuple[str, float]]]:
        """Per image (a path or a PIL image), its top-k (class, probability) pairs, most likely first (multi-label: the
        classes above their thresholds)."""
        if isinstance(images, (str, Path, Image.Image)):
            images = [images]
        results = []
        for start in range(0, len(images), batch_size):
            batch = torch.stack([self.preprocess(_open(item)) for item in images[start : start + batch_size]])
            results += self._top(self.probabilities(self.logits(batch)), topk)
        return results

    def predict_files(self, paths: Sequence[Path], topk: int = 5, batch_size: int = 32) -> Tuple[List[Tuple[Path, list]], List[Path]]:
        """Predictions for image files, skipping (and returning) those that cannot be decoded; one batch at a time."""
        predictions, unreadable = [], []
        bar = progress_bar(total=len(paths), desc="predict", unit="img", leave=False) if len(paths) > batch_size else None
        for start in range(0, len(paths), batch_size):
            decoded, tensors = [], []
            for path in paths[start : start + batch_size]:
                try:
                    tensors.append(self.preprocess(_open(path)))
                    decoded.append(path)
                except CliptuneError:
                    unreadable.append(path)
            if tensors:
                predictions += list(zip(decoded, self._top(self.probabilities(self.logits(torch.stack(tensors))), topk)))
            if bar is not None:
                bar.update(len(paths[start : start + batch_size]))
        if bar is not None:
            bar.close()
        return predictions, unreadable


def _open(item: ImageInput) -> Image.Image:
    if isinstance(item, Image.Image):
        return item
    try:
        with Image.open(item) as image:
            image.load()
            return image
    except (OSError, SyntaxError, ValueError) as exc:
        raise CliptuneError(f"cannot read image {item}: {exc}") from None


def image_files(inputs: Sequence[str | Path]) -> List[Path]:
    """Files named, the image files under folders named (recursively, sorted) and the images a CSV/TSV/JSONL
    manifest lists (its `path` column, in row order); missing paths are kept, to be reported."""
    files: List[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += image_files_under(item)
        elif is_manifest(item):
            files += manifest_images(item)
        else:
            files.append(item)
    return files


# ----- loading -----
def load(source: str | Path, device: str | torch.device = "cpu") -> Classifier:
    """A `Classifier` from a finished run folder (any method, or zero-shot) or a classifier export folder."""
    source = Path(source)
    if (source / SIDECAR).is_file():
        return _load_export(source).to(device)
    if (source / "config.yaml").is_file():
        return _load_run(source).to(device)
    raise CliptuneError(f"{source} is neither a cliptune run folder (config.yaml) nor a classifier export ({SIDECAR})")


def _run_templates(config, metrics: Dict) -> List[str]:
    return list(metrics["templates"]) if metrics.get("templates") else load_templates(config.templates)


def _load_run(run_dir: Path) -> Classifier:
    run = RunFolder(run_dir)
    if not run.is_finished():
        raise CliptuneError(f"{run.root} is not a finished run (no metrics.json)")
    config, metrics = load_config(run.config), read_json(run.metrics)
    templates = _run_templates(config, metrics)
    info = {"method": metrics["method"], "source": str(run.root.resolve())}
    result = metrics.get(metrics.get("split", "test")) or {}
    scoring = result.get("scores", "softmax")
    network: nn.Module
    if metrics["method"] == "zeroshot" or metrics.get("result") == "zero-shot":  # a zero-shot run, or the fallback
        info["method"] = "zeroshot"
        model = model_from_config(config)
        network = ZeroShotHead.of(model, metrics["classnames"], templates, pairs=scoring == "sigmoid")
    else:
        method = load_run_method(run_dir)
        info["options"] = method.config.to_dict()
        network, model = ImageClassifier(method), method.model
    info["model"] = {"model": model.spec.model, "pretrained": model.spec.pretrained, "model_config": model.spec.model_config}
    return Classifier(network, metrics["classes"], metrics["classnames"], templates, preprocessing_of(model), info,
                      result.get("thresholds"), scoring)  # multi-label: thresholds fitted on val


def _load_export(folder: Path) -> Classifier:
    sidecar = read_json(folder / SIDECAR)
    if sidecar.get("format") != "cliptune-classifier":
        raise CliptuneError(f"{folder / SIDECAR} is not a cliptune classifier sidecar")
    base = sidecar["model"]
    model = _load_model_from(folder, base)
    network: nn.Module
    if sidecar["head"] == "zeroshot":
        from safetensors.torch import load_file

        head = load_file(str(folder / HEAD_WEIGHTS))
        network = ZeroShotHead(model, head["class_features"], head["logit_scale"])
    else:
        method = build_method(sidecar["method"], model, sidecar["classnames"], sidecar["templates"], sidecar["options"])
        load_method_state(method, folder)
        network = ImageClassifier(method)
    info = {"method": sidecar["method"], "options": sidecar.get("options"), "model": base, "source": str(folder.resolve())}
    return Classifier(network, sidecar["classes"], sidecar["classnames"], sidecar["templates"], sidecar["preprocessing"], info,
                      sidecar.get("thresholds"), sidecar.get("scores", "softmax"))


# ----- export -----
def _is_published_tag(spec) -> bool:
    """True when open_clip can fetch the base weights by name (a pretrained tag or an hf-hub model)."""
    name, pretrained = str(spec.model or ""), spec.pretrained
    if name.startswith("hf-hub:"):
        return True
    return bool(pretrained) and not spec.is_random_init and not Path(pretrained).is_file()


def _write_model_config(spec, folder: Path) -> None:
    """The run's open_clip model config, with local Hugging Face text folders made absolute."""
    if not spec.model_config:
        return
    config = json.loads(Path(spec.model_config).read_text())
    _resolve_local_text_paths(config, Path(spec.model_config).resolve().parent)
    atomic_write_json(folder / MODEL_CONFIG, config)


def merges(classifier: Classifier) -> bool:
    """True when the classifier's method folds into CLIP's weights (it has `merged_state_dict()`: lora, full)."""
    return callable(getattr(getattr(classifier.network, "method", None), "merged_state_dict", None))


def export_classifier(run_dir: str | Path, output: str | Path, run_classifier: Optional[Classifier] = None) -> Path:
    """Write a self-contained classifier folder for a finished run, then check it reproduces the run's logits.

    `run_classifier`: the run's classifier when the caller has loaded it already.
    """
    run_classifier = run_classifier or load(run_dir)
    network = run_classifier.network
    output = Path(output)
    staging = output.parent / f".{output.name}.staging"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        model = network.model if isinstance(network, ZeroShotHead) else network.method.model
        spec = model.spec
        method = getattr(network, "method", None)
        merged = merges(run_classifier)
        sidecar = {
            "format": "cliptune-classifier", "version": FORMAT_VERSION, "method": run_classifier.method,
            "options": method.config.to_dict() if method is not None else None,
            "classes": run_classifier.classes, "classnames": run_classifier.classnames, "templates": run_classifier.templates,
            "preprocessing": run_classifier.preprocessing, "thresholds": run_classifier.thresholds,
            "scores": run_classifier.scoring,
            "model": {"model": spec.model, "pretrained": spec.pretrained if _is_published_tag(spec) else None},
            "weights": "merged" if merged else "base",
            "head": "zeroshot" if merged or method is None else "method",
            "run": run_classifier.info["source"],
        }
        _write_model_config(spec, staging)
        if merged:
            state = cast(Mergeable, method).merged_state_dict()
        elif not _is_published_tag(spec):  # a local or random base (seeded like the run): its weights travel along
            state = model_from_config(load_config(RunFolder(run_dir).config)).clip.state_dict()
        else:
            state = None
        if state is not None:
            atomic_save_safetensors(staging / MODEL_WEIGHTS, state, metadata={"format": "pt", "cliptune_weights": sidecar["weights"]})
        if sidecar["head"] == "zeroshot":
            # the fixed head of the exported weights: computed from them exactly as loading would
            exported = _load_model_from(staging, sidecar["model"])
            head = ZeroShotHead.of(exported, run_classifier.classnames, run_classifier.templates,
                                   pairs=run_classifier.scoring == "sigmoid")
            atomic_save_safetensors(staging / HEAD_WEIGHTS, {"class_features": head.class_features, "logit_scale": head.logit_scale})
        else:  # the run's own checkpoint file: exactly what `load_method_state` reads back
            shutil.copyfile(finished_run(run_dir)[1] / METHOD_WEIGHTS, staging / METHOD_WEIGHTS)
        atomic_write_json(staging / SIDECAR, sidecar)
        _check_same_logits(run_classifier, _load_export(staging), f"classifier export of {run_dir}")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replace_dir(staging, output)
    return output


def _load_model_from(folder: Path, base: Dict) -> LoadedModel:
    weights, config_file = folder / MODEL_WEIGHTS, folder / MODEL_CONFIG
    config = str(config_file) if config_file.is_file() else None
    if weights.is_file() and str(base["model"]).startswith("hf-hub:"):
        # open_clip ignores `pretrained` for hub models: build from the hub (or its cache), then load the export's weights
        from safetensors.torch import load_file

        model = load_model(base["model"], None, config)
        model.clip.load_state_dict(load_file(str(weights)))
        return model
    return load_model(base["model"], str(weights) if weights.is_file() else base["pretrained"], config)


def probe_images(classifier: Classifier, batch: int = 3, seed: int = 0) -> torch.Tensor:
    """A fixed batch of random preprocessed-looking images, to compare two forms of the same classifier."""
    size = classifier.preprocessing["crop"]
    return torch.randn(batch, 3, size[0], size[1], generator=torch.Generator().manual_seed(seed))


def _check_same_logits(expected: Classifier, got: Classifier, what: str) -> None:
    images = probe_images(expected)
    difference = float((expected.logits(images) - got.logits(images)).abs().max())
    if difference > SELF_CHECK_TOLERANCE:
        raise CliptuneError(f"{what} does not reproduce the run (logits differ by {difference:.2e}); nothing was written")
