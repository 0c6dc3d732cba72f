"""Library entry points behind the CLI: `zeroshot`, `finetune`, `evaluate_run`, `environment_info`."""

from __future__ import annotations

import dataclasses
import logging
import math
import platform
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

from cliptune.config.run import RunConfig, check_config, load_config, save_config
from cliptune.data.folders import labels_tensor
from cliptune.training.checkpoints import load_method_state
from cliptune.training.engine import Trainer
from cliptune.training.optim import training_length, with_budget_lr
from cliptune.core.cachedir import feature_cache
from cliptune.core.errors import CliptuneError
from cliptune.methods import METHODS, build_method, method_class
from cliptune.core.metrics import classification_metrics, headline, score
from cliptune.deploy.report import save_predictions, write_run_report
from cliptune.core.progress import RESULT
from cliptune.core.runfolder import RunFolder, atomic_write_json, read_json
from cliptune.training.session import (Session, evaluation_config, finished_run, kept_zeroshot, make_accelerator,
                                       tracked_settings)
from cliptune.core.timing import PhaseClock, command_started, describe

log = logging.getLogger("cliptune")


def _model_fields(config: RunConfig) -> Dict:
    return {"model": config.model or Path(config.model_config or "").stem, "pretrained": config.pretrained}


def _line(name: str, metrics: Dict) -> str:
    auroc = metrics.get("auroc")
    if "map" in metrics:
        return (f"{name}: mAP {metrics['map']:.2%}  macro-F1 {metrics['macro_f1']:.2%}  micro-F1 {metrics['micro_f1']:.2%}  "
                f"AUROC {'-' if auroc is None else f'{auroc:.4f}'}  (n={metrics['n']}; thresholds from {metrics['thresholds_from']})")
    return (f"{name}: top-1 {metrics['top1']:.2%}  top-5 {metrics['top5']:.2%}  balanced accuracy "
            f"{metrics['balanced_accuracy']:.2%}  macro-F1 {metrics['macro_f1']:.2%}  AUROC "
            f"{'-' if auroc is None else f'{auroc:.4f}'}  (n={metrics['n']})")


def zeroshot(config: RunConfig, out: str | Path, split: str = "test", overwrite: bool = False) -> Dict:
    """Zero-shot classifier from averaged templates; writes RUN/config.yaml, log.txt and metrics.json."""
    check_config(config)
    run = RunFolder(out)
    run.check_reusable(overwrite=overwrite)
    accelerator = make_accelerator(config.mixed_precision)
    session = Session.open(config, accelerator)  # bad data/model fail here, before the folder is touched
    run.prepare(overwrite=overwrite)
    session.use_feature_cache(run.cache)
    with run.log_to_file():
        save_config(config, run.config)
        metrics = {"method": "zeroshot", **_model_fields(config), "classes": session.data.classes,
                   "classnames": session.data.classnames, "split": split, "templates": session.templates}
        logits, labels = session.zeroshot_logits(split), labels_tensor(session.data.split(split))
        val = session.zeroshot_metrics("val") if session.data.multi_label and split != "val" and len(session.data.splits["val"]) else None
        metrics[split] = classification_metrics(logits, labels, session.data.classes, thresholds=val_thresholds(val),
                                                scoring=session.zeroshot_scoring)
        log.info(_line(f"zero-shot {split}", metrics[split]), extra=RESULT)
        save_predictions(run.root, split, logits, labels)
        atomic_write_json(run.metrics, metrics)
        write_run_report(run.root)
        return metrics


