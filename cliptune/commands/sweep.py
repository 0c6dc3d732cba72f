"""`cliptune sweep`: search a method's settings for this data with Optuna, scored on val only.

A TPE sampler proposes settings from the method's `search_space()` (or a `--space` YAML); every trial is an
ordinary run folder under `OUT/trials/`, trained in this process on one open session (the model and data
are loaded once, image features are encoded once into the shared feature cache, no per-epoch checkpoints), and reports its
val `--metric` (top-1 by default) after epochs 1, 2, 4, 8, ... to a median pruner. The study lives in
`OUT/sweep.db` (SQLite), so an interrupted sweep resumes without re-running finished trials. At the end the best
trial (on val) is evaluated on test once, and `sweep.json`, `sweep.md`,
`sweep.png` and `best.yaml` (a recipe that reproduces the best trial) are written.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

from cliptune.commands.api import evaluate_run, finetune, zeroshot_guard
from cliptune.config.run import CONFIG_KEYS, RunConfig, absolute_paths, build_config, check_config
from cliptune.core.errors import CliptuneError
from cliptune.core.figures import save_figure
from cliptune.core.progress import RESULT
from cliptune.core.runfolder import atomic_write_json, atomic_write_text
from cliptune.methods import method_class
from cliptune.core.metrics import headline, score
from cliptune.training.engine import doubling
from cliptune.training.session import Session, make_accelerator, report_summary, tracking

log = logging.getLogger("cliptune")
KINDS = ("log", "float", "int", "choice")
# keys a trial may not change: they decide the data and the model the one open session holds
FIXED_KEYS = ("model", "pretrained", "model_config", "data", "val_fraction", "test_fraction", "shots", "classnames",
              "templates", "strict", "seed", "val_shots", "base_novel", "method", "mixed_precision")
STUDY = "sweep"


def read_space(path: str | Path) -> Dict[str, tuple]:
    """A `--space` YAML: `key: {log: [low, high]}` (or float/int with [low, high], or `choice: [values]`)."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise CliptuneError(f"--space {path}: {exc}".splitlines()[0]) from None
    if not isinstance(raw, dict):
        raise CliptuneError(f"--space {path}: expected a mapping of key -> {{log|float|int|choice: ...}}")
    space: Dict[str, tuple] = {}
    for key, spec in raw.items():
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
            raise CliptuneError(f"--space {path}: '{key}' must be one of {{log|float|int|choice: ...}}, got {spec!r}")
        kind, values = next(iter(spec.items()))
        if kind == "choice":
            if not isinstance(values, list) or not values:
                raise CliptuneError(f"--space {path}: '{key}' choice needs a non-empty list")
            space[key] = ("choice", values)
        else:
            if not isinstance(values, list) or len(values) != 2 or not values[0] < values[1] or (kind == "log" and values[0] <= 0):
                raise CliptuneError(f"--space {path}: '{key}' {kind} needs [low, high] with low < high" + (" and low > 0" if kind == "log" else ""))
            space[key] = (kind, values[0], values[1])
    return space


def check_space(space: Dict[str, tuple], method: str) -> None:
    """Every key a run key or an option of the swept method; none that would change the data or the model."""
    options = [f"{method}.{spec.name}" for spec in dataclasses.fields(method_class(method).config_class)]
    for key in space:
        if key in FIXED_KEYS:
            raise CliptuneError(f"the sweep cannot search '{key}': it changes the data or the model every trial shares")
        if key not in CONFIG_KEYS and key not in options:
            raise CliptuneError(f"unknown search key '{key}' (valid: run keys such as lr, epochs, steps, weight_decay, "
                                f"or {', '.join(options) or 'no options of ' + method})")


def method_space(method: str, shots: Optional[int], steps: Optional[int]) -> Dict[str, tuple]:
    """The method's own search space; with a --steps budget the budget is yours, not searched."""
    space = dict(method_class(method).search_space(shots))
    if steps:
        space.pop("steps", None)
        space.pop("epochs", None)
    return space


def _suggest(trial, key: str, spec: tuple):
    kind = spec[0]
    if kind == "choice":
        return trial.suggest_categorical(key, spec[1])
    if kind == "int":
        return trial.suggest_int(key, int(spec[1]), int(spec[2]), log=spec[2] / max(spec[1], 1) >= 16)
    return trial.suggest_float(key, float(spec[1]), float(spec[2]), log=kind == "log")


