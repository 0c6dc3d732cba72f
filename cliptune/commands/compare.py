"""`cliptune compare`: every (method, shots, seed) cell of a grid as its own run, summarised in one table.

Each cell is an ordinary `finetune` run in OUT/cells/<method>-<K>shot-seed<S>/ whose config is built
with the same layers as `cliptune finetune` (engine < method defaults < recipe < CLI flags < --set); the
grid only sets method, shots and seed, so every method trains with its own defaults unless a shared
flag says otherwise. All cells share the image-feature cache (`cache_dir: run`: OUT/cache). Running the same command
again skips finished cells, resumes interrupted ones and retries failed ones, so a long grid can be
stopped and continued; a folder finished with other settings is refused rather than mixed in.
"""

from __future__ import annotations

import logging
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from cliptune.commands import api
from cliptune.config.run import RunConfig, build_config, load_config, parse_set
from cliptune.core.errors import CliptuneError
from cliptune.core.metrics import score
from cliptune.core.figures import new_figure, save_figure
from cliptune.methods import METHODS
from cliptune.core.progress import progress_bar
from cliptune.core.runfolder import RunFolder, atomic_write_json, atomic_write_text, read_json
from cliptune.training.session import Session, make_accelerator, report_summary, tracking

log = logging.getLogger("cliptune")
GRID_KEYS = ("method", "shots", "seed")


@dataclass
class Cell:
    """One (method, shots, seed) run of the grid; `config` is None when its options fail for this method."""

    method: str
    shots: int
    seed: int
    config: Optional[RunConfig]
    error: Optional[str] = None

    @property
    def name(self) -> str:
        return f"{self.method}-{self.shots}shot-seed{self.seed}"


def parse_names(text: str, option: str) -> List[str]:
    """A comma list such as `linear-probe,coop` (for the CLI)."""
    names = [part.strip() for part in text.split(",")]
    if not text.strip() or any(not name for name in names):
        raise CliptuneError(f"{option} expects a comma list without empty entries, got {text!r}")
    return names


def parse_positive_ints(text: str, option: str) -> List[int]:
    """A comma list of positive integers such as `1,4,16` (for the CLI)."""
    values = []
    for part in parse_names(text, option):
        try:
            values.append(int(part))
        except ValueError:
            raise CliptuneError(f"{option} expects positive integers, got {part!r}") from None
    return values


def _one_line(exc: Exception) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return first if isinstance(exc, CliptuneError) else f"{type(exc).__name__}: {first}"


def _check_grid(methods: Sequence[str], shots: Sequence[int], seeds: Sequence[int], steps: Optional[int]) -> None:
    for option, values in (("--methods", methods), ("--shots", shots), ("--seeds", seeds)):
        if not values:
            raise CliptuneError(f"{option} needs at least one value")
        repeated = sorted({str(v) for v in values if list(values).count(v) > 1})
        if repeated:
            raise CliptuneError(f"{option} lists {', '.join(repeated)} more than once")
    unknown = [name for name in methods if name not in METHODS]
    if unknown:
        raise CliptuneError(f"unknown method '{unknown[0]}' in --methods (available: {', '.join(sorted(METHODS))})")
    for option, values in (("--shots", shots), ("--seeds", seeds), ("--steps", [] if steps is None else [steps])):
        for value in values:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CliptuneError(f"{option} must be positive integers, got {value!r}")


def _build_cells(methods, shots, seeds, recipe, shared: Dict, set_values: List[str], tuned: Optional[Dict] = None) -> List[Cell]:
    """Every cell's config (with its (method, shots) pair's `tuned` settings); a cell whose options fail for its
    method is kept with the error."""
    cells = []
    for method in methods:
        for k in shots:
            extra = (tuned or {}).get((method, k), {}).get("set", [])
            for seed in seeds:
                try:
                    config = build_config(recipe, {**shared, "method": method, "shots": k, "seed": seed}, set_values + extra)
                    cells.append(Cell(method, k, seed, config))
                except CliptuneError as exc:
                    cells.append(Cell(method, k, seed, None, _one_line(exc)))
    return cells


def _differing_key(saved: RunConfig, wanted: RunConfig) -> Optional[str]:
    a, b = saved.to_dict(), wanted.to_dict()
    return next((key for key in sorted(a.keys() | b.keys()) if a.get(key) != b.get(key)), None)


def _saved_config(run: RunFolder) -> Optional[RunConfig]:
    try:
        return load_config(run.config)
    except CliptuneError:
        return None


