"""Run configuration: built-in defaults < recipe YAML < explicit CLI flags < `--set key=value`.

The resolved config is plain data (written to `RUN/config.yaml`), and re-running from it gives the
same run. Method-specific options live in a section named after the method, validated against the
method's own config dataclass (peft style), e.g. `--set coop.n_ctx=4`.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import yaml

from cliptune.core.errors import CliptuneError
from cliptune.core.options import coerce

RECIPE_DIR = Path(__file__).resolve().parents[2] / "recipes"
RECIPE_META_KEYS = ("extends", "name", "domain", "summary", "description", "fallback")
PATH_KEYS = ("data", "pretrained", "model_config", "classnames", "templates", "reference", "reference_texts", "tasks", "controls")


@dataclass
class RunConfig:
    """Everything a training run needs; field names are the recipe keys and `--set` keys."""

    # model
    model: Optional[str] = None
    pretrained: Optional[str] = None
    model_config: Optional[str] = None
    # data
    data: Optional[str] = None
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    shots: Optional[int] = None
    classnames: Optional[str] = None
    templates: Union[None, str, List[str]] = None
    strict: bool = False
    # method and optimisation
    method: str = "linear-probe"
    epochs: int = 10
    steps: Optional[int] = None  # optimizer-step budget instead of epochs (the schedule scales to it)
    # raise a default lr when --steps cuts the method's default budget (see engine.budget_lr_factor);
    # unset = on exactly when the steps come from you and the lr from the defaults
    scale_lr: Optional[bool] = None
    select: str = "best-val"  # checkpoint evaluated at the end: best-val (best validation top-1) or last
    # `--fallback`: what a run keeps when its selected checkpoint is below zero-shot on val (none: the adapted
    # model, with a warning; zero-shot: the zero-shot classifier, recorded as the run's result)
    result_fallback: str = "none"
    val_shots: Optional[int] = None  # validation images per class (0 = all); with --shots K default min(K, 4) (Dassl)
    lr: float = 1e-3
    batch_size: int = 32
    eval_batch_size: int = 128
    optimizer: str = "adamw"
    weight_decay: float = 0.01
    momentum: float = 0.9
    warmup_steps: int = 0  # linear warm-up to lr over this many optimizer steps
    warmup_epochs: int = 0  # Dassl's constant warm-up: this many epochs at warmup_lr, then the schedule
    warmup_lr: float = 1e-5
    lr_per_epoch: bool = False  # hold the lr for a whole epoch (Dassl steps its scheduler once per epoch)
    min_lr: float = 0.0  # the cosine's floor (CosineAnnealingLR's eta_min)
    adam_eps: float = 1e-8  # AdamW's eps
    drop_last: bool = False  # drop a last partial batch each epoch (Dassl's train loader)
    grad_accum: int = 1
    max_grad_norm: Optional[float] = None
    label_smoothing: float = 0.0
    mixed_precision: str = "no"
    grad_checkpointing: bool = False  # recompute tower activations in the backward pass: less memory, one more forward per step
    seed: int = 0
    # validation every N epochs (the last epoch always); None = auto, keeping evaluation under ~20% of training
    eval_every: Optional[int] = None
    # base-to-novel protocol: train on the first half of the classes (by folder name), test on both halves
    base_novel: bool = False
    # augmentation (and how many augmented views to cache when the image tower is frozen)
    aug_views: int = 0
    aug_per_step: bool = False  # frozen image tower: re-augment and re-encode every step instead of a view bank
    aug_crop_scale: List[float] = field(default_factory=lambda: [0.5, 1.0])
    aug_hflip: bool = True
    aug_color_jitter: float = 0.0
    num_workers: Optional[int] = None  # DataLoader workers; None = per device (0 on CPU, for exact resume)
    image_cache: str = "auto"  # decoded-image cache: auto | memory | disk | off
    # continual learning (`cliptune continual`): task/control ImageFolders, optionally `DIR:class,class`
    tasks: List[str] = field(default_factory=list)
    controls: List[str] = field(default_factory=list)
    reference: Optional[str] = None
    reference_texts: Optional[str] = None
    strategy: str = "naive"
    distill_image: float = 1.0
    distill_text: float = 1.0
    distill_temperature: float = 2.0
    avg_every: int = 100
    wise_alpha: float = 0.8  # ZSCL's WiSE-FT baseline
    wise_anchor: str = "task-start"  # wise: interpolate with the task-start weights (ZSCL) or the initial ones
    vocab_per_step: Optional[int] = None  # zscl/lwf-vr: all reference texts every step (ZSCL); N: a random N
    l2: float = 0.0  # ZSCL's --l2: weight of sum((θ - θ_task_start)²) over the trained weights
    vocab_size: int = 1000  # lwf-vr: random token sequences in the virtual vocabulary (ZSCL's virtual_vocab)
    vocab_length: int = 10  # lwf-vr: random tokens per sequence
    # per-method options, keyed by method name
    methods: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    # the layer that set each key (build_config), logged when training starts; not a setting: never in
    # config.yaml, recipes or --set, and ignored when configs are compared
    sources: Dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def method_options(self) -> Dict[str, Any]:
        return dict(self.methods.get(self.method, {}))

    def to_dict(self) -> Dict[str, Any]:
        data = dataclasses.asdict(self)
        del data["sources"]
        sections = data.pop("methods")
        data.update({name: dict(values) for name, values in sections.items()})
        return data


CONFIG_KEYS = [f.name for f in fields(RunConfig) if f.name not in ("methods", "sources")]
CHOICES = {
    "optimizer": ("adamw", "sgd", "lion"),
    "mixed_precision": ("no", "fp16", "bf16"),
    "strategy": ("naive", "lwf", "lwf-vr", "zscl", "wise"),
    "select": ("best-val", "last"),
    "result_fallback": ("none", "zero-shot"),
    "wise_anchor": ("task-start", "initial"),
    "image_cache": ("auto", "memory", "disk", "off"),
}


# Numeric ranges every run needs, checked before any work: key -> (test, what it must be)
RANGES = {
    "epochs": (lambda v: v >= 1, "at least 1"),
    "batch_size": (lambda v: v >= 1, "at least 1"),
    "eval_batch_size": (lambda v: v >= 1, "at least 1"),
    "grad_accum": (lambda v: v >= 1, "at least 1"),
    "lr": (lambda v: v > 0, "greater than 0"),
    "weight_decay": (lambda v: v >= 0, "at least 0"),
    "momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "warmup_steps": (lambda v: v >= 0, "at least 0"),
    "max_grad_norm": (lambda v: v is None or v > 0, "greater than 0 (or unset)"),
    "label_smoothing": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "val_fraction": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "test_fraction": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "shots": (lambda v: v is None or v >= 1, "at least 1 (or unset for all images)"),
    "aug_views": (lambda v: v >= 0, "at least 0"),
    "aug_crop_scale": (lambda v: len(v) == 2 and 0 < v[0] <= v[1] <= 1, "two numbers [min, max] with 0 < min <= max <= 1"),
    "aug_color_jitter": (lambda v: v >= 0, "at least 0"),
    "num_workers": (lambda v: v is None or v >= 0, "at least 0"),
    "distill_image": (lambda v: v >= 0, "at least 0"),
    "distill_text": (lambda v: v >= 0, "at least 0"),
    "distill_temperature": (lambda v: v > 0, "greater than 0"),
    "avg_every": (lambda v: v >= 1, "at least 1"),
    "wise_alpha": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "vocab_per_step": (lambda v: v is None or v >= 1, "at least 1 (or unset for the whole vocabulary)"),
    "steps": (lambda v: v is None or v >= 1, "at least 1 (or unset to train --epochs)"),
    "val_shots": (lambda v: v is None or v >= 0, "at least 0 (0 = every validation image; unset = min(shots, 4))"),
    "warmup_epochs": (lambda v: v >= 0, "at least 0"),
    "warmup_lr": (lambda v: v > 0, "greater than 0"),
    "min_lr": (lambda v: v >= 0, "at least 0"),
    "adam_eps": (lambda v: v > 0, "greater than 0"),
    "eval_every": (lambda v: v is None or v >= 1, "at least 1 (or unset for the automatic cadence)"),
    "l2": (lambda v: v >= 0, "at least 0"),
    "vocab_size": (lambda v: v >= 2, "at least 2"),
    "vocab_length": (lambda v: v >= 1, "at least 1"),
}
# Paths a run reads: key -> (command-line flag, "file" or "folder"); list keys hold `DIR` or `DIR:class,...`
INPUT_PATHS = {
    "data": ("--data", "folder"),
    "model_config": ("--model-config", "file"),
    "classnames": ("--classnames", "file"),
    "templates": ("--templates", "file"),
    "reference": ("--reference", "folder"),
    "reference_texts": ("--reference-texts", "file"),
    "tasks": ("--task", "folder"),
    "controls": ("--control", "folder"),
}


def parse_dataset_spec(spec: str) -> tuple[str, Optional[List[str]]]:
    """`DIR` or `DIR:class,class` (a subset of the class folders)."""
    if Path(spec).exists() or ":" not in spec:
        return spec, None
    root, _, classes = spec.rpartition(":")
    return root, [c for c in classes.split(",") if c]


def check_config(config: RunConfig, files: bool = True) -> None:
    """Every run-level option in range (and, with `files`, every input path present), before any work.

    One line names the first bad option. Method options are checked by their own config classes.
    """
    for key, (valid, requirement) in RANGES.items():
        value = getattr(config, key)
        if not valid(value):
            raise CliptuneError(f"{key} must be {requirement}, got {value!r}")
    if config.val_fraction + config.test_fraction >= 1:
        raise CliptuneError(f"val_fraction + test_fraction must be below 1 (got {config.val_fraction} + {config.test_fraction})")
    if not files:
        return
    for key, (flag, kind) in INPUT_PATHS.items():
        value = getattr(config, key)
        for item in value if key in ("tasks", "controls") else [value]:
            if not isinstance(item, str) or not item:
                continue  # unset, or templates given inline as a list
            path = Path(parse_dataset_spec(item)[0] if kind == "folder" else item)
            if not (path.is_dir() if kind == "folder" else path.is_file()):
                raise CliptuneError(f"{flag} {item}: no such {kind}")


def _method_registry():
    from cliptune.methods import METHODS  # local import: methods import config helpers

    return METHODS


def valid_keys() -> List[str]:
    keys = list(CONFIG_KEYS)
    for name, cls in sorted(_method_registry().items()):
        keys += [f"{name}.{f.name}" for f in fields(cls.config_class)]
    return keys


def _unknown_key(key: str, where: str) -> CliptuneError:
    return CliptuneError(f"unknown config key '{key}'{where}; valid keys: {', '.join(valid_keys())}")


def apply_values(config: RunConfig, values: Dict[str, Any], where: str = "", lines: Optional[Dict[str, int]] = None) -> None:
    """Validate and apply a flat-or-sectioned mapping of config values onto `config`."""
    hints = typing.get_type_hints(RunConfig)
    registry = _method_registry()
    lines = lines or {}

    def at(key: str) -> str:
        return f"{where}:{lines[key]}" if key in lines else where

    for key, value in values.items():
        location = f" in {at(key)}" if where else ""
        if key in RECIPE_META_KEYS:
            continue
        if key in registry:
            if not isinstance(value, dict):
                raise CliptuneError(f"'{key}'{location} must be a mapping of {key} options")
            section_hints = typing.get_type_hints(registry[key].config_class)
            section_hints.pop("section", None)
            section = config.methods.setdefault(key, {})
            for option, option_value in value.items():
                full = f"{key}.{option}"
                if option not in section_hints:
                    raise _unknown_key(full, f" in {at(full)}" if where else "")
                section[option] = coerce(option_value, section_hints[option], full)
            continue
        if key not in CONFIG_KEYS:
            raise _unknown_key(key, location)
        try:
            coerced = coerce(value, hints[key], key)
        except CliptuneError as exc:
            raise CliptuneError(f"{exc}{location}") from None
        if key in CHOICES and coerced not in CHOICES[key]:
            raise CliptuneError(f"'{key}' must be one of {', '.join(CHOICES[key])}, got {coerced!r}{location}")
        setattr(config, key, coerced)


def _key_lines(text: str) -> Dict[str, int]:
    """1-based line of each top-level key and `section.key`, for error messages."""
    lines: Dict[str, int] = {}
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return lines
    if not isinstance(node, yaml.MappingNode):
        return lines
    for key_node, value_node in node.value:
        lines[key_node.value] = key_node.start_mark.line + 1
        if isinstance(value_node, yaml.MappingNode):
            for sub_key, _ in value_node.value:
                lines[f"{key_node.value}.{sub_key.value}"] = sub_key.start_mark.line + 1
    return lines


def resolve_recipe_path(name_or_path: str, relative_to: Optional[Path] = None) -> Path:
    """A recipe is a YAML path, or a name resolved to `recipes/NAME.yaml`."""
    candidates = [Path(name_or_path)]
    if relative_to is not None:
        candidates.insert(0, relative_to / name_or_path)
    if not name_or_path.endswith((".yaml", ".yml")):
        candidates += [RECIPE_DIR / f"{name_or_path}.yaml", Path.cwd() / "recipes" / f"{name_or_path}.yaml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    available = ", ".join(sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))) or "none"
    raise CliptuneError(f"recipe '{name_or_path}' not found (a YAML file path, or one of: {available})")


def _absolute_path(value, folder: Path):
    """Resolve a relative path (optionally `PATH:class,...`) against `folder` when it exists there."""
    if not isinstance(value, str) or Path(value).is_absolute():
        return value
    head, sep, tail = value.partition(":") if not (folder / value).exists() else (value, "", "")
    if (folder / head).exists():
        return str((folder / head).resolve()) + sep + tail
    return value


def absolute_paths(values: Dict[str, Any], folder: Path) -> Dict[str, Any]:
    """`values` with each path key (a path, or a list of them) resolved against `folder` where it exists there."""
    resolved = dict(values)
    for key in PATH_KEYS:
        value = resolved.get(key)
        if value is not None:
            resolved[key] = [_absolute_path(v, folder) for v in value] if isinstance(value, list) else _absolute_path(value, folder)
    return resolved


def read_recipe(name_or_path: str, _seen: Optional[set] = None, relative_to: Optional[Path] = None) -> List[tuple]:
    """Layers of (values, file, key lines), base recipe first, following `extends:`."""
    path = resolve_recipe_path(name_or_path, relative_to)
    seen = _seen or set()
    if path in seen:
        raise CliptuneError(f"recipe {path} extends itself (cycle through 'extends')")
    seen.add(path)
    text = path.read_text()
    try:
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise CliptuneError(f"malformed YAML in {path}{line}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(values, dict):
        raise CliptuneError(f"recipe {path} must be a mapping of config keys")
    values = absolute_paths(values, path.parent)
    layers = []
    if values.get("extends"):
        layers += read_recipe(str(values["extends"]), seen, relative_to=path.parent)
    layers.append((values, path, _key_lines(text)))
    return layers


def parse_set(assignments: List[str]) -> Dict[str, Any]:
    """`--set key=value` (value parsed as YAML) into a sectioned mapping."""
    values: Dict[str, Any] = {}
    for assignment in assignments:
        if "=" not in assignment:
            raise CliptuneError(f"--set expects key=value, got '{assignment}'")
        key, raw = assignment.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        if "." in key:
            section, option = key.split(".", 1)
            values.setdefault(section, {})[option] = value
        else:
            values[key.strip()] = value
    return values


def _layer_keys(values: Dict[str, Any]) -> set:
    """The top-level keys a layer sets (a method section counts as its name)."""
    return {key for key in values if key not in RECIPE_META_KEYS}


def build_config(
    recipe: Optional[str] = None,
    cli_values: Optional[Dict[str, Any]] = None,
    set_values: Optional[List[str]] = None,
    method_values: Optional[Dict[str, Any]] = None,
    default_method: str = "linear-probe",
) -> RunConfig:
    """Merge the layers in precedence order and validate them, naming the bad key and its file/line.

    engine defaults (RunConfig) < the method's training defaults < recipe < CLI flags < `--set`.
    `method_values` are CLI flags of method options (e.g. `--n-ctx` -> `n_ctx`); they go into the
    section of whichever method the run uses. A layer that sets `epochs` but not `steps` replaces a
    lower layer's step budget (and the other way round). The returned config's `sources` field
    names the layer that set each key (logged with the run).
    """
    recipe_layers = read_recipe(recipe) if recipe else []
    cli = {k: v for k, v in (cli_values or {}).items() if v is not None}
    overrides = {}
    if set_values:
        overrides = parse_set(set_values)
    registry = _method_registry()

    # the method and shot count decide the method defaults, so find them first (highest layer wins)
    probe = RunConfig(method=default_method)
    for values, path, lines in recipe_layers:
        apply_values(probe, values, where=str(path), lines=lines)
    apply_values(probe, cli)
    _apply_set(probe, overrides)
    if probe.method not in registry:
        raise CliptuneError(f"unknown method '{probe.method}' (available: {', '.join(sorted(registry))})")

    config = RunConfig(method=default_method)
    flags = {k: v for k, v in (method_values or {}).items() if v is not None}
    accepted = {f.name for f in fields(registry[probe.method].config_class)}
    for option in flags:
        if option not in accepted:
            raise CliptuneError(f"--{option.replace('_', '-')} does not apply to method '{probe.method}'")
    sources: Dict[str, str] = {}
    layers = [("method defaults", registry[probe.method].training_defaults(probe.shots), None, None)]
    layers += [(f"recipe {path.name}", values, str(path), lines) for values, path, lines in recipe_layers]
    layers += [("CLI flags", {**cli, probe.method: flags} if flags else cli, None, None)]
    for name, values, where, lines in layers:
        _apply_layer(config, values, name, sources, where=where or "", lines=lines)
    if overrides:
        _apply_layer(config, overrides, "--set", sources, set_layer=True)
    registry[config.method].config_class.from_options(config.method_options())  # validates before any work
    if config.scale_lr is None:
        defaults = ("method defaults", None)
        config.scale_lr = sources.get("lr") in defaults and sources.get("steps") not in defaults
    config.sources = sources
    check_config(config, files=False)  # paths are checked when a run starts (recipes may name data not here yet)
    return config


def _apply_set(config: RunConfig, overrides: Dict[str, Any]) -> None:
    try:
        apply_values(config, overrides)
    except CliptuneError as exc:
        raise CliptuneError(f"--set: {exc}") from None


def _apply_layer(config: RunConfig, values: Dict[str, Any], name: str, sources: Dict[str, str], where: str = "",
                 lines=None, set_layer: bool = False) -> None:
    keys = _layer_keys(values)
    if set_layer:
        _apply_set(config, values)
    else:
        apply_values(config, values, where=where, lines=lines)
    if "epochs" in keys and "steps" not in keys:
        config.steps = None  # an epoch budget replaces a lower layer's step budget
    for key in keys:
        sources[key] = name


def config_from_dict(values: Dict[str, Any]) -> RunConfig:
    config = RunConfig()
    apply_values(config, values)
    return config


def save_config(config: RunConfig, path: Path) -> None:
    from cliptune.core.runfolder import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))


def load_config(path: Path) -> RunConfig:
    if not path.is_file():
        raise CliptuneError(f"{path.parent} is not a cliptune run folder (no config.yaml)")
    return config_from_dict(yaml.safe_load(path.read_text()) or {})
