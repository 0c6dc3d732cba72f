"""HTML reports: `RUN/report.html` after every `finetune`/`zeroshot` run, and `cliptune report RUN...` side by side.

A report is one self-contained file (figures are base64 PNGs rendered by matplotlib's Agg renderer, no
scripts, no network): headline numbers, the confusion matrix, per-class accuracy against zero-shot,
training loss and validation accuracy per epoch, a reliability diagram with its ECE, and the resolved
config. The confusion matrix and the reliability diagram come from the evaluated split's logits,
which runs store as `RUN/<split>-predictions.safetensors` (older runs: recomputed through
`cliptune.load` when the run's data is still there).
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from cliptune.core.errors import CliptuneError
from cliptune.core.figures import new_figure, png_bytes
from cliptune.core.metrics import calibration_bins, expected_calibration_error
from cliptune.core.runfolder import RunFolder, atomic_save_safetensors, atomic_write_text, read_json

REPORT = "report.html"
NUMBER = re.compile(r"[\d.,]+%?|–")
PER_CLASS_SHOWN = 40  # above this many classes, the per-class chart shows the largest gains and losses

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0; } td, th { padding: 3px 10px; border-bottom: 1px solid #eee; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; height: auto; } .figures { display: flex; flex-wrap: wrap; gap: 1em; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; } .note { color: #666; } .warning { color: #a40000; font-weight: bold; }
"""


# ----- predictions stored with the run -----
def predictions_path(run_dir: str | Path, split: str) -> Path:
    return Path(run_dir) / f"{split}-predictions.safetensors"


def save_predictions(run_dir: str | Path, split: str, logits: torch.Tensor, labels: torch.Tensor) -> None:
    """The evaluated split's logits and labels, for the report's confusion matrix and reliability diagram."""
    labels = labels.float() if labels.dim() == 2 else labels.long()  # multi-label targets stay a (N, classes) table
    atomic_save_safetensors(predictions_path(run_dir, split), {"logits": logits.float(), "labels": labels})


def _split_labels(run: RunFolder, split: str) -> Tuple[List[Path], List[int]]:
    from cliptune.config.run import load_config
    from cliptune.data.sources import load_data
    from cliptune.training.session import data_source

    config = load_config(run.config)
    if config.base_novel or not config.data:
        raise CliptuneError("the split cannot be rebuilt here")  # base classes only: not worth a second copy of the protocol
    data = load_data(config.data, config.val_fraction, config.test_fraction, config.seed, config.shots, config.classnames,
                     config.strict, **data_source(config))
    return data.split(split).files, data.split(split).labels


def load_predictions(run_dir: str | Path, split: str) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """(logits, labels) of a run's evaluated split: stored, else recomputed when the data is there, else None."""
    path = predictions_path(run_dir, split)
    if path.is_file():
        from safetensors.torch import load_file

        stored = load_file(str(path))
        return stored["logits"], stored["labels"]
    run = RunFolder(run_dir)
    try:
        files, labels = _split_labels(run, split)
    except CliptuneError:
        return None
    from cliptune.deploy.classifier import load

    classifier = load(run_dir)
    logits = []
    for start in range(0, len(files), 64):
        batch = torch.stack([classifier.preprocess(_rgb(path)) for path in files[start : start + 64]])
        logits.append(classifier.logits(batch).cpu())
    return torch.cat(logits), torch.tensor(labels)


def _rgb(path: Path):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


# ----- figures -----
def _png(figure) -> str:
    """An <img> holding the figure as an embedded PNG."""
    data = base64.b64encode(png_bytes(figure, dpi=100, bbox_inches="tight")).decode("ascii")
    return f'<img alt="figure" src="data:image/png;base64,{data}">'


