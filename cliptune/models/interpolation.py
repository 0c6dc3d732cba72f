"""Weight-space interpolation, `(1-a)·θ_0 + a·θ_1` (WiSE-FT, Wortsman et al., CVPR 2022; ZSCL's weight ensemble)."""

from __future__ import annotations

import math
from typing import Dict

import torch

from cliptune.core.errors import CliptuneError

StateDict = Dict[str, torch.Tensor]
Parts = Dict[str, StateDict]  # named state dicts, e.g. {"clip": ..., "head": ...}


def check_alpha(alpha: float) -> float:
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and 0.0 <= alpha <= 1.0):
        raise CliptuneError(f"WiSE-FT alpha must be a number in [0, 1], got {alpha!r}")
    return float(alpha)


def interpolate(zeroshot: StateDict, finetuned: StateDict, alpha: float) -> StateDict:
    """`(1 - alpha) * zeroshot + alpha * finetuned` for floating-point tensors (computed in at least fp32);
    other tensors (integer buffers) are taken from `finetuned`."""
    alpha = check_alpha(alpha)
    if set(zeroshot) != set(finetuned):
        different = sorted(set(zeroshot) ^ set(finetuned))
        raise CliptuneError(f"zero-shot and fine-tuned weights have different keys (e.g. {different[0]})")
    mixed = {}
    for key, theta0 in zeroshot.items():
        theta1 = finetuned[key].to(theta0.device)
        if theta0.shape != theta1.shape:
            raise CliptuneError(f"zero-shot and fine-tuned '{key}' differ in shape: {tuple(theta0.shape)} vs {tuple(theta1.shape)}")
        if theta0.is_floating_point():
            dtype = torch.promote_types(theta0.dtype, torch.float32)
            mixed[key] = ((1 - alpha) * theta0.to(dtype) + alpha * theta1.to(dtype)).to(theta0.dtype)
        else:
            mixed[key] = theta1.clone()
    return mixed


def interpolate_parts(zeroshot: Parts, finetuned: Parts, alpha: float) -> Parts:
    return {name: interpolate(zeroshot[name], finetuned[name], alpha) for name in finetuned}
