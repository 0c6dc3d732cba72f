"""Continual learning over a sequence of tasks (`cliptune continual`): strategies that keep zero-shot
ability (ZSCL, LwF, WiSE, Mod-X, ...) around the shared training loop, one module each, registered by name.

May import: everything below `training` and `training` itself (layer 6); not `deploy` or `commands`.
"""

from __future__ import annotations

from typing import Dict, Type

from cliptune.continual.base import Strategy
from cliptune.continual.lwf import LwF
from cliptune.continual.lwf_vr import LwFVR
from cliptune.continual.modx import ModX
from cliptune.continual.naive import Naive
from cliptune.continual.wise import WiSE
from cliptune.continual.zscl import ZSCL
from cliptune.core.errors import CliptuneError

REGISTERED = (Naive, LwF, LwFVR, ZSCL, WiSE, ModX)
STRATEGIES: Dict[str, Type[Strategy]] = {cls.name: cls for cls in REGISTERED}


def strategy_class(name: str) -> Type[Strategy]:
    if name not in STRATEGIES:
        raise CliptuneError(f"unknown strategy '{name}' (available: {', '.join(STRATEGIES)})")
    return STRATEGIES[name]
