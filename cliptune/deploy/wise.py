"""WiSE-FT mixtures of a finished run's weights with the zero-shot weights it started from.

What is mixed is the method's to say (`Method.wise_parts()`: the open_clip state_dict of methods that
merge into CLIP, and/or a linear head), and so is the zero-shot endpoint (`Method.zeroshot_endpoint`).
mlfoundations/wise-ft `wise_ft.py` interpolates the whole classifier, encoder and head; `a = 1`
reproduces the run and `a = 0` the zero-shot model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Tuple

import torch

from cliptune.config.run import RunConfig
from cliptune.core.errors import CliptuneError
from cliptune.data.templates import load_templates
from cliptune.methods import METHODS, method_class
from cliptune.models.interpolation import Parts, check_alpha, interpolate_parts
from cliptune.training.session import finished_run, load_run_method, model_from_config


def wise_methods() -> list:
    """Methods whose runs WiSE-FT can interpolate."""
    return sorted(name for name, cls in METHODS.items() if cls.wise_ft)


def run_weights(run_dir: str | Path, device: str | torch.device = "cpu") -> Tuple[RunConfig, Parts, Parts]:
    """A run's config and its zero-shot and fine-tuned `interpolable` parts."""
    config, _, sidecar = finished_run(run_dir)
    if sidecar["method"] not in wise_methods():
        raise CliptuneError(f"WiSE-FT needs a run whose weights merge into CLIP or a linear head ({', '.join(wise_methods())}); "
                            f"{run_dir} is a '{sidecar['method']}' run")
    finetuned = load_run_method(run_dir, device).wise_parts()
    model = model_from_config(config, device)
    reference = method_class(sidecar["method"]).zeroshot_endpoint(model, sidecar["classes"], load_templates(config.templates),
                                                                 sidecar["config"])
    return config, reference.wise_parts(), finetuned


def wise_state_dict(run_dir: str | Path, alpha: float) -> Parts:
    """A run's WiSE-FT mixture (what `export --wise-alpha` writes): `clip`, and `head` for a linear head."""
    check_alpha(alpha)
    _, zeroshot, finetuned = run_weights(run_dir)
    return interpolate_parts(zeroshot, finetuned, alpha)
