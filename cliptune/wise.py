"""WiSE-FT (Wortsman et al., CVPR 2022): interpolate zero-shot and fine-tuned weights, `(1-a)·θ_0 + a·θ_1`.

What is interpolated depends on the run (mlfoundations/wise-ft `wise_ft.py` interpolates the whole
classifier, encoder and head):
- `clip`: the open_clip state_dict, for runs whose method gives its model as one (`merged_state_dict()`:
  full fine-tuning, LoRA with its updates merged);
- `head`: a linear head's `weight` and `bias` (full fine-tuning with `head: linear`, whose zero-shot
  head is the zero-shot weights × logit scale; linear-probe runs, whose zero-shot head is the zero-shot
  weights, bias 0, under the run's fixed scale).
A mixture is evaluated as the run classifies: full runs with their own head, linear-probe runs as a
probe, LoRA runs as a zero-shot classifier of the mixed model; `a = 1` reproduces the run's accuracy
and `a = 0` the zero-shot accuracy.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from cliptune.config import RunConfig
from cliptune.engine import Trainer
from cliptune.errors import CliptuneError
from cliptune.methods import build_method, methods_exporting
from cliptune.methods.base import Method
from cliptune.methods.full import FullFineTune
from cliptune.methods.linear_probe import LinearProbe
from cliptune.progress import RESULT
from cliptune.runfolder import RunFolder, atomic_write_json
from cliptune.session import Session, finished_run, load_run_method, make_accelerator, model_from_config
from cliptune.templates import load_templates

log = logging.getLogger("cliptune")
StateDict = Dict[str, torch.Tensor]
Parts = Dict[str, StateDict]


def wise_methods() -> list:
    """Methods whose runs WiSE-FT can interpolate: those that merge into CLIP, and the linear probe."""
    return sorted({*methods_exporting("merged"), LinearProbe.name})


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


def interpolable(method: Method) -> Parts:
    """What WiSE-FT mixes for this method: `clip` (when it merges into CLIP) and/or a linear `head`."""
    parts = {}
    if "merged" in method.export_formats:
        parts["clip"] = method.merged_state_dict()
    head = getattr(method, "head", None)
    if isinstance(head, nn.Linear):
        parts["head"] = {key: value.detach().clone() for key, value in head.state_dict().items()}
    return parts


def load_interpolable(method: Method, parts: Parts) -> None:
    if "clip" in parts:
        method.clip.load_state_dict(parts["clip"])
    if "head" in parts:
        method.head.load_state_dict(parts["head"])


def interpolate_parts(zeroshot: Parts, finetuned: Parts, alpha: float) -> Parts:
    return {name: interpolate(zeroshot[name], finetuned[name], alpha) for name in finetuned}


def zeroshot_method(method_name: str, model, classnames, templates, options: Dict) -> Method:
    """A freshly built method that holds the run's zero-shot endpoint and classifies as the run did.

    Full runs keep their options (the `linear` head starts at its zero-shot value); linear probes start
    at the zero-shot head whatever their `init`; other runs (LoRA) are evaluated as a fully fine-tuned
    CLIP, i.e. with the zero-shot head of the mixed model.
    """
    if method_name == FullFineTune.name:
        return build_method(method_name, model, classnames, templates, options)
    if method_name == LinearProbe.name:
        return build_method(method_name, model, classnames, templates, {**options, "init": "zeroshot"})
    return build_method(FullFineTune.name, model, classnames, templates)


def run_weights(run_dir: str | Path, device: str | torch.device = "cpu") -> Tuple[RunConfig, Parts, Parts]:
    """A run's config and its zero-shot and fine-tuned `interpolable` parts."""
    config, _, sidecar = finished_run(run_dir)
    if sidecar["method"] not in wise_methods():
        raise CliptuneError(f"WiSE-FT needs a run whose weights merge into CLIP or a linear probe ({', '.join(wise_methods())}); "
                            f"{run_dir} is a '{sidecar['method']}' run")
    finetuned = interpolable(load_run_method(run_dir, device))
    model = model_from_config(config, device)
    reference = zeroshot_method(sidecar["method"], model, sidecar["classes"], load_templates(config.templates), sidecar["config"])
    return config, interpolable(reference), finetuned


