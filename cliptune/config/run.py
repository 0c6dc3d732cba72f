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
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import yaml

from cliptune.core.errors import CliptuneError
from cliptune.core.options import check_value, coerce, flag_name, option

RECIPE_DIR = Path(__file__).resolve().parents[1] / "recipes"  # shipped in the package (the checkout links recipes/ to it)
RECIPE_META_KEYS = ("extends", "name", "domain", "summary", "description", "fallback")


@dataclass
class RunConfig:
    """Everything a training run needs; field names are the recipe keys and `--set` keys, and the CLI's
    flags for them are generated from these declarations (`cliptune.cli.config_flags`)."""

    # model
    model: Optional[str] = option(None, "open_clip architecture (e.g. ViT-B-16) or hf-hub:org/repo.")
    pretrained: Optional[str] = option(
        None, "open_clip pretrained tag (e.g. laion2b_s34b_b79k) or a local .pt/.pth/.bin/.safetensors file.", path="any")
    model_config: Optional[str] = option(None, "JSON open_clip model config for a custom architecture.", path="file")
    # data
    data: Optional[str] = option(
        None, "ImageFolder root (class folders, or train/ val/ test/ of them), a CSV/TSV/JSONL manifest (path, label "
              "[, split] columns), a folder saved by Hugging Face datasets (save_to_disk), or webdataset shards (a folder "
              "of .tar files, one .tar, or a pattern such as 'shards/train-{000..009}.tar').", path="dataset")
    data_format: str = option("auto", "What --data is [auto: a .csv/.tsv/.jsonl file is a manifest, a folder saved by "
                                      "Hugging Face datasets a dataset, .tar files (or a folder of only them) shards, "
                                      "another folder an ImageFolder].",
                              choices=("auto", "imagefolder", "manifest", "datasets", "shards"))
    path_col: str = option("path", "Manifest column of the image paths (relative to the manifest) [path].")
    label_col: str = option("label", "Manifest column of the labels [label].")
    split_col: str = option("split", "Manifest column of the splits (train/val/test; absent: seeded splits) [split].")
    task: str = option("auto", "single-label, multi-label (each image has a set of labels: a manifest cell 'a|b|c'), or "
                               "auto: multi-label when a manifest has a 'labels' column and no 'label' column [auto].",
                       choices=("auto", "single-label", "multi-label"))
    label_sep: str = option("|", "Separator of the labels in one manifest cell [|].")
    zeroshot_pairs: bool = option(
        False, "Multi-label zero-shot: score each class by 'a photo with {}.' against 'a photo without {}.' (a sigmoid "
               "of the difference) instead of a softmax over the classes.")
    caption_col: str = option("caption", "Manifest or dataset column of the image captions (optional; --loss contrastive "
                                         "and soft-contrastive train on them) [caption].")
    val_fraction: float = option(0.1, "Validation share when the data has no val/ folder [0.1].", min=0, below=1)
    test_fraction: float = option(0.2, "Test share when the data has no test/ folder [0.2].", min=0, below=1)
    shots: Optional[int] = option(None, "Images per class sampled from train (seeded).", min=1, unset="for all images")
    classnames: Optional[str] = option(None, "YAML mapping class folder -> name (or {name, descriptions}).", path="file")
    templates: Union[None, str, List[str]] = option(None, "Prompt templates file (one per line, each with '{}').", path="file")
    strict: bool = option(False, "Fail on unreadable image files instead of skipping them.")
    cache_dir: Optional[str] = option(
        None, "Where frozen-tower image features are cached for every later run, compare cell and sweep trial on the "
              "same data and model [$CLIPTUNE_CACHE, else ~/.cache/cliptune/features]; 'run': the run's own cache/.")
    seed: int = option(0, "Seed for splits, shots, initialisation and training [0].")
    report_to: str = option(
        "none", "Experiment tracker through accelerate: per-step loss and lr, per-epoch validation, final test metrics "
                "[none; tensorboard writes RUN/tracking/].", choices=("none", "tensorboard", "wandb", "mlflow"))
    # method and optimisation
    method: str = option("", "Adaptation method; unset: a layer's, else the registry's DEFAULT_METHOD (build_config).")
    epochs: int = option(10, "Training epochs [the method's default].", min=1)
    steps: Optional[int] = option(None, "Optimizer-step budget instead of --epochs; the schedule scales to it.", min=1,
                                  unset="to train --epochs")
    scale_lr: Optional[bool] = option(
        None, "Raise a default lr when --steps cuts the method's default budget (training.optim.budget_lr_factor); "
              "unset = on exactly when the steps come from you and the lr from the defaults.")
    select: str = option("best-val", "Checkpoint evaluated at the end [method default].", choices=("best-val", "last"))
    metric: str = option(
        "top1", "What --select best-val, compare and sweep rank by on val/test [top1]; a metric a split does not define "
                "(auroc on a one-class split; top1 of multi-label data) falls back to its top-1, or mAP for multi-label data.",
        choices=("top1", "balanced_accuracy", "macro_f1", "auroc", "map", "micro_f1"))
    result_fallback: str = option(
        "none", "What a run keeps when it ends below zero-shot on val: none (the adapted model, with a warning) or "
                "zero-shot [none].", choices=("none", "zero-shot"), flag="--fallback")
    val_shots: Optional[int] = option(None, "Validation images per class [min(--shots, 4) with --shots, else all; 0 = all].",
                                      min=0, unset="for min(shots, 4)")
    lr: float = option(1e-3, "Learning rate [the method's default].", above=0)
    batch_size: int = option(32, "Global batch size (split across processes).", min=1)
    eval_batch_size: int = option(128, "Images per evaluation forward pass.", min=1)
    optimizer: str = option("adamw", "Optimizer [the method's default].", choices=("adamw", "sgd", "lion"))
    weight_decay: float = option(0.01, "Weight decay [the method's default].", min=0)
    momentum: float = option(0.9, "SGD momentum.", min=0, below=1)
    warmup_steps: int = option(0, "Linear warm-up to --lr over this many optimizer steps.", min=0)
    warmup_epochs: int = option(0, "Constant warm-up epochs at --warmup-lr first (Dassl) [method default].", min=0)
    warmup_lr: float = option(1e-5, "Learning rate of the constant warm-up [1e-5].", above=0)
    lr_per_epoch: bool = option(False, "Hold the lr for a whole epoch (Dassl steps its scheduler once per epoch).")
    min_lr: float = option(0.0, "The cosine's floor (CosineAnnealingLR's eta_min).", min=0)
    adam_eps: float = option(1e-8, "AdamW's eps.", above=0)
    drop_last: bool = option(False, "Drop a last partial batch each epoch (Dassl's train loader).")
    grad_accum: int = option(1, "Gradient accumulation steps.", min=1)
    max_grad_norm: Optional[float] = option(None, "Clip the gradient norm at this value.", above=0, unset="")
    label_smoothing: float = option(0.0, "Label smoothing added to any loss [0].", min=0, below=1)
    mixed_precision: str = option("no", "Mixed precision (one per Python process).", choices=("no", "fp16", "bf16"))
    grad_checkpointing: bool = option(
        False, "Recompute tower activations in the backward pass: less memory, one more forward per step [off].")
    eval_every: Optional[int] = option(
        None, "Validate every N epochs and after the last [auto: validation under ~20% of training].", min=1,
        unset="for the automatic cadence")
    base_novel: bool = option(
        False, "Base-to-novel protocol: train on the first half of the classes, test on base and novel.")
    # augmentation (and how many augmented views to cache when the image tower is frozen)
    aug_views: int = option(
        0, "Augmented views cached per training image when the image tower is frozen (0 = none).", min=0)
    aug_per_step: bool = option(
        False, "Frozen image tower: re-augment and re-encode every step (exact, slower) instead of a view bank.")
    aug_crop_scale: List[float] = option(help="RandomResizedCrop's area range [min, max].", factory=lambda: [0.5, 1.0])
    aug_hflip: bool = option(True, "Random horizontal flips.")
    aug_color_jitter: float = option(0.0, "Colour-jitter strength.", min=0)
    num_workers: Optional[int] = option(
        None, "DataLoader workers [0 on CPU (exact resume); up to 8 per process on GPU].", min=0, unset="")
    image_cache: str = option(
        "auto", "Decode and resize images once: in memory, memory-mapped under RUN/cache, auto (memory when it fits) "
                "or off [auto].", choices=("auto", "memory", "disk", "off"))
    # continual learning (`cliptune continual`): task/control ImageFolders, optionally `DIR:class,class`
    tasks: List[str] = option(help="Task ImageFolder (repeat, in order); DIR:class,class selects classes.", flag="--task",
                              path="folder", factory=list)
    controls: List[str] = option(help="Control ImageFolder evaluated zero-shot after each task (repeat).",
                                 flag="--control", path="folder", factory=list)
    reference: Optional[str] = option(None, "Reference images for zscl (any folder of images, unlabelled).", path="folder")
    reference_texts: Optional[str] = option(
        None, "Reference phrases, one per line [bundled ~1,000 concept names].", path="file")
    strategy: str = option("naive", "Continual strategy [naive].", choices=("naive", "lwf", "lwf-vr", "zscl", "wise", "modx"))
    distill_image: float = option(1.0, "zscl: weight of the image-side distillation [1.0].", min=0)
    distill_text: float = option(1.0, "zscl: weight of the text-side distillation [1.0].", min=0)
    distill_temperature: float = option(2.0, "lwf/zscl: distillation temperature.", above=0)
    avg_every: int = option(100, "zscl: weight-average snapshot every N optimizer steps [100].", min=1)
    wise_alpha: float = option(0.8, "wise: weight of the fine-tuned model after each task [0.8].", min=0, max=1)
    wise_anchor: str = option("task-start", "wise: interpolate with the task-start weights (ZSCL) or the initial ones.",
                              choices=("task-start", "initial"))
    vocab_per_step: Optional[int] = option(
        None, "zscl/lwf-vr: reference texts per step; unset: all of them (ZSCL).", min=1, unset="for the whole vocabulary")
    l2: float = option(0.0, "any strategy: weight of ZSCL's L2 pull toward the task-start weights [0].", min=0)
    vocab_size: int = option(1000, "lwf-vr: random token sequences in the virtual vocabulary (ZSCL's virtual_vocab).",
                             min=2)
    vocab_length: int = option(10, "lwf-vr: random tokens per sequence.", min=1)
    modx_alpha: float = option(20.0, "modx: weight of the off-diagonal distillation (Mod-X's alpha) [20].", min=0)
    # per-method options, keyed by method name
    methods: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    # the layer that set each key (build_config), logged when training starts; not a setting: never in
    # config.yaml, recipes or --set, and ignored when configs are compared
    sources: Dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def check_values(self) -> None:
        """Every declared bound and choice, then the checks that span fields; one line names the first bad one."""
        for spec in fields(self):
            check_value(getattr(self, spec.name), spec.metadata, spec.name)
        scale = self.aug_crop_scale
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            raise CliptuneError("'aug_crop_scale' must be two numbers [min, max] with 0 < min <= max <= 1, "
                                f"got {self.aug_crop_scale!r}")
        if self.val_fraction + self.test_fraction >= 1:
            raise CliptuneError(f"val_fraction + test_fraction must be below 1 (got {self.val_fraction} + {self.test_fraction})")

    def method_options(self) -> Dict[str, Any]:
        return dict(self.methods.get(self.method, {}))

    def to_dict(self) -> Dict[str, Any]:
        data = dataclasses.asdict(self)
        del data["sources"]
        sections = data.pop("methods")
        data.update({name: dict(values) for name, values in sections.items()})
        return data