def assignments(params: Dict[str, Any]) -> List[str]:
    return [f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
            for key, value in params.items()]


class Sweep:
    """One study over one open session: `run(trials, timeout)` adds trials until `trials` have finished."""

    def __init__(self, out: str | Path, recipe: Optional[str], cli_values: Dict[str, Any], set_values: List[str],
                 method_values: Optional[Dict[str, Any]] = None, space: Optional[Dict[str, tuple]] = None):
        import optuna

        self.root = Path(out)
        self.recipe, self.cli_values, self.set_values, self.method_values = recipe, cli_values, list(set_values), method_values
        self.base = build_config(recipe, cli_values, self.set_values, method_values)
        check_config(self.base)
        self.space = space if space is not None else method_space(self.base.method, self.base.shots, self.base.steps)
        check_space(self.space, self.base.method)
        if not self.space:
            raise CliptuneError(f"method '{self.base.method}' has nothing to search by default (it fits its own settings on val); "
                                "give --space FILE")
        tracking(self.base.report_to, self.root)  # a tracker that is not installed: one line before any work
        accelerator = make_accelerator(self.base.mixed_precision)
        self.session = Session.open(self.base, accelerator)  # bad data or model fail here, before OUT is touched
        if not len(self.session.data.splits["val"]):
            raise CliptuneError("a sweep scores trials on the validation split, and this data has none (set val_fraction)")
        self.root.mkdir(parents=True, exist_ok=True)
        self.session.use_feature_cache(self.root / "cache")  # decoded images here, features in the shared cache
        self.study = optuna.create_study(
            study_name=STUDY, storage=f"sqlite:///{(self.root / 'sweep.db').resolve()}", load_if_exists=True,
            direction="maximize", sampler=optuna.samplers.TPESampler(seed=self.base.seed),
            pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1))

    def trial_config(self, params: Dict[str, Any]) -> RunConfig:
        return build_config(self.recipe, self.cli_values, self.set_values + assignments(params), self.method_values)

    def done(self) -> list:
        from optuna.trial import TrialState

        return [t for t in self.study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]

    def objective(self, trial) -> float:
        import optuna

        params = {key: _suggest(trial, key, spec) for key, spec in self.space.items()}
        folder = self.root / "trials" / f"{trial.number:03d}"
        if folder.exists():
            shutil.rmtree(folder)  # left by an interrupted sweep: its trial never finished
        trial.set_user_attr("run", str(folder.relative_to(self.root)))

        metric = self.base.metric

        def report(epoch: int, value: float) -> None:
            if not doubling(epoch):  # each report is a database write: epochs 1, 2, 4, 8, ... are enough to prune on
                return
            trial.report(value, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"val {metric} {value:.4f} at epoch {epoch} below the median of earlier trials")

        began = time.perf_counter()
        try:
            metrics = finetune(self.trial_config(params), folder, cache_dir=self.session.cache_dir, session=self.session,
                               test=False, on_validated=report, trial=True)
        finally:  # pruned trials too: sweep.json shows what each trial cost
            trial.set_user_attr("seconds", round(time.perf_counter() - began, 3))
        log.info("trial %d: val %s %.4f with %s", trial.number, metric, score(metrics["val"], metric), params, extra=RESULT)
        return score(metrics["val"], metric)

    def run(self, trials: int, timeout: Optional[float] = None) -> Dict:
        remaining = trials - len(self.done())
        if remaining > 0:
            self.study.optimize(self.objective, n_trials=remaining, timeout=timeout, catch=(CliptuneError,))
        return self.finish()

    def finish(self) -> Dict:
        from optuna.trial import TrialState

        complete = [t for t in self.study.trials if t.state == TrialState.COMPLETE]
        if not complete:
            raise CliptuneError("no trial finished: nothing to report (see the trials' log.txt under OUT/trials/)")
        best = max(complete, key=lambda t: (t.value, -t.number))
        best_run = self.root / best.user_attrs["run"]
        best_test = evaluate_run(best_run, split="test", session=self.session)["test"]
        zeroshot = {split: self.session.zeroshot_metrics(split) for split in ("val", "test")}
        result = {
            "method": self.base.method, "shots": self.base.shots, "steps": self.base.steps, "metric": self.base.metric,
            "space": {key: list(spec) for key, spec in self.space.items()},
            "trials": [{"number": t.number, "state": t.state.name.lower(), "params": t.params, "val": t.value,
                        "seconds": t.user_attrs.get("seconds"), "run": t.user_attrs.get("run")} for t in self.study.trials],
            "best": {"number": best.number, "params": best.params, "val": best.value, "run": best.user_attrs["run"],
                     "test": best_test},
            "zeroshot": zeroshot,
        }
        metric = self.base.metric
        guard = zeroshot_guard(f"{self.base.method} (best of the sweep)", {metric: best.value}, zeroshot["val"], metric=metric)
        result["guard"] = guard
        self._write(result, self.trial_config(best.params))
        report_summary(self.base, self.root, "sweep", trial_scalars(complete, best_test))
        return result

    def _write(self, result: Dict, best_config: RunConfig) -> None:
        atomic_write_json(self.root / "sweep.json", result)
        atomic_write_text(self.root / "sweep.md", render_markdown(result))
        save_figure(plot(self.study, result["metric"]), self.root / "sweep.png")
        write_recipe(best_config, self.root / "best.yaml", result["best"])