def _check_folder(root: Path) -> None:
    """OUT is new, empty or an earlier compare folder."""
    if root.exists() and not root.is_dir():
        raise CliptuneError(f"--out {root} exists and is not a folder")
    marks = ("cells", "compare.json", "sweeps")
    if root.is_dir() and any(root.iterdir()) and not any((root / mark).exists() for mark in marks):
        raise CliptuneError(f"--out {root} is not empty and is not a cliptune compare folder; choose another folder")


def _check_before_work(first: RunConfig, root: Path) -> None:
    """What fails for every cell, in one line before any work: no data, a tracker that is not installed, a compare
    folder holding something else, unreadable data or model."""
    if not first.data:
        raise CliptuneError("no data given: pass --data DIR (an ImageFolder root) or --data FILE (a manifest)")
    if not Path(first.data).exists():
        raise CliptuneError(f"--data {first.data}: no such folder or file")
    _check_folder(root)
    tracking(first.report_to, root)
    if Session.open(first, make_accelerator(first.mixed_precision)).data.multi_label:
        raise CliptuneError(f"{first.data} is multi-label: compare tabulates single-label results for now; run "
                            "`cliptune finetune` per method (its metrics.json holds mAP and F1) or `cliptune sweep`")


def _check_cells(root: Path, cells: List[Cell]) -> None:
    """An earlier compare folder's finished cells used the same settings."""
    for cell in cells:
        run = RunFolder(root / "cells" / cell.name)
        if cell.config is None or not run.is_finished():
            continue
        saved = load_config(run.config)
        key = _differing_key(saved, cell.config)
        if key is not None:
            raise CliptuneError(
                f"{run.root} finished with other settings ({key}: {saved.to_dict().get(key)!r}, now "
                f"{cell.config.to_dict().get(key)!r}); choose another --out or delete that cell folder"
            )


def tune(root: Path, methods, shots, seed: int, recipe, shared: Dict, set_values: List[str], trials: int) -> Dict:
    """(method, shots) -> the best settings of an N-trial sweep as `--set` assignments (or why it was not tuned)."""
    from cliptune.commands.sweep import Sweep, assignments

    tuned = {}
    for method in methods:
        for k in shots:
            try:
                result = Sweep(root / f"{method}-{k}shot", recipe, {**shared, "method": method, "shots": k, "seed": seed},
                               set_values).run(trials)
                tuned[(method, k)] = {"params": result["best"]["params"], "val": result["best"]["val"],
                                      "set": assignments(result["best"]["params"])}
            except CliptuneError as exc:  # e.g. nothing to search: its defaults stand
                tuned[(method, k)] = {"params": None, "error": _one_line(exc)}
            log.info("sweep %s %d shots: %s", method, k, tuned[(method, k)].get("params") or tuned[(method, k)]["error"])
    return tuned


def _run_cell(cell: Cell, root: Path, cache: Path) -> Dict:
    """Run (or reuse, or resume) one cell; a failure becomes the record's one-line `error`."""
    run = RunFolder(root / "cells" / cell.name)
    record = {"method": cell.method, "shots": cell.shots, "seed": cell.seed, "run": f"cells/{cell.name}"}
    if cell.config is None:
        log.warning("cell %s failed: %s", cell.name, cell.error)
        return {**record, "status": "failed", "error": cell.error}
    reused = run.is_finished()
    try:
        if reused:
            metrics = read_json(run.metrics)
        else:
            saved = _saved_config(run) if run.has_started() else None
            resume = saved is not None and _differing_key(saved, cell.config) is None
            if run.root.exists() and not resume:
                shutil.rmtree(run.root)  # a start that never trained, or other settings: start over cleanly
            metrics = api.finetune(cell.config, run.root, resume=resume, cache_dir=cache)
    except Exception as exc:  # noqa: BLE001 - one failing cell must not stop the grid
        log.warning("cell %s failed: %s", cell.name, _one_line(exc))
        return {**record, "status": "failed", "error": _one_line(exc)}
    log.info("cell %s: test top-1 %.2f%% (zero-shot %.2f%%)%s", cell.name, 100 * metrics["test"]["top1"],
             100 * metrics["zeroshot"]["top1"], "; finished before, skipped" if reused else "")
    metric = cell.config.metric
    return {**record, "status": "finished", "reused": reused, "top1": metrics["test"]["top1"],
            "top5": metrics["test"]["top5"], "zeroshot_top1": metrics["zeroshot"]["top1"],
            "score": score(metrics["test"], metric), "zeroshot_score": score(metrics["zeroshot"], metric),
            "train_seconds": metrics["train"]["seconds"], "guard": (metrics.get("guard") or {}).get("message")}


def _mean_std(values: List[float]) -> tuple:
    """Mean and population standard deviation (as Dassl's parse_test_res.py reports seeds); None if empty."""
    if not values:
        return None, None
    return statistics.fmean(values), statistics.pstdev(values)


