"""Typed, self-validating options: the one place that knows how a config value is checked.

Run settings (`config.RunConfig`) and every method's config dataclass declare their fields with
`option(...)`, whose metadata (help text, choices, bounds, CLI flag) drives validation, the
generated CLI flags, `cliptune methods show` and the recipe key check. Importing this module does not
import torch, so the CLI can read option declarations without paying for it.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import MISSING, field, fields
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from cliptune.core.errors import CliptuneError


def option(default: Any = MISSING, help: str = "", *, choices: Optional[Sequence] = None, min: Optional[float] = None,
           max: Optional[float] = None, above: Optional[float] = None, below: Optional[float] = None,
           unset: Optional[str] = None, flag: Optional[str] = None, path: Optional[str] = None,
           factory: Any = MISSING, comma_choices: Optional[Sequence[str]] = None):
    """A dataclass field with what validation and the CLI need to know about it.

    `min`/`max` are inclusive bounds, `above`/`below` exclusive ones; `unset` says what None means
    ("" when nothing needs saying), for error messages; `comma_choices` makes the value a comma-separated
    subset of those names; `flag` is the CLI flag (default: `--field-name`); `path` marks an input path
    ("file", "folder" or "dataset", either: checked before a run starts; "any": resolved against a recipe's folder only).
    """
    metadata = {"help": help, "choices": tuple(choices) if choices else None, "min": min, "max": max, "above": above,
                "below": below, "unset": unset, "flag": flag, "path": path,
                "comma_choices": tuple(comma_choices) if comma_choices else None}
    if factory is not MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def choices_of(cls, name: str) -> tuple:
    """The declared choices of one field of an option dataclass."""
    return next(spec.metadata["choices"] for spec in fields(cls) if spec.name == name)


def requirement(metadata: Mapping[str, Any]) -> str:
    """What the declared bounds ask for, in words: "at least 1", "in [0, 1)", "greater than 0 (or unset)"."""
    low, high, above, below = (metadata.get(k) for k in ("min", "max", "above", "below"))
    if low is not None and (high is not None or below is not None):
        text = f"in [{low:g}, {high:g}]" if high is not None else f"in [{low:g}, {below:g})"
    elif low is not None:
        text = f"at least {low:g}"
    elif above is not None:
        text = f"greater than {above:g}"
    elif high is not None:
        text = f"at most {high:g}"
    else:
        text = f"below {below:g}"
    unset = metadata.get("unset")
    return text if unset is None else f"{text} (or unset{' ' + unset if unset else ''})"


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def coerce(value: Any, annotation, key: str) -> Any:
    """Check a value against a dataclass field annotation; ints are accepted for floats."""
    origin = typing.get_origin(annotation)
    if origin is Union:
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        for choice in options:
            if choice is type(None):
                continue
            try:
                return coerce(value, choice, key)
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


def comma_list(value: Any, allowed: Sequence[str], key: str) -> List[str]:
    """`"vision,text"` -> ["vision", "text"]: a non-empty subset of `allowed`, in `allowed`'s order."""
    items = [item.strip() for item in str(value).split(",") if item.strip()]
    bad = [item for item in items if item not in allowed]
    if not items or bad:
        raise CliptuneError(f"'{key}' must be a comma list of {', '.join(allowed)}, got {value!r}")
    return [name for name in allowed if name in items]


def check_value(value: Any, metadata: Mapping[str, Any], key: str) -> None:
    """The choices and bounds an `option(...)` declares (None passes: it means "not set")."""
    if value is None:
        return
    if metadata.get("choices") and value not in metadata["choices"]:
        raise CliptuneError(f"'{key}' must be one of {', '.join(map(str, metadata['choices']))}, got {value!r}")
    if metadata.get("comma_choices"):
        comma_list(value, metadata["comma_choices"], key)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):
            raise CliptuneError(f"'{key}' must be a finite number, got {value!r}")
        low, high, above, below = (metadata.get(k) for k in ("min", "max", "above", "below"))
        if ((low is not None and value < low) or (high is not None and value > high)
                or (above is not None and value <= above) or (below is not None and value >= below)):
            raise CliptuneError(f"'{key}' must be {requirement(metadata)}, got {value!r}")


def validate_fields(instance: Any, prefix: str = "") -> None:
    """Coerce every field of a dataclass instance to its annotation and check its declared choices/bounds."""
    hints = typing.get_type_hints(type(instance))
    for spec in fields(instance):
        key = f"{prefix}{spec.name}"
        value = coerce(getattr(instance, spec.name), hints[spec.name], key)
        check_value(value, spec.metadata, key)
        object.__setattr__(instance, spec.name, value)


def flag_name(spec: dataclasses.Field) -> str:
    """The CLI flag of a field: its declared `flag`, else `--field-name`."""
    return spec.metadata.get("flag") or "--" + spec.name.replace("_", "-")


def default_of(spec: dataclasses.Field) -> Any:
    if spec.default is not MISSING:
        return spec.default
    if spec.default_factory is not MISSING:
        return spec.default_factory()
    return None
