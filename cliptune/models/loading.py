"""One entry point, `load_model()`, in front of open_clip's factory.

It resolves the three ways users name a model (an open_clip architecture with a pretrained tag,
an `hf-hub:` repo, or a local checkpoint file with an optional custom JSON config) and turns every
failure a user can cause into a one-sentence `CliptuneError`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import os
import tempfile
import warnings
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import open_clip
import torch
from torch import nn

from cliptune.core.errors import CliptuneError
from cliptune.core.seeding import isolated_rng
from cliptune.models.towers import HFTextTower, ImageTower, TextTower, text_tower

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
log = logging.getLogger("cliptune")
RANDOM_INIT = ("", "none", "random")
SCHEMAS = ("hf-hub:", "local-dir:")  # open_clip model names that carry their weights (`--pretrained` is ignored)


@dataclass(frozen=True)
class ModelSpec:
    """How the user named the model: enough to rebuild it from a run's config."""

    model: Optional[str] = None
    pretrained: Optional[str] = None
    model_config: Optional[str] = None
    # Set when the weights were changed in memory (e.g. after a continual-learning task), so cached
    # features of the original weights are never reused.
    revision: Optional[str] = None
    # the seed of a random initialisation: two random models of one architecture differ by it
    init_seed: Optional[int] = None

    @property
    def display_name(self) -> str:
        return self.model or Path(self.model_config or "").stem

    @property
    def is_random_init(self) -> bool:
        return self.pretrained is None or str(self.pretrained).lower() in RANDOM_INIT

    def fingerprint(self) -> str:
        """Identity used in cache keys: names plus the checkpoint files' sizes and mtimes (a `local-dir:` folder's too)."""
        parts = [str(self.display_name), str(self.pretrained), str(self.model_config), str(self.revision), str(self.init_seed)]
        model = self.model or ""
        folder = [str(p) for p in Path(model[len("local-dir:"):]).iterdir()] if model.startswith("local-dir:") else []
        for path in (self.pretrained, self.model_config, *sorted(folder)):
            if path and Path(path).is_file():
                stat = Path(path).stat()
                parts.append(f"{stat.st_size}:{stat.st_mtime_ns}")
        return "|".join(parts)


@dataclass
class LoadedModel:
    """A CLIP model with what every method needs around it."""

    clip: Any  # an open_clip CLIP or CustomTextCLIP (an nn.Module; their attributes differ by class)
    tokenizer: Any
    spec: ModelSpec
    image_size: tuple
    mean: tuple
    std: tuple
    interpolation: str

    @property
    def text(self) -> TextTower | HFTextTower:
        return text_tower(self.clip, self.tokenizer)

    @property
    def image(self) -> ImageTower:
        return ImageTower(self.clip)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.detach().exp()


def _looks_like_path(value: str) -> bool:
    return value.lower().endswith(CHECKPOINT_SUFFIXES) or os.sep in value or value.startswith(".")


def _resolve_local_text_paths(config: dict, folder: Path) -> bool:
    """Make `text_cfg.hf_model_name`/`hf_tokenizer_name` absolute when they name a path next to the config file.

    So a config shipped beside its Hugging Face text model folder (e.g. "./tiny-bert") works from any
    working directory. Hub names ("microsoft/...") and absolute paths are left alone.
    """
    text_cfg = config.get("text_cfg") or {}
    changed = False
    for key in ("hf_model_name", "hf_tokenizer_name"):
        value = text_cfg.get(key)
        if isinstance(value, str) and value and not Path(value).is_absolute() and (folder / value).exists():
            text_cfg[key] = str((folder / value).resolve())
            changed = True
    return changed


def _register_config(model: Optional[str], model_config: str) -> str:
    """Register a JSON model config with open_clip under the model name (default: file stem).

    Relative Hugging Face text model/tokenizer paths are resolved against the config file's folder.
    """
    path = Path(model_config)
    if not path.is_file():
        raise CliptuneError(f"model config file not found: {model_config}")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CliptuneError(f"model config {model_config} is not valid JSON: {exc}") from None
    if not isinstance(config, dict) or "vision_cfg" not in config or "text_cfg" not in config:
        raise CliptuneError(
            f"model config {model_config} is not an open_clip config (needs 'embed_dim', 'vision_cfg', 'text_cfg')"
        )
    name = model or path.stem
    resolved = _resolve_local_text_paths(config, path.resolve().parent)
    if name == path.stem and not resolved:
        open_clip.add_model_config(path)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / f"{name}.json"
            copy.write_text(json.dumps(config))
            open_clip.add_model_config(copy)
    return name


