"""Method registry keyed by the name used in `--method` (peft style: name -> class + config)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Type

from cliptune.methods.base import Method, MethodConfig
from cliptune.methods.cocoop import CoCoOp
from cliptune.methods.coop import CoOp
from cliptune.methods.full import FullFineTune
from cliptune.methods.linear_probe import LinearProbe
from cliptune.methods.lora import LoRA
from cliptune.methods.maple import MaPLe


@dataclass(frozen=True)
class MethodEntry:
    method_class: Type[Method]

    @property
    def config_class(self) -> Type[MethodConfig]:
        return self.method_class.config_class


METHODS: Dict[str, MethodEntry] = {cls.name: MethodEntry(cls) for cls in (LinearProbe, LoRA, FullFineTune, CoOp, CoCoOp, MaPLe)}


def methods_exporting(fmt: str) -> list:
    """Names of the methods whose runs can be written as `fmt` ("merged": weights that fold into CLIP)."""
    return sorted(name for name, entry in METHODS.items() if fmt in entry.method_class.export_formats)


def build_method(name, model, classnames, templates, options=None, descriptions=None) -> Method:
    from cliptune.errors import CliptuneError

    if name not in METHODS:
        raise CliptuneError(f"unknown method '{name}' (available: {', '.join(sorted(METHODS))})")
    entry = METHODS[name]
    config = entry.config_class(**(options or {}))
    return entry.method_class(model, classnames, templates, config, descriptions)