def trial_scalars(complete: list, best_test: Dict) -> Dict[int, Dict[str, float]]:
    """A sweep's finished trials for a tracker, by trial number: its val score and the best so far; the best trial's
    test top-1 with the last."""
    records, best = {}, float("-inf")
    for trial in sorted(complete, key=lambda t: t.number):
        best = max(best, trial.value)
        records[trial.number] = {"sweep/val": trial.value, "sweep/best_val": best}
    name, value = headline(best_test)
    records[max(records)][f"sweep/best_test_{name}"] = value
    return records


def write_recipe(config: RunConfig, path: Path, best: Dict) -> None:
    """The best trial's resolved config as a recipe (paths made absolute, so it works from any folder)."""
    values = absolute_paths(config.to_dict(), Path.cwd())
    header = (f"# cliptune sweep: the best trial ({best['run']}, val {config.metric} {best['val']:.4f}) as a recipe.\n"
              f"# cliptune finetune --recipe {path} --out RUN reproduces it.\n")
    atomic_write_text(path, header + yaml.safe_dump({"name": "sweep-best", **values}, sort_keys=False))


def render_markdown(result: Dict) -> str:
    best, zeroshot, metric = result["best"], result["zeroshot"], result["metric"]
    lines = [f"# cliptune sweep: {result['method']}" + (f", {result['shots']} shots" if result["shots"] else ""), "",
             f"Best trial {best['number']} (`{best['run']}`): val {metric} {best['val']:.4f}, test {metric} "
             f"{score(best['test'], metric):.4f} (zero-shot: val {score(zeroshot['val'], metric):.4f}, test "
             f"{score(zeroshot['test'], metric):.4f}).", "",
             "Best settings: " + ", ".join(f"`{k}={v}`" for k, v in best["params"].items()), ""]
    if result["guard"]["message"]:
        lines += [f"**{result['guard']['message']}**", ""]
    keys = list(result["space"])
    lines += [f"| trial | state | val {metric} | seconds | " + " | ".join(keys) + " |", "|" + "---|" * (4 + len(keys))]
    for t in result["trials"]:
        val = f"{t['val']:.4f}" if t["val"] is not None else "–"
        seconds = f"{t['seconds']:.1f}" if t.get("seconds") is not None else "–"
        lines.append(f"| {t['number']} | {t['state']} | {val} | {seconds} | " + " | ".join(str(t["params"].get(k, "")) for k in keys) + " |")
    return "\n".join(lines) + "\n"


def plot(study, metric: str = "top1"):
    """Optimisation history (each trial's val `metric` and the best so far) and parameter importances."""
    from matplotlib.figure import Figure
    from optuna.trial import TrialState

    figure = Figure(figsize=(10, 4))
    history, importance = figure.subplots(1, 2)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    numbers, values = [t.number for t in complete], [t.value for t in complete]
    history.scatter(numbers, values, label=f"trial val {metric}")
    history.plot(numbers, [max(values[: i + 1]) for i in range(len(values))], color="C1", label="best so far")
    history.set_xlabel("trial")
    history.set_ylabel(f"val {metric}")
    history.set_title("optimisation history")
    history.legend()
    try:
        import optuna

        importances = optuna.importance.get_param_importances(study) if len(complete) > 1 else {}
    except (RuntimeError, ValueError):  # too few distinct trials for the evaluator
        importances = {}
    names = list(importances)
    importance.barh(names, [importances[n] for n in names])
    importance.set_title("parameter importance" if names else "parameter importance (needs 2+ distinct trials)")
    figure.tight_layout()
    return figure