def _check_model_name(name: str) -> None:
    if name.startswith("local-dir:"):
        folder = Path(name[len("local-dir:"):])
        if not (folder / "open_clip_config.json").is_file():
            raise CliptuneError(f"{name}: no open_clip_config.json in {folder} (a folder in open_clip's Hub layout, "
                                "e.g. from `cliptune export --format hub`)")
        return
    if name.startswith("hf-hub:"):
        return
    known = open_clip.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else " (see open_clip.list_models())"
        raise CliptuneError(f"unknown model '{name}'{hint}; pass --model-config FILE for a custom architecture")


def _check_pretrained(name: str, pretrained: str) -> None:
    if _looks_like_path(pretrained):
        if not Path(pretrained).is_file():
            raise CliptuneError(f"checkpoint file not found: {pretrained}")
        return
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained not in tags:
        available = ", ".join(tags) if tags else "none; pass a local checkpoint file"
        raise CliptuneError(f"unknown pretrained tag '{pretrained}' for model {name} (available: {available})")


def _check_checkpoint_file(path: str) -> None:
    """Refuse a file that is not a readable checkpoint (wrong format, truncated) before open_clip reads it."""
    if path.lower().endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(path, "pt"):
                return
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type for every bad header
            truncated = "not fully covered" in str(exc)
            raise CliptuneError(
                f"checkpoint {path} is truncated (shorter than its safetensors header says)" if truncated else
                f"checkpoint {path} is not a safetensors file ({str(exc).rpartition(': ')[2]})"
            ) from None
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as handle:
            starts_like_zip = handle.read(4) == b"PK\x03\x04"
        raise CliptuneError(
            f"checkpoint {path} is truncated (a zip archive without its end)" if starts_like_zip else
            f"checkpoint {path} is not a PyTorch checkpoint (torch.save zip file) or .safetensors file"
        )


def _checkpoint_mismatch(name: str, path: str) -> str:
    """What differs between a checkpoint file and the model it was meant for: shapes, then missing/unexpected keys."""
    from open_clip.factory import load_state_dict

    with _quiet_model_creation(), isolated_rng():
        reference = open_clip.create_model(name, pretrained=None)
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in load_state_dict(path, weights_only=True).items()}
    shapes = [k for k in expected if k in found and expected[k] != found[k]]
    if shapes:
        key = shapes[0]
        more = f" (and {len(shapes) - 1} more)" if len(shapes) > 1 else ""
        return f"{key} has shape {list(found[key])} in the file but {list(expected[key])} in the model{more}"
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    parts = []
    if missing:
        parts.append(f"{len(missing)} model key(s) missing from the file (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s) in the file (e.g. {unexpected[0]})")
    return "; ".join(parts) or "the weights do not load"


HUB_PROBE_SECONDS = 5.0


@contextmanager
def _hub_offline():
    """huggingface_hub in offline mode: files come from the local cache or not at all, without network.

    open_clip calls `hf_hub_download` without a `local_files_only` argument and huggingface_hub has no
    public switch, so this sets the flag its HF_HUB_OFFLINE variable sets, and restores it (listed in
    cliptune/core/private_api.py)."""
    from huggingface_hub import constants

    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


# Loggers of the libraries open_clip calls while it builds a model (open_clip itself logs on the root logger).
LIBRARY_LOGGERS = ("open_clip", "timm", "huggingface_hub", "transformers")


def _drop(record: logging.LogRecord) -> bool:
    return False


@contextmanager
def _quiet_model_creation():
    """Within `with`, the messages open_clip and its libraries log while building a model are dropped (our own
    errors say what matters); other loggers, and everything afterwards, are untouched.

    open_clip logs through `logging.info(...)`, i.e. on the root logger itself: a filter on the root logger drops
    exactly those records (records of other loggers reach the root's handlers without passing its filters).
    `logging.info` also installs a stderr handler (`basicConfig`) when the root logger has none; a NullHandler
    stands in while open_clip runs, so the program's logging configuration is left as it was."""
    root = logging.getLogger()
    placeholder = logging.NullHandler() if not root.handlers else None
    if placeholder is not None:
        root.addHandler(placeholder)
    root.addFilter(_drop)
    levels = {name: logging.getLogger(name).level for name in LIBRARY_LOGGERS}
    for name in levels:
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        root.removeFilter(_drop)
        if placeholder is not None:
            root.removeHandler(placeholder)