def wise_state_dict(run_dir: str | Path, alpha: float) -> Parts:
    """A run's WiSE-FT mixture (what `export --wise-alpha` writes): `clip`, and `head` for a linear head."""
    check_alpha(alpha)
    _, zeroshot, finetuned = run_weights(run_dir)
    return interpolate_parts(zeroshot, finetuned, alpha)


def parse_alphas(text: str) -> list:
    try:
        alphas = [float(a) for a in text.split(",") if a.strip()]
    except ValueError:
        raise CliptuneError(f"--alphas must be comma-separated numbers in [0, 1], got {text!r}") from None
    if not alphas:
        raise CliptuneError("--alphas is empty")
    return [check_alpha(a) for a in alphas]


def wise_sweep(run_dir: str | Path, data_dir: Optional[str] = None, alphas: Sequence[float] = (0, 0.25, 0.5, 0.75, 1)) -> Dict:
    """Evaluate each mixture on val and test; write RUN/wise.json and RUN/wise.png (best alpha chosen on val)."""

    alphas = [check_alpha(a) for a in alphas]
    run = RunFolder(run_dir)
    config, zeroshot, finetuned = run_weights(run_dir)
    _, _, sidecar = finished_run(run_dir)
    if data_dir and Path(data_dir).resolve() != Path(config.data or "").resolve():
        config.classnames = None  # another dataset: its own folder names / classnames.yaml
    config.shots = None
    accelerator = make_accelerator(config.mixed_precision)
    session = Session.open(config, accelerator, cache_dir=None, data_dir=data_dir)
    data = session.data
    if not len(data.splits.get("val", ())):
        raise CliptuneError(f"{data.root} has no val split to choose the WiSE-FT alpha on")
    method = zeroshot_method(sidecar["method"], session.model, data.classnames, session.templates, sidecar["config"])
    if method.class_specific and list(data.classnames) != list(sidecar["classes"]):
        raise CliptuneError(f"{run_dir} learned a head for its own classes; {data.root} has other classes")
    method.eval()
    trainer = Trainer(method, config, None, accelerator)
    splits = {name: session.inputs(name, method.uses_image_features) for name in ("val", "test")}
    result = {"alphas": alphas, "val_top1": [], "test_top1": []}
    for alpha in alphas:
        load_interpolable(method, interpolate_parts(zeroshot, finetuned, alpha))
        for name, inputs in splits.items():
            result[f"{name}_top1"].append(trainer.evaluate(inputs, data.classes)["top1"])
        log.info("WiSE-FT alpha %.2f: val top-1 %.2f%%  test top-1 %.2f%%", alpha,
                 100 * result["val_top1"][-1], 100 * result["test_top1"][-1], extra=RESULT)
    best = max(range(len(alphas)), key=lambda i: (result["val_top1"][i], -i))  # ties: the first listed
    result["best_alpha"] = alphas[best]
    atomic_write_json(run.root / "wise.json", result)
    plot_sweep(result, run.root / "wise.png", title=f"WiSE-FT of {run.root.name}")
    return result


def plot_sweep(result: Dict, path: Path, title: str = "WiSE-FT") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5, 3.5))
    for split in ("val", "test"):
        axes.plot(result["alphas"], [100 * v for v in result[f"{split}_top1"]], marker="o", label=split)
    axes.axvline(result["best_alpha"], color="grey", linestyle="--", label=f"best alpha {result['best_alpha']:g}")
    axes.set_xlabel("alpha (0 = zero-shot, 1 = fine-tuned)")
    axes.set_ylabel("top-1 accuracy (%)")
    axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