def finetune(config: RunConfig, out: str | Path, overwrite: bool = False, resume: bool = False,
             cache_dir: Optional[str | Path] = None, session: Optional[Session] = None, test: bool = True,
             on_validated: Optional[Callable[[int, float], None]] = None, trial: bool = False) -> Dict:
    """Train `config.method`, select the best epoch on val, evaluate on test; returns metrics.json's content.

    Image features are cached where `config.cache_dir` says (by default the user cache, shared by every run on
    the same data and model; the cache key tells their features apart); decoded images go to `cache_dir`
    (default: the run's own `cache/`; a sweep's trials share the sweep's).
    `session`: an open session on the same data and model to reuse (as `cliptune sweep`'s trials do: no model
    or data loading); `test=False` leaves the test split alone (a trial is scored on val only);
    `on_validated(epoch, val_score)` (the `--metric`) is called after every validation pass (a sweep's pruner);
    `trial=True` (a sweep trial: rerun, never resumed) writes no per-epoch checkpoints and validates sparsely
    (`Trainer`).
    """
    started = command_started()
    run = RunFolder(out)
    run.check_reusable(overwrite=overwrite, resume=resume)
    if resume:
        config = load_config(run.config)
    check_config(config)
    accelerator = make_accelerator(config.mixed_precision, config.report_to, run.root)
    # bad data, model or method options fail here, before the run folder is touched
    session = Session.open(config, accelerator) if session is None else session.reused(config, accelerator)
    session, novel_session, method = _sessions_and_method(config, session)
    if accelerator.is_main_process:
        run.prepare(overwrite=overwrite, resume=resume)
    accelerator.wait_for_everyone()
    for each in (session, novel_session):
        if each is not None:
            each.use_feature_cache(Path(cache_dir) if cache_dir is not None else run.cache)
            each.images_for_features = not method.uses_image_features
    clock = PhaseClock(started, session.stats)
    with run.log_to_file(accelerator.is_main_process):
        config = with_budget_lr(config, len(session.data.split("train")))  # the lr it trains with is the one config.yaml holds
        if accelerator.is_main_process and not resume:
            save_config(config, run.config)
        if config.report_to != "none":
            accelerator.init_trackers("cliptune", config=tracked_settings(config))
        clock.mark_startup()
        with clock.phase("zeroshot"):
            zeroshot = _zeroshot_results(session, novel_session, test)  # before training: some methods train the towers in place
        if test:
            log.info(_line("zero-shot test", zeroshot["test"]), extra=RESULT)
        with clock.phase("inputs"):
            train = session.inputs("train", method.uses_image_features, train=True)
            val = session.inputs("val", method.uses_image_features) if len(session.data.splits["val"]) else None
        log.info("method %s: %d training images, %d classes", config.method, len(train), len(session.data.classes))
        trainer = Trainer(method, config, run, accelerator, on_validated=on_validated, resumable=not trial,
                          sparse_validation=trial)
        summary = trainer.fit(train, val, session.data.classes, resume=resume)
        method = accelerator.unwrap_model(trainer.model)
        metrics, test_logits = _trained_metrics(config, session, trainer, method, summary, run, clock, test, val, novel_session,
                                                zeroshot)
        _record(metrics, test_logits, run, session, accelerator, step=training_length(config, len(train))[2])
        return metrics


def _record(metrics: Dict, test_logits, run: RunFolder, session: Session, accelerator, step: int) -> None:
    """A finished run's results: the guard's line, the tracker's last scalars (at the last update `step`), and on
    the main process metrics.json, the stored test predictions and the report."""
    if metrics["guard"]["message"]:
        log.warning(metrics["guard"]["message"], extra=RESULT)
    accelerator.log(result_scalars(metrics), step=step)
    accelerator.end_training()
    if accelerator.is_main_process:
        if test_logits is not None:
            save_predictions(run.root, "test", test_logits, labels_tensor(session.data.split("test")))
        atomic_write_json(run.metrics, metrics)
        if test_logits is not None:
            write_run_report(run.root)