def _probe_hub() -> None:
    """One request to the hub without retries; ConnectionError when it does not answer within seconds."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=HUB_PROBE_SECONDS)
    except Exception as exc:  # noqa: BLE001 - any failure to get an answer means unreachable
        raise ConnectionError(f"{constants.ENDPOINT} did not answer: {exc}") from None


def _create_clip(name: str, pretrained: Optional[str], device) -> nn.Module:
    """open_clip's model. Hub weights come from the local cache first; the hub itself is asked only after a
    quick probe answers, so an unreachable hub fails in seconds instead of after huggingface_hub's retries."""

    def create() -> nn.Module:
        return open_clip.create_model_and_transforms(
            name, pretrained=pretrained, device=device, weights_only=True,
            pretrained_text=False,  # a Hugging Face text tower is random or loaded with the checkpoint, never downloaded
        )[0]

    from huggingface_hub import constants

    downloads = name.startswith("hf-hub:") or (pretrained is not None and not Path(pretrained).is_file())
    if not downloads or constants.HF_HUB_OFFLINE:
        return create()
    try:
        with _hub_offline():
            return create()
    except Exception as exc:  # noqa: BLE001 - anything but a cache miss is the caller's to explain
        if not _is_download_error(exc):
            raise
    _probe_hub()
    return create()


def _is_download_error(error: BaseException) -> bool:
    """True for the errors huggingface_hub/requests/httpx raise when a download cannot happen."""
    exc: Optional[BaseException] = error
    while exc is not None:
        module = type(exc).__module__ or ""
        text = f"{type(exc).__name__} {exc}".lower()
        if module.startswith(("huggingface_hub", "requests", "urllib3", "httpx", "httpcore", "socket")):
            return True
        if any(word in text for word in ("offline", "connection", "resolve host", "network is unreachable")):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def load_model(
    model: Optional[str] = None,
    pretrained: Optional[str] = None,
    model_config: Optional[str] = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> LoadedModel:
    """Build an open_clip model the way users name it; random init when `pretrained` is None/"none"."""
    if not model and not model_config:
        raise CliptuneError("no model given: pass --model NAME (and --pretrained TAG_OR_FILE) or --model-config FILE")
    name = _register_config(model, model_config) if model_config else str(model)
    _check_model_name(name)
    spec = ModelSpec(model=name, pretrained=pretrained, model_config=model_config)
    named_weights = name.startswith(SCHEMAS)  # a hub repo or a local folder brings its own weights
    random_init = spec.is_random_init and not named_weights
    if not random_init and not named_weights and pretrained is not None:  # not random: the weights are named
        _check_pretrained(name, pretrained)
        if Path(pretrained).is_file():
            _check_checkpoint_file(pretrained)
    if random_init:
        log.warning("no --pretrained weights given: %s is randomly initialised (seed %d)", name, seed)
        spec = dataclasses.replace(spec, init_seed=seed)
    try:
        # random init is reproducible (cached features stay valid) without reseeding the caller's generator
        with _quiet_model_creation(), warnings.catch_warnings(), isolated_rng(seed):
            warnings.simplefilter("ignore")
            clip = _create_clip(name, None if random_init else pretrained, device)
    except (RuntimeError, AssertionError) as exc:
        # a state dict of another architecture: open_clip's resizing asserts, or load_state_dict refuses it
        mismatch = isinstance(exc, AssertionError) or any(
            word in str(exc) for word in ("size mismatch", "Missing key", "Unexpected key"))
        if mismatch and pretrained and Path(pretrained).is_file():
            config_hint = f" (config {model_config})" if model_config else ""
            raise CliptuneError(
                f"checkpoint {pretrained} does not match model {name}{config_hint}: {_checkpoint_mismatch(name, pretrained)}"
            ) from None
        if _is_download_error(exc):
            raise _offline_error(name, pretrained) from None
        raise
    except Exception as exc:  # noqa: BLE001 - classify, then re-raise anything we cannot explain
        if _is_download_error(exc):
            raise _offline_error(name, pretrained) from None
        if isinstance(exc, (OSError, ValueError)) and pretrained and Path(pretrained).is_file():
            raise CliptuneError(f"could not read checkpoint {pretrained}: {exc}") from None
        raise
    clip.eval()
    with _quiet_model_creation():
        tokenizer = open_clip.get_tokenizer(name)
    preprocess = getattr(clip.visual, "preprocess_cfg", {}) or {}
    size = preprocess.get("size", getattr(clip.visual, "image_size", 224))
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    return LoadedModel(
        clip=clip,
        tokenizer=tokenizer,
        spec=spec,
        image_size=size,
        mean=tuple(preprocess.get("mean", open_clip.OPENAI_DATASET_MEAN)),
        std=tuple(preprocess.get("std", open_clip.OPENAI_DATASET_STD)),
        interpolation=preprocess.get("interpolation", "bicubic"),
    )


def _offline_error(name: str, pretrained: Optional[str]) -> CliptuneError:
    what = name if name.startswith("hf-hub:") else f"{name} ({pretrained})"
    return CliptuneError(
        f"could not download the weights for {what} (offline or unreachable, and not in the local cache); "
        "download them on a connected machine, pass a local checkpoint with --pretrained FILE "
        "(plus --model-config FILE for a custom architecture), or pick another model with --model NAME --pretrained TAG_OR_FILE"
    )
