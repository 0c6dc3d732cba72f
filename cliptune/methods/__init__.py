"""Method registry keyed by the name used in `--method` (peft style: name -> class + config).

Adding a method is one module under `cliptune/methods/` and one entry in `REGISTERED` below; the
registry checks that the class declares what the rest of cliptune relies on.
"""

from __future__ import annotations

import inspect
import sys
import typing
from dataclasses import fields
from typing import Dict, Optional, Type

from cliptune.core.errors import CliptuneError
from cliptune.core.seeding import isolated_rng
from cliptune.methods.base import Method, MethodConfig
from cliptune.methods.biomedcoop import BiomedCoOp
from cliptune.methods.clap import CLAP
from cliptune.methods.clip_adapter import CLIPAdapter
from cliptune.methods.cocoop import CoCoOp
from cliptune.methods.coop import CoOp
from cliptune.methods.full import FullFineTune
from cliptune.methods.kgcoop import KgCoOp
from cliptune.methods.linear_probe import LinearProbe
from cliptune.methods.lora import LoRA
from cliptune.methods.maple import MaPLe
from cliptune.methods.mocoop import MoCoOp
from cliptune.methods.promptsrc import PromptSRC
from cliptune.methods.tip_adapter import TipAdapter, TipAdapterF
from cliptune.core.options import default_of, flag_name

# What a method must implement for each export format it declares.
FORMAT_NEEDS = {"merged": ("merged_state_dict",), "adapter": ("adapter_config", "adapter_state_dict", "load_adapter_state_dict")}

REGISTERED = (LinearProbe, CoOp, KgCoOp, BiomedCoOp, CoCoOp, MaPLe, PromptSRC, MoCoOp, LoRA, FullFineTune, TipAdapter, TipAdapterF, CLIPAdapter, CLAP)


def _checked(cls: Type[Method]) -> Type[Method]:
    """A programming error (not a user error) when a method class is incomplete."""
    if inspect.isabstract(cls) or not cls.name or not issubclass(cls.config_class, MethodConfig):
        raise TypeError(f"{cls.__name__} is not a complete Method (abstract, unnamed or without a MethodConfig)")
    if not cls.trains or not cls.paper:
        raise TypeError(f"{cls.__name__} must say what trains and which paper it follows")
    if cls.config_class.__dict__.get("section", cls.name) != cls.name:
        raise TypeError(f"{cls.__name__} shares {cls.config_class.__name__} with '{cls.config_class.section}': give it its own subclass")
    cls.config_class.section = cls.name  # the recipe section and error prefix of the method's options
    for fmt in cls.export_formats:
        if fmt not in FORMAT_NEEDS:
            raise TypeError(f"{cls.__name__} declares unknown export format {fmt!r}")
        missing = [name for name in FORMAT_NEEDS[fmt] if not callable(getattr(cls, name, None))]
        if missing:
            raise TypeError(f"{cls.__name__} declares export format {fmt!r} but lacks {', '.join(missing)}")
    return cls


METHODS: Dict[str, Type[Method]] = {cls.name: _checked(cls) for cls in REGISTERED}
DEFAULT_METHOD = LinearProbe.name  # what `finetune` trains without --method: cheap, and never worse than its start
CONTINUAL_DEFAULT_METHOD = FullFineTune.name  # continual learning carries merged weights from task to task


def method_class(name: str) -> Type[Method]:
    if name not in METHODS:
        raise CliptuneError(f"unknown method '{name}' (available: {', '.join(sorted(METHODS))})")
    return METHODS[name]


def methods_exporting(fmt: str) -> list:
    """Names of the methods whose runs can be written as `fmt` ("merged": weights that fold into CLIP)."""
    return sorted(name for name, cls in METHODS.items() if fmt in cls.export_formats)


def build_method(name, model, classnames, templates, options=None, descriptions=None, seed: int = 0) -> Method:
    """The method `name` on `model`; its own parameters are initialised from `seed` (the caller's random
    generator is left as it was)."""
    cls = method_class(name)
    config = cls.config_class.from_options(options)
    with isolated_rng(seed):
        return cls(model, classnames, templates, config, descriptions)


def describe_method(name: str, shots: Optional[int] = 16) -> str:
    """What `cliptune methods show NAME` prints: the method, its training defaults and its options."""
    cls = method_class(name)
    lines = [f"{cls.name}: {cls.trains}", f"paper: {cls.paper}", "",
             *([f"differs from the original code: {cls.differs}"] if cls.differs else []),
             f"training defaults (with --shots {shots}; a recipe, CLI flags and --set override them):"]
    defaults = cls.training_defaults(shots)
    lines += [f"  {key}: {value}" for key, value in defaults.items()] or ["  (the engine's defaults)"]
    lines += ["", f"options (flag, or --set {cls.name}.NAME=VALUE, or a '{cls.name}:' recipe section):"]
    for spec in fields(cls.config_class):
        choices = spec.metadata.get("choices") or spec.metadata.get("comma_choices")
        allowed = f" ({'|'.join(map(str, choices))})" if choices else ""
        lines.append(f"  {flag_name(spec)} / {cls.name}.{spec.name} = {default_of(spec)!r}{allowed}: {spec.metadata.get('help', '')}")
    return "\n".join(lines) + "\n"


def method_page(name: str) -> str:
    """The documentation page of a method (`docs/methods/NAME.md`, written by `scripts/write_method_pages.py` and kept
    equal to this by the tests): its module's docstring, then what `cliptune methods show NAME` prints."""
    cls = method_class(name)
    module = sys.modules[cls.__module__]
    prose = inspect.cleandoc(module.__doc__ or "").replace("[", "\\[")  # plain text: brackets are not links
    return (f"# `{name}`: {cls.paper}\n\n{prose}\n\n"
            f"Source: `{module.__name__.replace('.', '/')}.py`.\n\n## Defaults and options\n\n"
            f"`cliptune methods show {name}`:\n\n```text\n{describe_method(name)}```\n")


def flag_table() -> Dict:
    """The methods as the CLI's `--help` needs them, without importing torch: per method (registry order), its
    export formats and, per option, name, flag, type, choices, default and help. Shipped as
    `cliptune/config/method_flags.json`; `python scripts/write_method_flags.py` rewrites it, and
    tests/test_startup.py fails when it differs from this."""
    table = {}
    for name, cls in METHODS.items():
        hints = typing.get_type_hints(cls.config_class)
        options = []
        for spec in fields(cls.config_class):
            args = [a for a in typing.get_args(hints[spec.name]) if a is not type(None)]
            kind = (args[0] if args else hints[spec.name]).__name__
            choices = spec.metadata.get("choices")
            options.append({"name": spec.name, "flag": flag_name(spec), "type": kind, "help": spec.metadata.get("help", ""),
                            "default": default_of(spec), "choices": list(choices) if choices else None})
        table[name] = {"export_formats": list(cls.export_formats), "options": options}
    return table
