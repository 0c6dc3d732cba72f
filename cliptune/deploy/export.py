"""`cliptune export`: a finished run's learned weights in formats other tools load.

- `merged`: the full open_clip state_dict with the method's weights merged in, as one safetensors
  file that plain `open_clip.create_model_and_transforms(arch, pretrained=FILE)` loads. A run with a
  linear head (`full.head: linear`) classifies with that head, which an open_clip checkpoint has no
  place for: it is written beside the file as `NAME.head.safetensors` (`weight` (classes, dim) and
  `bias`, applied to unit-norm image features, no logit scale; the class names in its metadata).
  The open_clip file alone then holds the fine-tuned image tower and the untouched text tower.
- `hub` (cliptune/deploy/hub.py): the merged model in open_clip's Hugging Face Hub layout (config, weights, model
  card), loadable as `local-dir:DIR`.
- `adapter`: peft's `save_pretrained` layout (`adapter_config.json` + `adapter_model.safetensors`),
  small, reloaded onto the base model with `cliptune eval RUN --adapter DIR`.
- `classifier` (cliptune/deploy/classifier.py) and `onnx` (cliptune/deploy/onnx.py): a ready classifier, for
  every method and zero-shot runs (also from a classifier export).

A method opts in through `export_formats` and implements, per format: `merged_state_dict()`
(merged), or `adapter_config()`, `adapter_state_dict()` and `load_adapter_state_dict(state)` (adapter).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Dict, Optional, cast

import torch

from cliptune.core.errors import CliptuneError
from cliptune.methods import METHODS, methods_exporting
from cliptune.methods.base import Adaptable, Mergeable, Method
from cliptune.core.runfolder import atomic_save_safetensors
from cliptune.training.session import finished_run, load_run_method
from cliptune.deploy.wise import wise_state_dict
from cliptune.models.interpolation import check_alpha

ANY_RUN_FORMATS = ("classifier", "onnx")  # every method, zero-shot runs too
FORMATS = ("merged", "hub", "adapter") + ANY_RUN_FORMATS
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def check_format(method_name: str, fmt: str) -> None:
    """Fail early, before any model is built, when the run's method cannot be written as `fmt`."""
    if fmt not in FORMATS:
        raise CliptuneError(f"unknown export format '{fmt}' (available: {', '.join(FORMATS)})")
    if fmt in ANY_RUN_FORMATS:
        return
    supported = METHODS[method_name].export_formats if method_name in METHODS else ()
    needed = "merged" if fmt == "hub" else fmt  # the Hub layout holds a merged model
    if needed not in supported:
        able = methods_exporting(needed)
        can = f"it supports: {', '.join(supported)}" if supported else "it supports no export format"
        raise CliptuneError(f"method '{method_name}' cannot be exported as '{fmt}' ({can}; '{fmt}' works for: {', '.join(able)})")


def merged_state_dict(run_dir: str | Path) -> Dict[str, torch.Tensor]:
    """The run's full open_clip state_dict with its learned weights merged (same keys as the base model)."""
    _, _, sidecar = finished_run(run_dir)
    check_format(sidecar["method"], "merged")
    return cast(Mergeable, load_run_method(run_dir)).merged_state_dict()


def head_path(output: Path) -> Path:
    """Where a merged export puts a linear head: `NAME.head.safetensors` beside `NAME.safetensors`."""
    return output.with_name(f"{output.stem}.head.safetensors")


def _prepare_output(output: Path, overwrite: bool) -> None:
    if output.exists() and not (output.is_dir() and not any(output.iterdir())):
        if not overwrite:
            raise CliptuneError(f"{output} already exists (pass --overwrite to replace it)")
        shutil.rmtree(output) if output.is_dir() else output.unlink()
    if output.suffix == ".safetensors" and head_path(output).exists():
        if not overwrite:
            raise CliptuneError(f"{head_path(output)} already exists (pass --overwrite to replace it)")
        head_path(output).unlink()


def export_run(run_dir: str | Path, fmt: str, output: str | Path, overwrite: bool = False,
               wise_alpha: Optional[float] = None) -> Path:
    """Write the run's best weights as `fmt` to `output` (a .safetensors file, or a folder for adapters).

    `wise_alpha` (merged only) writes the WiSE-FT mixture `(1-A)·zero-shot + A·fine-tuned` instead.
    """
    if fmt in ANY_RUN_FORMATS:
        if wise_alpha is not None:
            raise CliptuneError("--wise-alpha only applies to --format merged")
        from cliptune.deploy.classifier import export_classifier
        from cliptune.deploy.onnx import check_output, export_onnx

        output = Path(output)
        if fmt == "onnx":
            check_output(output)
        _prepare_output(output, overwrite)
        return export_classifier(run_dir, output) if fmt == "classifier" else export_onnx(run_dir, output)
    config, _, sidecar = finished_run(run_dir)
    check_format(sidecar["method"], fmt)
    if fmt == "hub":
        if wise_alpha is not None:
            raise CliptuneError("--wise-alpha only applies to --format merged")
        _prepare_output(Path(output), overwrite)
        from cliptune.deploy.hub import export_hub

        return export_hub(run_dir, output)
    if wise_alpha is not None:
        if fmt != "merged":
            raise CliptuneError("--wise-alpha only applies to --format merged")
        check_alpha(wise_alpha)
    output = Path(output)
    if fmt == "merged" and output.suffix != ".safetensors":
        raise CliptuneError(f"--output for a merged export must be a .safetensors file, got {output}")
    _prepare_output(output, overwrite)
    if fmt == "merged":
        arch = config.model or Path(config.model_config or "").stem
        metadata = {"format": "pt", "arch": arch, "cliptune_method": sidecar["method"], "cliptune_run": str(Path(run_dir).resolve())}
        if wise_alpha is None:
            parts = load_run_method(run_dir).wise_parts()
        else:
            parts = wise_state_dict(run_dir, wise_alpha)
            metadata["cliptune_wise_alpha"] = str(wise_alpha)
        atomic_save_safetensors(output, parts["clip"], metadata=metadata)
        if "head" in parts:
            head_metadata = {**metadata, "classes": json.dumps(sidecar["classes"])}
            atomic_save_safetensors(head_path(output), parts["head"], metadata=head_metadata)
        return output
    adapted = cast(Adaptable, load_run_method(run_dir))  # check_format: the method exports "adapter"
    output.mkdir(parents=True, exist_ok=True)
    adapted.adapter_config().save_pretrained(str(output))
    atomic_save_safetensors(output / ADAPTER_WEIGHTS, adapted.adapter_state_dict(), metadata={"format": "pt"})
    return output


def load_adapter(method: Method, folder: str | Path) -> None:
    """Load an `export --format adapter` folder onto a freshly built method (base model + empty adapter)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    check_format(method.name, "adapter")
    if not (folder / ADAPTER_CONFIG).is_file() or not (folder / ADAPTER_WEIGHTS).is_file():
        raise CliptuneError(f"{folder} is not an adapter export (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    saved = json.loads((folder / ADAPTER_CONFIG).read_text())
    adapted = cast(Adaptable, method)
    own = adapted.adapter_config().to_dict()
    for key in ("peft_type", "r", "lora_alpha", "target_modules"):
        if own.get(key) != saved.get(key):
            raise CliptuneError(f"adapter in {folder} was made with a different setup than this run ({key} differs)")
    adapted.load_adapter_state_dict(load_file(str(folder / ADAPTER_WEIGHTS)))