def summarise(cells: List[Dict], methods: Sequence[str], shots: Sequence[int]) -> Dict:
    """Per-(method, shots) mean/std of test top-1, of the `--metric` score and of train seconds; zero-shot per shots,
    averaged over seeds."""
    finished = [c for c in cells if c["status"] == "finished"]
    summary = []
    for method in methods:
        for k in shots:
            group = [c for c in cells if c["method"] == method and c["shots"] == k]
            done = [c for c in group if c["status"] == "finished"]
            top1_mean, top1_std = _mean_std([c["top1"] for c in done])
            score_mean, score_std = _mean_std([c["score"] for c in done])
            seconds_mean, seconds_std = _mean_std([c["train_seconds"] for c in done])
            summary.append({"method": method, "shots": k, "top1_mean": top1_mean, "top1_std": top1_std,
                            "score_mean": score_mean, "score_std": score_std,
                            "train_seconds_mean": seconds_mean, "train_seconds_std": seconds_std,
                            "finished": len(done), "failed": len(group) - len(done)})
    zeroshot = []
    for k in shots:
        entry: Dict[str, object] = {"shots": k}
        for key in ("top1", "score"):
            per_seed: Dict[int, List[float]] = {}
            for c in finished:
                if c["shots"] == k:
                    per_seed.setdefault(c["seed"], []).append(c[f"zeroshot_{key}"])
            entry[f"{key}_mean"], entry[f"{key}_std"] = _mean_std([statistics.fmean(v) for v in per_seed.values()])
        zeroshot.append({**entry, "seeds": len(per_seed)})
    return {"summary": summary, "zeroshot": zeroshot}


def _metric_label(metric: str) -> str:
    return {"top1": "top-1", "balanced_accuracy": "balanced accuracy", "macro_f1": "macro-F1", "auroc": "AUROC", "map": "mAP",
            "micro_f1": "micro-F1"}[metric]


def _shots_label(k: int) -> str:
    return f"{k} shot" if k == 1 else f"{k} shots"