def _sessions_and_method(config: RunConfig, session: Session) -> tuple:
    """(session, base/novel session or None, the method built on the session's classes)."""
    novel_session = None
    if config.base_novel:
        session, novel_session = split_base_novel(session)
    data = session.data
    problem = method_class(config.method).multi_label_problem(config.method_options()) if data.multi_label else None
    if problem:
        able = ", ".join(name for name, cls in METHODS.items() if cls.multi_label)
        raise CliptuneError(f"{data.root} is multi-label: {problem}; methods for multi-label data: {able}")
    method = build_method(config.method, session.model, data.classnames, session.templates,
                          config.method_options(), data.named_descriptions, seed=config.seed)
    if novel_session is not None and method.class_specific:
        raise CliptuneError(f"--base-novel needs a method that works on unseen classes; '{config.method}' learns class-specific state")
    return session, novel_session, method


def _zeroshot_results(session: Session, novel_session: Optional[Session], test: bool) -> Dict:
    """Zero-shot test logits and metrics, val and novel-class metrics: the baselines a trained run is judged against."""
    data = session.data
    logits = session.zeroshot_logits("test") if test else None
    val = session.zeroshot_metrics("val") if len(data.splits["val"]) else None
    return {"test_logits": logits,
            "test": classification_metrics(logits, labels_tensor(data.split("test")), data.classes, thresholds=val_thresholds(val),
                                           scoring=session.zeroshot_scoring) if logits is not None else None,
            "val": val,
            "novel": novel_session.zeroshot_metrics("test") if novel_session is not None else None}


def val_thresholds(val: Optional[Dict]) -> Optional[List[float]]:
    """The per-class thresholds multi-label metrics fitted on val, for the test split (None: single-label, or no val)."""
    return list(val["thresholds"].values()) if val and "thresholds" in val else None


def _trained_metrics(config: RunConfig, session: Session, trainer: Trainer, method, summary, run: RunFolder, clock: PhaseClock,
                     test: bool, val, novel_session: Optional[Session], zeroshot: Dict) -> tuple:
    """(metrics.json of a trained run, the test logits it reports): the selected checkpoint on test (and novel
    classes), its val result, the zero-shot guard's verdict (zero-shot's logits when it falls back) and the timings."""
    data = session.data
    trainable = sum(p.numel() for p in method.trainable_parameters())  # after prepare(): some methods size them there
    load_method_state(method, run.checkpoints / "best")
    val_metrics = test_metrics = test_logits = None
    with clock.phase("final_eval"):
        if val is not None:  # the best epoch's validation pass, when this process ran it (same weights)
            selected = trainer.validated.get(summary.best_epoch)
            val_metrics = (classification_metrics(selected, val.labels, data.classes) if selected is not None
                           else trainer.evaluate(val, data.classes))
        if test:  # multi-label: at the thresholds fitted on val
            test_inputs = session.inputs("test", method.uses_image_features)
            test_logits = trainer.predict(test_inputs)
            test_metrics = classification_metrics(test_logits, test_inputs.labels, data.classes, thresholds=val_thresholds(val_metrics))
    if test_metrics is not None:
        log.info(_line(f"{config.method} test", test_metrics), extra=RESULT)
    metrics = {
        "method": config.method, **_model_fields(config), "classes": data.classes, "classnames": data.classnames,
        "test": test_metrics, "zeroshot": zeroshot["test"],
        "train": {"seconds": round(summary.seconds, 3), "eval_seconds": round(summary.eval_seconds, 3),
                  "images_seen": summary.images_seen, "epochs": summary.epochs,
                  "best_epoch": summary.best_epoch, "trainable_params": trainable, "n": len(data.split("train")),
                  "history": summary.history},
        "processes": trainer.accelerator.num_processes,
    }
    with clock.phase("final_eval"):
        if val_metrics is not None:
            metrics["val"] = val_metrics
        if novel_session is not None and test_metrics is not None:  # base-to-novel runs are tested
            metrics.update(base_novel_metrics(trainer, method, test_metrics, zeroshot["test"], novel_session, zeroshot["novel"]))
        metrics["zeroshot_val"] = zeroshot["val"]
        metrics["guard"] = zeroshot_guard(config.method, metrics.get("val"), zeroshot["val"], config.result_fallback,
                                          config.metric)
        if metrics["guard"]["fallback"]:
            metrics.update(result="zero-shot", adapted={"test": test_metrics, "val": metrics["val"]}, test=zeroshot["test"],
                           val=zeroshot["val"])
            test_logits = zeroshot["test_logits"]
    earlier_train, earlier_eval = trainer.earlier_seconds
    metrics["time"] = clock.report(trainer.accelerator.device, train=summary.seconds - earlier_train,
                                   eval=summary.eval_seconds - earlier_eval)
    log.info(describe(metrics["time"]))
    return metrics, test_logits