def confusion_matrix(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(true, predicted) counts."""
    index = labels.long() * num_classes + logits.argmax(dim=1)
    return torch.bincount(index, minlength=num_classes * num_classes).view(num_classes, num_classes)


def confusion_figure(logits: torch.Tensor, labels: torch.Tensor, classes: Sequence[str], title: str) -> str:
    counts = confusion_matrix(logits, labels, len(classes)).float()
    rates = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
    size = min(12, 3 + 0.35 * len(classes))
    figure, axes = new_figure(figsize=(size, size))
    image = axes.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="share of the true class")
    if len(classes) <= 30:
        axes.set_xticks(range(len(classes)), classes, rotation=90, fontsize=8)
        axes.set_yticks(range(len(classes)), classes, fontsize=8)
        if len(classes) <= 15:
            for i in range(len(classes)):
                for j in range(len(classes)):
                    if counts[i, j]:
                        axes.text(j, i, int(counts[i, j]), ha="center", va="center", fontsize=7,
                                  color="white" if rates[i, j] > 0.5 else "black")
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    axes.set_title(title)
    return _png(figure)


def per_class_figure(series: Dict[str, Dict[str, float]], classes: Sequence[str], title: str,
                     measure: str = "top-1 accuracy") -> str:
    """Horizontal bars of a per-class `measure` (top-1; AP of multi-label runs), one colour per series (e.g. zero-shot
    and the method)."""
    names = list(series)
    shown = list(classes)
    if len(shown) > PER_CLASS_SHOWN and len(names) >= 2:  # the largest changes from the first series to the last
        first, last = series[names[0]], series[names[-1]]
        shown.sort(key=lambda c: last.get(c, 0) - first.get(c, 0))
        half = PER_CLASS_SHOWN // 2
        shown = shown[:half] + shown[-half:]
        title += f" ({half} largest losses and gains of {len(classes)} classes)"
    elif len(shown) > PER_CLASS_SHOWN:
        shown = shown[:PER_CLASS_SHOWN]
        title += f" (first {PER_CLASS_SHOWN} of {len(classes)} classes)"
    height = 0.8 / len(names)
    figure, axes = new_figure(figsize=(8, 1 + 0.3 * len(shown) * max(1, len(names) / 2)))
    for k, name in enumerate(names):
        values = [series[name].get(c, float("nan")) for c in shown]
        axes.barh([i + k * height for i in range(len(shown))], values, height=height, label=name)
    axes.set_yticks([i + height * (len(names) - 1) / 2 for i in range(len(shown))], shown, fontsize=8)
    axes.invert_yaxis()
    axes.set_xlim(0, 1)
    axes.set_xlabel(measure)
    axes.set_title(title)
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    return _png(figure)


def curves_figure(histories: Dict[str, List[Dict]], title: str) -> Optional[str]:
    """Training loss and validation top-1 (mAP of multi-label runs) per epoch, one line per run."""
    histories = {name: h for name, h in histories.items() if h}
    if not histories:
        return None
    figure, (loss_axes, val_axes) = new_figure(figsize=(11, 3.8), ncols=2)
    for name, history in histories.items():
        epochs = [record["epoch"] for record in history]
        loss_axes.plot(epochs, [record["loss"] for record in history], marker="o", label=name)
        val = [(record["epoch"], record.get("val_top1", record.get("val_map"))) for record in history
               if "val_top1" in record or "val_map" in record]
        if val:
            val_axes.plot(*zip(*val), marker="o", label=name)
    loss_axes.set_xlabel("epoch")
    loss_axes.set_ylabel("training loss")
    val_axes.set_xlabel("epoch")
    val_axes.set_ylabel("validation top-1 (mAP)" if any("val_map" in r for h in histories.values() for r in h)
                        else "validation top-1")
    from matplotlib.ticker import MaxNLocator

    for axes in (loss_axes, val_axes):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    figure.suptitle(title)
    return _png(figure)


def reliability_figure(logits: torch.Tensor, labels: torch.Tensor, title: str, bins: int = 15) -> str:
    """Accuracy against confidence per bin (15 equal-width bins, as the ECE in metrics.json), with the ECE."""
    probs = logits.float().softmax(dim=1)
    ece = expected_calibration_error(probs, labels, bins)
    width = 1.0 / bins
    figure, axes = new_figure(figsize=(4.6, 4.6))
    rows = calibration_bins(probs, labels, bins)
    lowers = [float(row[0]) for row in rows]
    axes.bar(lowers, [float(row[3]) for row in rows], width=width, align="edge", edgecolor="black", label="accuracy")
    axes.bar(lowers, [float(row[2] - row[3]) for row in rows], bottom=[float(row[3]) for row in rows], width=width,
             align="edge", facecolor="none", edgecolor="tab:red", hatch="//", label="gap to mean confidence")
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1)
    axes.set_xlabel("confidence (top-1 probability)")
    axes.set_ylabel("accuracy")
    axes.set_title(f"{title}\nECE {ece:.3f} ({bins} bins)")
    axes.legend(loc="upper left", fontsize=8)
    return _png(figure)


# ----- pages -----
def _run_summary(run_dir: str | Path) -> Dict:
    """What a report needs from a finished finetune/zeroshot run folder."""
    run = RunFolder(run_dir)
    if not run.is_finished():
        raise CliptuneError(f"{run.root} is not a finished run (no metrics.json)")
    metrics = read_json(run.metrics)
    split = metrics.get("split", "test")
    if split not in metrics or "method" not in metrics:
        raise CliptuneError(f"{run.root} is not a finetune or zeroshot run (its metrics.json has no '{split}' results)")
    config = run.config.read_text() if run.config.is_file() else ""
    from cliptune.config.run import load_config

    shots = load_config(run.config).shots if run.config.is_file() else None
    return {"root": run.root, "name": run.root.name or str(run.root), "metrics": metrics, "split": split,
            "result": metrics[split], "config": config, "shots": shots}


def _percent(value: Optional[float]) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _row(cells: Sequence[str], header: bool = False) -> str:
    """One table row; number cells ("12.5%", "0.0412", "1,024", "–") are right-aligned."""
    if header:
        return "<tr>" + "".join(f"<th>{cell}</th>" for cell in cells) + "</tr>"
    return "<tr>" + "".join(f"<td class=num>{cell}</td>" if NUMBER.fullmatch(cell) else f"<td>{cell}</td>" for cell in cells) + "</tr>"


def _table(header: Optional[Sequence[str]], rows: Sequence[Sequence[str]]) -> str:
    return "<table>" + (_row(header, header=True) if header else "") + "".join(_row(row) for row in rows) + "</table>"


def _page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<link rel="icon" href="data:,"><style>{STYLE}</style></head>\n<body>\n{body}\n</body></html>\n')


def _headline(summary: Dict) -> List[Tuple[str, str]]:
    m, result = summary["metrics"], summary["result"]
    rows = [("method", html.escape(m["method"])), ("model", html.escape(f"{m.get('model')} ({m.get('pretrained')})")),
            (f"{summary['split']} top-1", _percent(result["top1"])), (f"{summary['split']} top-5", _percent(result["top5"])),
            ("ECE", f"{result['ece']:.4f}"), ("NLL", f"{result['nll']:.4f}"), ("images", str(result["n"])),
            ("classes", str(len(m["classes"])))]
    for key, label in (("balanced_accuracy", "balanced accuracy"), ("macro_f1", "macro-F1"), ("auroc", "AUROC (one-vs-rest)")):
        if result.get(key) is not None:  # runs before these metrics existed, or a split where one is undefined
            rows.insert(4, (f"{summary['split']} {label}", _percent(result[key])))
    if "zeroshot" in m:
        rows.append(("zero-shot top-1", _percent(m["zeroshot"]["top1"])))
    if "hm" in m:
        rows += [("base top-1", _percent(m["base"]["top1"])), ("novel top-1", _percent(m["novel"]["top1"])),
                 ("harmonic mean", _percent(m["hm"])), ("zero-shot harmonic mean", _percent(m["zeroshot_hm"]))]
    train = m.get("train")
    if train:
        rows += [("shots", str(summary["shots"] or "all")), ("training seconds", f"{train['seconds']:.1f}"),
                 ("epochs (best)", f"{train['epochs']} ({train.get('best_epoch')})"),
                 ("trainable parameters", f"{train['trainable_params']:,}"), ("training images", str(train["n"]))]
    return rows


def _multilabel_headline(summary: Dict) -> List[Tuple[str, str]]:
    m, result, split = summary["metrics"], summary["result"], summary["split"]
    rows = [("method", html.escape(m["method"])), ("model", html.escape(f"{m.get('model')} ({m.get('pretrained')})")),
            (f"{split} mAP", _percent(result["map"])), (f"{split} macro-F1", _percent(result["macro_f1"])),
            (f"{split} micro-F1", _percent(result["micro_f1"])), (f"{split} AUROC", _percent(result["auroc"])),
            ("thresholds fitted on", html.escape(result["thresholds_from"])), ("images", str(result["n"])),
            ("classes", str(len(m["classes"])))]
    if "zeroshot" in m:
        rows.append(("zero-shot mAP", _percent(m["zeroshot"]["map"])))
    train = m.get("train")
    if train:
        rows += [("shots", str(summary["shots"] or "all")), ("training seconds", f"{train['seconds']:.1f}"),
                 ("epochs (best)", f"{train['epochs']} ({train.get('best_epoch')})"), ("training images", str(train["n"]))]
    return rows


def _multilabel_body(summary: Dict) -> List[str]:
    """Per-class AP and AUROC (against zero-shot) and training curves of a multi-label run."""
    m, split, result = summary["metrics"], summary["split"], summary["result"]
    series = {"zero-shot": m["zeroshot"]["per_class_ap"]} if "zeroshot" in m else {}
    series[m["method"]] = result["per_class_ap"]
    parts = ["<h2>Per-class average precision</h2>",
             per_class_figure(series, m["classes"], f"per-class {split} AP", measure="average precision"),
             "<details><summary>table</summary>" + _table(
                 ("class", *series, "AUROC", "threshold"),
                 [(html.escape(c), *(_percent(s.get(c)) for s in series.values()), _percent(result["per_class_auroc"].get(c)),
                   f"{result['thresholds'][c]:.4f}") for c in m["classes"]]) + "</details>"]
    curves = curves_figure({m["method"]: m.get("train", {}).get("history", [])}, "training")
    return parts + (["<h2>Training curves</h2>", curves] if curves else [])


def run_report_html(run_dir: str | Path) -> str:
    """The single-run report page."""
    summary = _run_summary(run_dir)
    m, split, result = summary["metrics"], summary["split"], summary["result"]
    method, classes = m["method"], m["classes"]
    multi_label = "map" in result
    parts = [f"<h1>cliptune run {html.escape(summary['name'])}</h1>",
             f"<p class=note>{html.escape(str(Path(summary['root']).resolve()))}</p>",
             _table(None, (_multilabel_headline if multi_label else _headline)(summary))]
    guard = (m.get("guard") or {}).get("message")
    if guard:
        parts.append(f"<p class=warning>{html.escape(guard)}</p>")
    if multi_label:
        parts += [*_multilabel_body(summary), "<h2>Resolved config</h2>", f"<pre>{html.escape(summary['config'])}</pre>"]
        return _page(f"cliptune run {summary['name']}", "\n".join(parts))
    predictions = load_predictions(run_dir, split)
    figures = []
    if predictions is not None:
        logits, labels = predictions
        figures.append(confusion_figure(logits, labels, classes, f"{method}: confusion matrix ({split})"))
        figures.append(reliability_figure(logits, labels, f"{method}: reliability ({split})"))
    parts.append("<h2>Confusion matrix and calibration</h2>")
    parts.append(f"<div class=figures>{''.join(figures)}</div>" if figures else
                 "<p class=note>no stored predictions, and the run's data is not available to recompute them</p>")
    series = {"zero-shot": m["zeroshot"]["per_class"]} if "zeroshot" in m else {}
    series[method] = result["per_class"]
    parts.append("<h2>Per-class accuracy</h2>")
    parts.append(per_class_figure(series, classes, f"per-class {split} top-1"))
    precision, recall = result.get("per_class_precision", {}), result.get("per_class_recall", {})
    columns = (*series, *(("precision", "recall") if precision else ()))
    parts.append("<details><summary>table</summary>" + _table(
        ("class", *columns), [(html.escape(c), *(_percent(s.get(c)) for s in series.values()),
                               *((_percent(precision.get(c)), _percent(recall.get(c))) if precision else ()))
                              for c in classes]) + "</details>")
    curves = curves_figure({method: m.get("train", {}).get("history", [])}, "training")
    if curves:
        parts += ["<h2>Training curves</h2>", curves]
    parts += ["<h2>Resolved config</h2>", f"<pre>{html.escape(summary['config'])}</pre>"]
    return _page(f"cliptune run {summary['name']}", "\n".join(parts))


def write_run_report(run_dir: str | Path) -> Path:
    """Write RUN/report.html."""
    path = Path(run_dir) / REPORT
    atomic_write_text(path, run_report_html(run_dir))
    return path


def comparison_html(run_dirs: Sequence[str | Path]) -> str:
    """Runs side by side: one table of headline numbers, then per-class accuracy, curves and calibration together."""
    summaries = [_run_summary(run) for run in run_dirs]
    multi_label = [s["name"] for s in summaries if "map" in s["result"]]
    if multi_label:
        raise CliptuneError(f"{multi_label[0]} is a multi-label run: the side-by-side report compares single-label runs for "
                            "now; open each run's report.html")
    labels = _unique_labels(summaries)
    rows = []
    for label, s in zip(labels, summaries):
        m, result = s["metrics"], s["result"]
        train = m.get("train") or {}
        rows.append((html.escape(label), html.escape(m["method"]), str(s["shots"] or "all"), _percent(result["top1"]),
                     _percent(m.get("zeroshot", result if m["method"] == "zeroshot" else {}).get("top1")), _percent(m.get("base", {}).get("top1")),
                     _percent(m.get("novel", {}).get("top1")), _percent(m.get("hm")), f"{result['ece']:.4f}",
                     f"{train['seconds']:.1f}" if "seconds" in train else "–"))
    parts = ["<h1>cliptune runs compared</h1>",
             _table(("run", "method", "shots", "top-1", "zero-shot top-1", "base", "novel", "HM", "ECE", "train s"), rows),
             "<p class=note>" + "<br>".join(html.escape(f"{label}: {Path(s['root']).resolve()}") for label, s in zip(labels, summaries)) + "</p>"]
    same_classes = all(s["metrics"]["classes"] == summaries[0]["metrics"]["classes"] for s in summaries)
    if same_classes:
        series = {}
        first = summaries[0]["metrics"]
        if "zeroshot" in first:
            series[f"zero-shot ({labels[0]})"] = first["zeroshot"]["per_class"]
        series.update({label: s["result"]["per_class"] for label, s in zip(labels, summaries)})
        parts += ["<h2>Per-class accuracy</h2>", per_class_figure(series, first["classes"], "per-class top-1")]
    curves = curves_figure({label: (s["metrics"].get("train") or {}).get("history", []) for label, s in zip(labels, summaries)},
                           "training")
    if curves:
        parts += ["<h2>Training curves</h2>", curves]
    figures = []
    for label, s in zip(labels, summaries):
        predictions = load_predictions(s["root"], s["split"])
        if predictions is not None:
            figures.append(reliability_figure(*predictions, label))
    if figures:
        parts += ["<h2>Calibration</h2>", f"<div class=figures>{''.join(figures)}</div>"]
    parts.append("<h2>Resolved configs</h2>")
    parts += [f"<details><summary>{html.escape(label)}</summary><pre>{html.escape(s['config'])}</pre></details>"
              for label, s in zip(labels, summaries)]
    return _page("cliptune runs compared", "\n".join(parts))


def _unique_labels(summaries: Sequence[Dict]) -> List[str]:
    """Run folder names, with the parent folder added where two runs share a name."""
    names = [s["name"] for s in summaries]
    return [f"{Path(s['root']).resolve().parent.name}/{s['name']}" if names.count(s["name"]) > 1 else s["name"] for s in summaries]


def write_comparison(run_dirs: Sequence[str | Path], output: str | Path) -> Path:
    output = Path(output)
    if output.suffix.lower() not in (".html", ".htm"):
        raise CliptuneError(f"--output must be an .html file, got {output}")
    text = comparison_html(run_dirs)
    atomic_write_text(output, text)
    return output
