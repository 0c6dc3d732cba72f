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

from cliptune.errors import CliptuneError

RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes"
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
    lr: float = 1e-3
    batch_size: int = 32
    eval_batch_size: int = 128
    optimizer: str = "adamw"
    weight_decay: float = 0.01
    momentum: float = 0.9
    warmup_steps: int = 0
    grad_accum: int = 1
    max_grad_norm: Optional[float] = None
    label_smoothing: float = 0.0
    mixed_precision: str = "no"
    seed: int = 0
    # base-to-novel protocol: train on the first half of the classes (by folder name), test on both halves
    base_novel: bool = False
    # augmentation (and how many augmented views to cache when the image tower is frozen)
    aug_views: int = 0
    aug_crop_scale: List[float] = field(default_factory=lambda: [0.5, 1.0])
    aug_hflip: bool = True
    aug_color_jitter: float = 0.0
    num_workers: int = 0
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
    wise_alpha: float = 0.5
    vocab_per_step: int = 64
    # per-method options, keyed by method name
    methods: Dict[str, Dict[str, Any]] = field(default_factory=dict)

    def method_options(self) -> Dict[str, Any]:
        return dict(self.methods.get(self.method, {}))

    def to_dict(self) -> Dict[str, Any]:
        data = dataclasses.asdict(self)
        sections = data.pop("methods")
        data.update({name: dict(values) for name, values in sections.items()})
        return data


CONFIG_KEYS = [f.name for f in fields(RunConfig) if f.name != "methods"]
CHOICES = {
    "optimizer": ("adamw", "sgd", "lion"),
    "mixed_precision": ("no", "fp16", "bf16"),
    "strategy": ("naive", "lwf", "lwf-vr", "zscl", "wise"),
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
    "num_workers": (lambda v: v >= 0, "at least 0"),
    "distill_image": (lambda v: v >= 0, "at least 0"),
    "distill_text": (lambda v: v >= 0, "at least 0"),
    "distill_temperature": (lambda v: v > 0, "greater than 0"),
    "avg_every": (lambda v: v >= 1, "at least 1"),
    "wise_alpha": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "vocab_per_step": (lambda v: v >= 1, "at least 1"),
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


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def coerce(value: Any, annotation, key: str) -> Any:
    """Check a value against a dataclass field annotation; ints are accepted for floats."""
    origin = typing.get_origin(annotation)
    if origin is Union:
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(value, option, key)
            except CliptuneError:
                continue
        raise CliptuneError(f"'{key}' must be {' or '.join(_type_name(o) for o in options)}, got {value!r}")
    if origin in (list, List):
        (item,) = typing.get_args(annotation) or (Any,)
        if not isinstance(value, list):
            raise CliptuneError(f"'{key}' must be a list, got {value!r}")
        return [coerce(v, item, key) for v in value]
    if annotation is Any:
        return value
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if annotation is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if annotation in (bool, str) and isinstance(value, annotation):
        return value
    if origin in (dict, Dict) and isinstance(value, dict):
        return value
    raise CliptuneError(f"'{key}' must be {_type_name(annotation)}, got {value!r}")


def _method_registry():
    from cliptune.methods import METHODS  # local import: methods import config helpers

    return METHODS


def valid_keys() -> List[str]:
    keys = list(CONFIG_KEYS)
    for name, entry in sorted(_method_registry().items()):
        keys += [f"{name}.{f.name}" for f in fields(entry.config_class)]
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


def _relative_to_recipe(value, recipe: Path):
    """Resolve a relative path (optionally `PATH:class,...`) against the recipe's folder when it exists there."""
    if not isinstance(value, str) or Path(value).is_absolute():
        return value
    head, sep, tail = value.partition(":") if not (recipe.parent / value).exists() else (value, "", "")
    if (recipe.parent / head).exists():
        return str((recipe.parent / head).resolve()) + sep + tail
    return value


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
    for key in PATH_KEYS:
        if key not in values:
            continue
        value = values[key]
        values[key] = [_relative_to_recipe(v, path) for v in value] if isinstance(value, list) else _relative_to_recipe(value, path)
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


def build_config(
    recipe: Optional[str] = None,
    cli_values: Optional[Dict[str, Any]] = None,
    set_values: Optional[List[str]] = None,
    method_values: Optional[Dict[str, Any]] = None,
) -> RunConfig:
    """Merge the layers in precedence order and validate them, naming the bad key and its file/line.

    `method_values` are CLI flags of method options (e.g. `--n-ctx` -> `n_ctx`); they go into the
    section of whichever method the run uses.
    """
    config = RunConfig()
    if recipe:
        for values, path, lines in read_recipe(recipe):
            apply_values(config, values, where=str(path), lines=lines)
    apply_values(config, {k: v for k, v in (cli_values or {}).items() if v is not None})
    flags = {k: v for k, v in (method_values or {}).items() if v is not None}
    if flags:
        entry = _method_registry().get(config.method)
        accepted = {f.name for f in fields(entry.config_class)} if entry else set()
        for option in flags:
            if option not in accepted:
                flag = "--" + option.replace("_", "-")
                raise CliptuneError(f"{flag} does not apply to method '{config.method}'")
        apply_values(config, {config.method: flags})
    if set_values:
        overrides = parse_set(set_values)
        try:
            apply_values(config, overrides)
        except CliptuneError as exc:
            raise CliptuneError(f"--set: {exc}") from None
    registry = _method_registry()
    if config.method not in registry:
        raise CliptuneError(f"unknown method '{config.method}' (available: {', '.join(sorted(registry))})")
    check_config(config, files=False)  # paths are checked when a run starts (recipes may name data not here yet)
    return config


def config_from_dict(values: Dict[str, Any]) -> RunConfig:
    config = RunConfig()
    apply_values(config, values)
    return config


def save_config(config: RunConfig, path: Path) -> None:
    from cliptune.runfolder import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))


def load_config(path: Path) -> RunConfig:
    if not path.is_file():
        raise CliptuneError(f"{path.parent} is not a cliptune run folder (no config.yaml)")
    return config_from_dict(yaml.safe_load(path.read_text()) or {})