def result_scalars(metrics: Dict) -> Dict[str, float]:
    """A finished run's headline numbers for a tracker: `test/...`, `val/...` and `zeroshot/...` (test)."""
    blocks = {"test": metrics.get("test"), "val": metrics.get("val"), "zeroshot": metrics.get("zeroshot")}
    return {f"{name}/{key}": block[key] for name, block in blocks.items() if block
            for key in ("top1", "top5", "balanced_accuracy", "macro_f1", "auroc", "ece") if block.get(key) is not None}


def zeroshot_guard(method_name: str, val: Optional[Dict], zeroshot_val: Optional[Dict], fallback: str = "none",
                   metric: str = "top1") -> Dict:
    """Whether the selected checkpoint ended below zero-shot on val (by `--metric`), what the run keeps, and the
    line that says so.

    `fallback` "zero-shot" keeps the zero-shot classifier when adaptation did not beat it on val (ties keep the
    adapted model: it is not worse on the data the run may look at).
    """
    if val is None or zeroshot_val is None:
        return {"below_zeroshot": None, "val": None, "zeroshot_val": None, "fallback": False, "message": None}
    adapted, baseline = score(val, metric), score(zeroshot_val, metric)
    below = adapted < baseline
    kept = below and fallback == "zero-shot"
    message = None
    if below:
        shown = metric if metric in val else headline(val)[0]  # a metric the split lacks falls back to its headline
        said = f"{method_name} ended below zero-shot on val{'' if shown == 'top1' else ' ' + shown} ({adapted:.2f} vs {baseline:.2f})"
        message = (f"{said}; kept the zero-shot classifier (--fallback zero-shot)" if kept
                   else f"{said}; see 'cliptune sweep' or --fallback zero-shot")
    return {"below_zeroshot": below, "val": adapted, "zeroshot_val": baseline, "fallback": kept, "message": message}


def split_base_novel(session: Session) -> tuple:
    """Base-to-novel protocol (CoCoOp): classes sorted by folder name, the first ceil(C/2) are base, the rest novel."""
    classes = sorted(session.data.classes)
    if len(classes) < 2:
        raise CliptuneError("--base-novel needs at least 2 classes")
    cut = math.ceil(len(classes) / 2)
    return (dataclasses.replace(session, data=session.data.restrict_to(classes[:cut])),
            dataclasses.replace(session, data=session.data.restrict_to(classes[cut:])))


def harmonic_mean(a: float, b: float) -> float:
    return 2 * a * b / (a + b) if a + b > 0 else 0.0


def base_novel_metrics(trainer: Trainer, method, base: Dict, zeroshot_base: Dict, novel: Session, zeroshot_novel: Dict) -> Dict:
    """Novel-class test results of a method trained on the base classes, next to zero-shot (measured before
    training, which may change the towers in place), with harmonic means."""
    method.set_classes(novel.data.classnames)
    result = trainer.evaluate(novel.inputs("test", method.uses_image_features), novel.data.classes)
    metrics: Dict[str, Any] = {"novel_classes": novel.data.classes, "base": base, "novel": result,
                               "hm": harmonic_mean(base["top1"], result["top1"]),
               "zeroshot_base": zeroshot_base, "zeroshot_novel": zeroshot_novel,
               "zeroshot_hm": harmonic_mean(zeroshot_base["top1"], zeroshot_novel["top1"])}
    log.info(_line("zero-shot novel", zeroshot_novel), extra=RESULT)
    log.info(_line(f"{method.name} novel", result), extra=RESULT)
    log.info("harmonic mean of base and novel top-1: %.2f%% (zero-shot %.2f%%)", 100 * metrics["hm"], 100 * metrics["zeroshot_hm"],
             extra=RESULT)
    return metrics