def _table(header: List[str], rows: List[List[str]]) -> List[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def render_markdown(result: Dict) -> str:
    """compare.md: the test `--metric` (zero-shot row first, best per column in bold), train seconds, failures."""
    shots, seeds = result["shots"], result["seeds"]
    entries = {("zero-shot", z["shots"]): z for z in result["zeroshot"]}
    entries.update({(s["method"], s["shots"]): s for s in result["summary"]})
    names = ["zero-shot"] + list(result["methods"])
    shown = {key: round(100 * e["score_mean"], 1) for key, e in entries.items() if e["score_mean"] is not None}
    best = {k: max((v for (name, kk), v in shown.items() if kk == k), default=None) for k in shots}

    def accuracy(name: str, k: int) -> str:
        entry = entries[(name, k)]
        if entry["score_mean"] is None:
            return "failed"
        text = f"{shown[(name, k)]:.1f} ± {100 * entry['score_std']:.1f}"
        if name != "zero-shot" and entry["finished"] < len(seeds):
            text += f" ({entry['finished']}/{len(seeds)} seeds)"
        return f"**{text}**" if shown[(name, k)] == best[k] else text

    def seconds(name: str, k: int) -> str:
        entry = entries[(name, k)]
        return "failed" if entry["train_seconds_mean"] is None else f"{entry['train_seconds_mean']:.2f}"

    header = ["method"] + [_shots_label(k) for k in shots]
    over = f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"
    lines = [f"Test {_metric_label(result['metric'])} (%) on {result['data']}: mean ± std over {over} (population std); "
             "best per column in bold.", ""]
    lines += _table(header, [[name] + [accuracy(name, k) for k in shots] for name in names])
    lines += ["", "Training seconds per cell (mean over seeds).", ""]
    lines += _table(header, [[name] + [seconds(name, k) for k in shots] for name in result["methods"]])
    sweeps = result.get("sweeps") or {}
    if sweeps:
        lines += ["", "Settings from a sweep per (method, shots) on val (`OUT/sweeps/`):", ""]
        lines += [f"- {name}: " + (", ".join(f"`{k}={v}`" for k, v in record["params"].items()) if record["params"]
                                    else f"defaults ({record['error']})") for name, record in sweeps.items()]
    below = [c for c in result["cells"] if c.get("guard")]
    if below:
        lines += ["", "Cells below zero-shot on val:", ""] + [f"- `{c['run']}`: {c['guard']}" for c in below]
    failed = [c for c in result["cells"] if c["status"] == "failed"]
    if failed:
        lines += ["", "Failed cells:", ""] + [f"- `{c['run']}`: {c['error']}" for c in failed]
    return "\n".join(lines) + "\n"


def plot(result: Dict, path: Path) -> None:
    """compare.png: the test `--metric` against shots, one line per method (std as error bars), zero-shot dashed."""
    from matplotlib.ticker import NullLocator

    figure, axes = new_figure(figsize=(6, 4))
    lines = [("zero-shot", result["zeroshot"], {"color": "grey", "linestyle": "--"})]
    lines += [(m, [s for s in result["summary"] if s["method"] == m], {}) for m in result["methods"]]
    for label, entries, style in lines:
        done = [e for e in entries if e["score_mean"] is not None]
        if done:
            axes.errorbar([e["shots"] for e in done], [100 * e["score_mean"] for e in done],
                          yerr=[100 * e["score_std"] for e in done], marker="o", capsize=3, label=label, **style)
    shots = result["shots"]
    if len(shots) > 1:
        axes.set_xscale("log", base=2)
    axes.set_xticks(shots, [str(k) for k in shots])
    axes.xaxis.set_minor_locator(NullLocator())
    axes.set_xlabel("shots per class")
    axes.set_ylabel(f"test {_metric_label(result['metric'])} (%)")
    axes.set_title(f"{Path(result['data']).name}: mean ± std over {len(result['seeds'])} seed(s)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    save_figure(figure, path, dpi=120)


def compare(
    out: str | Path,
    methods: Sequence[str],
    shots: Sequence[int],
    seeds: Sequence[int] = (1,),
    *,
    data: Optional[str | Path] = None,
    steps: Optional[int] = None,
    recipe: Optional[str] = None,
    options: Optional[Dict] = None,
    set_values: Sequence[str] = (),
    sweep: int = 0,
) -> Dict:
    """Run the grid (skipping finished cells) and write OUT/compare.json, compare.md and compare.png.

    `options` are CLI-layer config values shared by every cell (model, epochs, lr, ...); `set_values`
    are `--set key=value` overrides. `sweep` N > 0 first tunes every (method, shots) pair with an N-trial
    `cliptune sweep` on val (OUT/sweeps/, first seed) and runs its cells with the best settings, so the
    table compares tuned methods. Returns compare.json's content.
    """
    methods, shots, seeds, set_values = list(methods), list(shots), list(seeds), list(set_values)
    _check_grid(methods, shots, seeds, steps)
    shared = {key: value for key, value in (options or {}).items() if value is not None}
    if data is not None:
        shared["data"] = str(data)
    if steps is not None:
        shared["steps"] = steps
    overridden = sorted(set(GRID_KEYS) & (shared.keys() | parse_set(set_values).keys()))
    if overridden:
        raise CliptuneError(f"the grid sets {', '.join(overridden)}; use --methods, --shots and --seeds instead")
    cells = _build_cells(methods, shots, seeds, recipe, shared, set_values)
    configs = [cell.config for cell in cells if cell.config is not None]
    if not configs:
        raise CliptuneError(cells[0].error)  # the shared options fail for every method
    first, root = configs[0], Path(out)
    _check_before_work(first, root)
    tuned = {}
    if sweep:
        root.mkdir(parents=True, exist_ok=True)
        tuned = tune(root / "sweeps", methods, shots, seeds[0], recipe, shared, set_values, sweep)
        cells = _build_cells(methods, shots, seeds, recipe, shared, set_values, tuned)
    _check_cells(root, cells)

    root.mkdir(parents=True, exist_ok=True)
    records = [_run_cell(cell, root, root / "cache") for cell in progress_bar(cells, desc="compare", unit="cell")]
    result = {"data": first.data, "metric": first.metric, "methods": methods, "shots": shots, "seeds": seeds, "steps": steps,
              "recipe": recipe, "options": shared, "set": set_values, "cells": records,
              "sweeps": {f"{method}-{k}shot": record for (method, k), record in tuned.items()},
              **summarise(records, methods, shots)}
    atomic_write_json(root / "compare.json", result)
    atomic_write_text(root / "compare.md", render_markdown(result))
    plot(result, root / "compare.png")
    report_summary(first, root, "compare", summary_scalars(result))
    return result


def summary_scalars(result: Dict) -> Dict[int, Dict[str, float]]:
    """compare's table for a tracker, by shots: each method's mean test top-1 (`top1/METHOD`) and zero-shot's."""
    records: Dict[int, Dict[str, float]] = {k: {} for k in result["shots"]}
    for row in result["summary"]:
        if row["top1_mean"] is not None:
            records[row["shots"]][f"top1/{row['method']}"] = row["top1_mean"]
    for row in result["zeroshot"]:
        if row["top1_mean"] is not None:
            records[row["shots"]]["top1/zero-shot"] = row["top1_mean"]
    return records