SETTINGS = {spec.name: spec for spec in fields(RunConfig) if spec.name not in ("methods", "sources")}
SETTING_TYPES = typing.get_type_hints(RunConfig)
CONFIG_KEYS = list(SETTINGS)
PATH_KEYS = [name for name, spec in SETTINGS.items() if spec.metadata.get("path")]


def parse_dataset_spec(spec: str) -> tuple[str, Optional[List[str]]]:
    """`DIR` or `DIR:class,class` (a subset of the class folders); `hf:org/name` (a Hub dataset) too."""
    if Path(spec).exists() or ":" not in spec or (spec.startswith("hf:") and spec.count(":") == 1):
        return spec, None
    root, _, classes = spec.rpartition(":")
    return root, [c for c in classes.split(",") if c]


def check_config(config: RunConfig, files: bool = True) -> None:
    """Every run-level option in range (and, with `files`, every input path present), before any work.

    One line names the first bad option. Method options are checked by their own config classes.
    """
    config.check_values()
    if not files:
        return
    for key in PATH_KEYS:
        kind, value = SETTINGS[key].metadata["path"], getattr(config, key)
        for item in value if typing.get_origin(SETTING_TYPES[key]) is list else [value]:
            if kind == "any" or not isinstance(item, str) or not item:
                continue  # a tag or a path, unset, or templates given inline as a list
            path = Path(parse_dataset_spec(item)[0] if kind in ("folder", "dataset") else item)
            if kind == "dataset" and "{" in path.name:  # a shard pattern: each shard is checked when the data is read
                path = path.parent
            if kind == "dataset" and str(item).startswith("hf:"):  # a Hub dataset: checked when it is loaded
                continue
            found = {"folder": path.is_dir(), "file": path.is_file(), "dataset": path.exists()}[kind]
            if not found:
                raise CliptuneError(f"{flag_name(SETTINGS[key])} {item}: no such {'folder or file' if kind == 'dataset' else kind}")


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
            for name, option_value in value.items():
                full = f"{key}.{name}"
                if name not in section_hints:
                    raise _unknown_key(full, f" in {at(full)}" if where else "")
                section[name] = coerce(option_value, section_hints[name], full)
            continue
        if key not in CONFIG_KEYS:
            raise _unknown_key(key, location)
        try:
            coerced = coerce(value, SETTING_TYPES[key], key)
            check_value(coerced, SETTINGS[key].metadata, key)
        except CliptuneError as exc:
            raise CliptuneError(f"{exc}{location}") from None
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
    default_method: Optional[str] = None,
    protocol: Optional[Callable[[RunConfig], Dict[str, Any]]] = None,
) -> RunConfig:
    """Merge the layers in precedence order and validate them, naming the bad key and its file/line.

    engine defaults (RunConfig) < the method's training defaults < recipe < CLI flags < `--set`.
    `method_values` are CLI flags of method options (e.g. `--n-ctx` -> `n_ctx`); they go into the
    section of whichever method the run uses. A layer that sets `epochs` but not `steps` replaces a
    lower layer's step budget (and the other way round). The returned config's `sources` field
    names the layer that set each key (logged with the run). `default_method`: the method when no layer names
    one (default: the registry's DEFAULT_METHOD). `protocol`: a command's own defaults (e.g. continual
    learning's), computed from the highest layers' method and settings, between the method defaults and the recipe.
    """
    recipe_layers = read_recipe(recipe) if recipe else []
    cli = {k: v for k, v in (cli_values or {}).items() if v is not None}
    overrides = parse_set(set_values) if set_values else {}
    registry = _method_registry()
    if default_method is None:
        from cliptune.methods import DEFAULT_METHOD

        default_method = DEFAULT_METHOD
    probe = _probe(recipe_layers, cli, overrides, default_method)
    config = RunConfig(method=default_method)
    flags = {k: v for k, v in (method_values or {}).items() if v is not None}
    accepted = {f.name for f in fields(registry[probe.method].config_class)}
    for name in flags:
        if name not in accepted:
            raise CliptuneError(f"--{name.replace('_', '-')} does not apply to method '{probe.method}'")
    sources: Dict[str, str] = {}
    layers: List[Tuple[str, Any, Optional[str], Any]] = [("method defaults", registry[probe.method].training_defaults(probe.shots),
                                                          None, None)]
    if protocol is not None:
        layers.append(("protocol defaults", protocol(probe), None, None))
    layers += [(f"recipe {path.name}", values, str(path), lines) for values, path, lines in recipe_layers]
    layers += [("CLI flags", {**cli, probe.method: flags} if flags else cli, None, None)]
    for name, values, where, lines in layers:
        _apply_layer(config, values, name, sources, where=where or "", lines=lines)
    if overrides:
        _apply_layer(config, overrides, "--set", sources, set_layer=True)
    registry[config.method].config_class.from_options(config.method_options())  # validates before any work
    if config.scale_lr is None:
        defaults = ("method defaults", "protocol defaults", None)
        config.scale_lr = sources.get("lr") in defaults and sources.get("steps") not in defaults
    config.sources = sources
    check_config(config, files=False)  # paths are checked when a run starts (recipes may name data not here yet)
    return config


def _probe(recipe_layers: List[tuple], cli: Dict[str, Any], overrides: Dict[str, Any], default_method: str) -> RunConfig:
    """The layers without the defaults: the method and shot count (highest layer wins) decide the method defaults."""
    probe = RunConfig(method=default_method)
    for values, path, lines in recipe_layers:
        apply_values(probe, values, where=str(path), lines=lines)
    apply_values(probe, cli)
    _apply_set(probe, overrides)
    registry = _method_registry()
    if probe.method not in registry:
        raise CliptuneError(f"unknown method '{probe.method}' (available: {', '.join(sorted(registry))})")
    return probe


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