def evaluate_run(run_dir: str | Path, data_dir: Optional[str] = None, split: str = "test", classnames: Optional[str] = None,
                 adapter: Optional[str] = None, session: Optional[Session] = None) -> Dict:
    """Evaluate a finished run's best weights (or an exported `adapter` folder) on a dataset (its own, or another)."""
    run = RunFolder(run_dir)
    config = evaluation_config(load_config(run.config), data_dir, classnames)
    accelerator = make_accelerator(config.mixed_precision)
    # `session`: the open session the run was trained on (a sweep's), reused instead of loading model and data again
    if session is None:
        session = Session.open(config, accelerator, data_dir=data_dir)
        session.feature_dir = feature_cache(config.cache_dir, run.cache)
    else:
        session = session.reused(config, accelerator)
    if kept_zeroshot(run):  # the run's result is the zero-shot classifier (--fallback zero-shot)
        thresholds = run_thresholds(run, session.data.classes)
        return _write_evaluation(run, config.method, session.data, split, session.zeroshot_metrics(split, thresholds))
    _, best, saved = finished_run(run.root)
    data = session.data
    method = build_method(config.method, session.model, data.classnames, session.templates, saved["config"], data.named_descriptions)
    if method.class_specific and data.classnames != saved["classes"]:
        raise CliptuneError(
            f"method '{config.method}' learned a head for the run's own {len(saved['classes'])} classes; "
            f"{data.root} has different classes, so it cannot be evaluated there"
        )
    if adapter:
        from cliptune.deploy.export import load_adapter

        load_adapter(method, adapter)
    else:
        load_method_state(method, best)
    method.to(accelerator.device)
    trainer = Trainer(method, config, None, accelerator)
    result = trainer.evaluate(session.inputs(split, method.uses_image_features), data.classes,
                              thresholds=run_thresholds(run, data.classes))
    return _write_evaluation(run, config.method, data, split, result)


def run_thresholds(run: RunFolder, classes: List[str]) -> Optional[List[float]]:
    """The per-class thresholds a finished multi-label run fitted on its val split, when evaluated on its own classes
    (None for single-label runs, and on other classes: they are then fitted on the evaluated split)."""
    metrics = read_json(run.metrics) if run.metrics.is_file() else {}
    return val_thresholds(metrics.get("val")) if metrics.get("classes") == list(classes) else None


def _write_evaluation(run: RunFolder, method_name: str, data, split: str, result: Dict) -> Dict:
    report = {"run": str(run.root), "method": method_name, "data": str(data.root), "split": split,
              "classes": data.classes, split: result}
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", data.root.name or "data")
    atomic_write_json(run.root / "eval" / f"{name}-{split}.json", report)
    log.info(_line(f"{method_name} {split} on {data.root}", result), extra=RESULT)
    return report


def environment_info() -> Dict:
    """Versions, devices and the accelerate state, for bug reports."""
    import accelerate
    import open_clip
    import peft

    import cliptune

    accelerator = make_accelerator("no")
    state = accelerator.state
    return {
        "cliptune": cliptune.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "peft": peft.__version__,
        "accelerate": accelerate.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "mps_available": bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()),
        "cpu_threads": torch.get_num_threads(),
        "accelerate_state": {
            "distributed_type": str(state.distributed_type),
            "num_processes": state.num_processes,
            "process_index": state.process_index,
            "device": str(state.device),
            "mixed_precision": state.mixed_precision,
        },
    }
