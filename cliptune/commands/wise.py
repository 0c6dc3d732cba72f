"""`cliptune wise`: evaluate WiSE-FT mixtures of a run on val and test and pick alpha on val."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from cliptune.core.errors import CliptuneError
from cliptune.core.figures import new_figure, save_figure
from cliptune.core.progress import RESULT
from cliptune.core.runfolder import RunFolder, atomic_write_json
from cliptune.deploy.wise import run_weights
from cliptune.methods import method_class
from cliptune.models.interpolation import check_alpha, interpolate_parts
from cliptune.training.engine import Trainer
from cliptune.training.session import Session, evaluation_config, finished_run, make_accelerator

log = logging.getLogger("cliptune")


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
    config = evaluation_config(config, data_dir)
    accelerator = make_accelerator(config.mixed_precision)
    session = Session.open(config, accelerator, cache_dir=None, data_dir=data_dir)
    data = session.data
    if data.multi_label:
        raise CliptuneError(f"{data.root} is multi-label: WiSE-FT chooses its alpha by val top-1, single-label data only for now")
    if not len(data.splits.get("val", ())):
        raise CliptuneError(f"{data.root} has no val split to choose the WiSE-FT alpha on")
    method = method_class(sidecar["method"]).zeroshot_endpoint(session.model, data.classnames, session.templates,
                                                              sidecar["config"])
    if method.class_specific and list(data.classnames) != list(sidecar["classes"]):
        raise CliptuneError(f"{run_dir} learned a head for its own classes; {data.root} has other classes")
    method.eval()
    trainer = Trainer(method, config, None, accelerator)
    splits = {name: session.inputs(name, method.uses_image_features) for name in ("val", "test")}
    result: Dict[str, Any] = {"alphas": alphas, "val_top1": [], "test_top1": []}
    for alpha in alphas:
        method.load_wise_parts(interpolate_parts(zeroshot, finetuned, alpha))
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
    figure, axes = new_figure(figsize=(5, 3.5))
    for split in ("val", "test"):
        axes.plot(result["alphas"], [100 * v for v in result[f"{split}_top1"]], marker="o", label=split)
    axes.axvline(result["best_alpha"], color="grey", linestyle="--", label=f"best alpha {result['best_alpha']:g}")
    axes.set_xlabel("alpha (0 = zero-shot, 1 = fine-tuned)")
    axes.set_ylabel("top-1 accuracy (%)")
    axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    save_figure(figure, path, dpi=120)
