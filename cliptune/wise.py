"""WiSE-FT (Wortsman et al., CVPR 2022): interpolate zero-shot and fine-tuned weights, `(1-a)·θ_0 + a·θ_1`.

Works for every run whose method can give its fine-tuned model as a plain open_clip state_dict
(`merged_state_dict()`: full fine-tuning, LoRA with its updates merged). A mixture is evaluated as a
zero-shot classifier of the mixed model, which for full fine-tuning is exactly how the run itself
classifies, so `a = 1` reproduces the run's accuracy and `a = 0` the zero-shot accuracy.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch

from cliptune.config import RunConfig, load_config
from cliptune.engine import Trainer
from cliptune.errors import CliptuneError
from cliptune.methods import build_method, methods_exporting
from cliptune.methods.full import FullFineTune
from cliptune.progress import RESULT
from cliptune.runfolder import RunFolder, atomic_write_json, read_json
from cliptune.session import Session, load_run_method, make_accelerator, model_from_config

log = logging.getLogger("cliptune")
StateDict = Dict[str, torch.Tensor]


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


def run_weights(run_dir: str | Path, device: str | torch.device = "cpu") -> Tuple[RunConfig, StateDict, StateDict]:
    """A run's config, its zero-shot (initial) open_clip state_dict and its fine-tuned (merged) one."""
    config = load_config(RunFolder(run_dir).config)
    mergeable = methods_exporting("merged")
    if config.method not in mergeable:
        raise CliptuneError(f"WiSE-FT needs a run whose weights merge into CLIP ({', '.join(mergeable)}); "
                            f"{run_dir} is a '{config.method}' run")
    finetuned = load_run_method(run_dir).merged_state_dict()
    model = model_from_config(config, device)
    return config, model.clip.state_dict(), finetuned


def wise_state_dict(run_dir: str | Path, alpha: float) -> StateDict:
    """The open_clip state_dict of a run's WiSE-FT mixture (what `export --wise-alpha` writes)."""
    check_alpha(alpha)
    _, zeroshot, finetuned = run_weights(run_dir)
    return interpolate(zeroshot, finetuned, alpha)


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
    if data_dir and Path(data_dir).resolve() != Path(config.data or "").resolve():
        config.classnames = None  # another dataset: its own folder names / classnames.yaml
    config.shots = None
    accelerator = make_accelerator(config.mixed_precision)
    session = Session.open(config, accelerator, cache_dir=None, data_dir=data_dir)
    data = session.data
    if not len(data.splits.get("val", ())):
        raise CliptuneError(f"{data.root} has no val split to choose the WiSE-FT alpha on")
    # A full run is evaluated exactly as it classified itself; other runs as a fully fine-tuned CLIP.
    options = read_json(run.checkpoints / "best" / "method.json")["config"] if config.method == FullFineTune.name else {}
    method = build_method(FullFineTune.name, session.model, data.classnames, session.templates, options)
    method.eval()
    trainer = Trainer(method, config, None, accelerator)
    splits = {name: session.inputs(name, method.uses_image_features) for name in ("val", "test")}
    result = {"alphas": alphas, "val_top1": [], "test_top1": []}
    for alpha in alphas:
        method.clip.load_state_dict(interpolate(zeroshot, finetuned, alpha))
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
