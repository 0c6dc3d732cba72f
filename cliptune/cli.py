"""The `cliptune` command line: parses options and calls the library (cliptune.commands.api).

torch, open_clip and accelerate are imported inside the commands that use them, so `--help`, `recipes`
and option errors answer at once.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import typing
from pathlib import Path
from typing import Any, Mapping

import click

from cliptune.core import progress
from cliptune.config.method_flags import method_flags, methods_exporting_merged
from cliptune.config.run import SETTING_TYPES, SETTINGS, build_config
from cliptune.core.options import flag_name
from cliptune.core.errors import CliptuneError

log = logging.getLogger("cliptune")


class CliptuneGroup(click.Group):
    """Turns CliptuneError (and anything unexpected) into one line on stderr and a non-zero exit."""

    def invoke(self, ctx):
        debug = ctx.params.get("debug", False)
        try:
            return super().invoke(ctx)
        except CliptuneError as exc:
            if debug:
                raise
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            ctx.exit(130)
        except BrokenPipeError:  # the reader stopped early (`cliptune recipes list | head`): nothing is wrong
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error while exiting
            ctx.exit(0)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as exc:  # noqa: BLE001 - last resort: one line unless --debug
            if debug:
                raise
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            click.echo(f"error: {type(exc).__name__}: {message} (rerun with --debug for the traceback)", err=True)
            ctx.exit(1)


def _main_process() -> bool:
    """torchrun starts one CLI per process (RANK set); only the first prints logs and results."""
    return os.environ.get("RANK", "0") == "0"


def _echo_result(text: str) -> None:
    if _main_process():
        click.echo(text)


class _ConsoleHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is now (so it also works under test runners that swap it).

    Result records (`extra=progress.RESULT`) are left to the command, which prints them on stdout.
    """

    def filter(self, record):
        return not getattr(record, "result", False) and super().filter(record)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def _setup_logging(quiet: bool) -> None:
    logger = logging.getLogger("cliptune")
    logger.setLevel(logging.INFO)
    console = next((h for h in logger.handlers if isinstance(h, _ConsoleHandler)), None)
    if console is None:
        console = _ConsoleHandler()
        console.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(console)
    # other processes of a torchrun only report errors: their progress and warnings repeat the first one's
    console.setLevel(logging.ERROR if not _main_process() else logging.WARNING if quiet else logging.INFO)
    progress.PROGRESS_LOGGER.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False  # libraries may configure the root logger; do not print twice


@click.group(cls=CliptuneGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.option("--quiet", is_flag=True, help="Only warnings and errors on stderr.")
@click.version_option(package_name="cliptune")
def cli(debug: bool, quiet: bool) -> None:
    """Adapt pretrained CLIP models (open_clip) to a new domain from a folder of labelled images."""
    _setup_logging(quiet)


def option_group(options):
    """One decorator applying a list of click options in order."""

    def decorate(func):
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


def _flag_spec(flag: str, name: str, annotation, metadata: Mapping[str, Any], help_text: str) -> tuple:
    """(declarations, settings) of the click option for one option-dataclass field. Bounds and choices are
    checked by the config (one-line errors), not by click (a usage block); bools get a --x/--no-x pair;
    list fields repeat."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is list:
        return [flag, name], {"multiple": True, "type": click.Path() if metadata.get("path") else str, "help": help_text}
    base = next((a for a in args if a is not type(None)), annotation) if args else annotation
    if base is bool:
        return [f"{flag}/--no-{flag[2:]}", name], {"default": None, "help": help_text}
    choices = metadata.get("choices")
    metavar = "[" + "|".join(map(str, choices)) + "]" if choices else None
    kind = click.Path() if metadata.get("path") in ("file", "folder", "dataset") else {int: int, float: float}.get(base, str)
    return [flag, name], {"type": kind, "metavar": metavar, "help": help_text}


def config_flags(*names: str):
    """The flags of these run settings, generated from their declarations in `RunConfig`."""
    specs = [_flag_spec(flag_name(SETTINGS[name]), name, SETTING_TYPES[name], SETTINGS[name].metadata,
                        SETTINGS[name].metadata["help"]) for name in names]
    return option_group([click.option(*declarations, **settings) for declarations, settings in specs])


MODEL_SETTINGS = ("model", "pretrained", "model_config")
DATA_SETTINGS = ("data", "data_format", "path_col", "label_col", "split_col", "caption_col", "task", "label_sep", "zeroshot_pairs", "val_fraction", "test_fraction", "classnames",
                 "templates", "seed", "strict", "cache_dir")
TRAINING_SETTINGS = (
    "shots", "epochs", "steps", "lr", "batch_size", "optimizer", "weight_decay", "warmup_steps", "warmup_epochs",
    "warmup_lr", "select", "metric", "val_shots", "grad_accum", "mixed_precision", "label_smoothing", "aug_views", "aug_per_step",
    "num_workers", "image_cache", "eval_every", "grad_checkpointing")
recipe_option = click.option("--recipe", help="Recipe name (recipes/NAME.yaml) or YAML path.")
set_option = click.option("--set", "set_values", multiple=True, metavar="KEY=VALUE",
                          help="Override any config key (highest precedence).")
run_folder_options = option_group([
    recipe_option,
    set_option,
    click.option("--out", required=True, type=click.Path(), help="Run folder to write."),
    click.option("--resume", is_flag=True, help="Continue the interrupted run in --out from its last checkpoint."),
    click.option("--overwrite", is_flag=True, help="Replace a finished run in --out."),
])


def _cli_values(**values):
    """Parsed flags as config values; a flag not given (None, or a repeatable flag given no times) is left out."""
    return {key: list(value) if isinstance(value, tuple) else value for key, value in values.items()
            if value is not None and value != ()}


class MethodOptionsCommand(click.Command):
    """A command whose method flags (`--n-ctx`, `--lora-r`, ...) are generated on first use (parsing or --help)
    from the methods' option table (`cliptune/config/method_flags.json`, kept equal to the config dataclasses
    by the tests), so that `--help` never imports a method, and with it torch.

    The parsed flag values reach the callback as one `method_values` mapping, keyed by option name.
    """

    def __init__(self, *args, methods=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.select_methods = methods  # callable -> method names whose flags apply; None = all
        self._method_params = None

    def method_params(self):
        if self._method_params is None:
            table = method_flags()
            names = self.select_methods() if self.select_methods else sorted(table)
            self._method_params = method_flag_options({name: table[name]["options"] for name in names})
        return self._method_params

    def get_params(self, ctx):
        params = super().get_params(ctx)
        return params[:-1] + self.method_params() + params[-1:]  # before --help

    def invoke(self, ctx):
        ctx.params["method_values"] = {p.name: ctx.params.pop(p.name, None) for p in self.method_params()}
        return super().invoke(ctx)


OPTION_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def method_flag_options(options_by_method) -> list:
    """One click option per distinct method flag; a flag shared by several methods names one option field."""
    by_flag: dict = {}
    for method, options in options_by_method.items():
        for entry in options:
            by_flag.setdefault(entry["flag"], []).append((method, entry))
    params = []
    for flag, users in by_flag.items():
        names = {entry["name"] for _, entry in users}
        if len(names) > 1:
            raise TypeError(f"method flag {flag} names different options: {sorted(names)}")
        _, entry = users[0]
        defaults = "/".join("unset" if e["default"] is None else str(e["default"]) for _, e in users)
        text = f"{'/'.join(method for method, _ in users)}: {entry['help']} [{defaults}]"
        declarations, settings = _flag_spec(flag, entry["name"], OPTION_TYPES.get(entry["type"], str),
                                            {"choices": entry["choices"]}, text)
        params.append(click.Option(declarations, **settings))
    return params


@cli.command()
@config_flags(*MODEL_SETTINGS, *DATA_SETTINGS)
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "val", "test"]))
@recipe_option
@set_option
@click.option("--out", required=True, type=click.Path(), help="Run folder to write.")
@click.option("--overwrite", is_flag=True, help="Replace a finished run in --out.")
def zeroshot(split, recipe, set_values, out, overwrite, **options):
    """Zero-shot classification with averaged prompt templates."""
    from cliptune.commands import api

    config = build_config(recipe, _cli_values(**options), list(set_values))
    metrics = api.zeroshot(config, out, split=split, overwrite=overwrite)
    _echo_result(_summary(f"zero-shot {split}", metrics[split]))


@cli.command(cls=MethodOptionsCommand)
@config_flags(*MODEL_SETTINGS, *DATA_SETTINGS)
@click.option("--method", help="Adaptation method [linear-probe]; `cliptune methods` lists them.")
@config_flags("base_novel", "result_fallback", "report_to", *TRAINING_SETTINGS)
@run_folder_options
def finetune(recipe, set_values, out, resume, overwrite, method_values, **options):
    """Adapt the model with a method, then evaluate on the test split."""
    from cliptune.commands import api

    config = None if resume else build_config(recipe, _cli_values(**options), list(set_values), method_values)
    metrics = api.finetune(config, out, overwrite=overwrite, resume=resume)
    zs, test = metrics["zeroshot"], metrics["test"]
    _echo_result(_summary("zero-shot test", zs, with_n=False))
    kept = " (the zero-shot fallback)" if metrics.get("result") == "zero-shot" else ""
    _echo_result(_summary(f"{metrics['method']} test{kept}", test))
    if "top1" in test:
        _echo_result(f"{metrics['method']} test{kept}: balanced accuracy {test['balanced_accuracy']:.4f}  macro-F1 "
                     f"{test['macro_f1']:.4f}  AUROC {'-' if test['auroc'] is None else format(test['auroc'], '.4f')}")
    if "novel" in metrics:
        _echo_result(f"zero-shot novel: top-1 {metrics['zeroshot_novel']['top1']:.4f}  harmonic mean {metrics['zeroshot_hm']:.4f}")
        _echo_result(f"{metrics['method']} novel: top-1 {metrics['novel']['top1']:.4f}  harmonic mean {metrics['hm']:.4f}")
    if metrics["guard"]["message"]:
        _echo_result(metrics["guard"]["message"])
    _echo_result(f"run folder: {out}")


def _summary(name: str, result: dict, with_n: bool = True) -> str:
    """One result line: top-1 and top-5, or mAP, F1 and AUROC of a multi-label split."""
    n = f"  n={result['n']}" if with_n else ""
    if "map" in result:
        auroc = "-" if result["auroc"] is None else format(result["auroc"], ".4f")
        return (f"{name}: mAP {result['map']:.4f}  macro-F1 {result['macro_f1']:.4f}  micro-F1 {result['micro_f1']:.4f}  "
                f"AUROC {auroc}{n}")
    return f"{name}: top-1 {result['top1']:.4f}  top-5 {result['top5']:.4f}{n}"


@cli.command("eval")
@click.argument("run", type=click.Path())
@click.option("--data", type=click.Path(), help="ImageFolder or manifest to evaluate on [the run's own data].")
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "val", "test"]))
@click.option("--classnames", type=click.Path(), help="Class names YAML for --data.")
@click.option("--json", "as_json", is_flag=True, help="Print the full result as JSON.")
@click.option("--adapter", type=click.Path(), help="Evaluate an adapter folder from `cliptune export --format adapter` instead of the run's best weights.")
def eval_command(run, data, split, classnames, as_json, adapter):
    """Evaluate a finished run's best weights (also on a dataset with other classes)."""
    from cliptune.commands import api

    report = api.evaluate_run(run, data, split, classnames, adapter=adapter)
    result = report[split]
    if as_json:
        _echo_result(json.dumps(report, indent=2))
    else:
        _echo_result(_summary(f"{report['method']} {split}", result))


@cli.command()
@click.argument("run", type=click.Path())
@click.option("--data", type=click.Path(), help="ImageFolder or manifest to evaluate on [the run's own data].")
@click.option("--alphas", default="0,0.25,0.5,0.75,1", show_default=True, help="Mixing weights of the fine-tuned model.")
def wise(run, data, alphas):
    """WiSE-FT: evaluate (1-A)*zero-shot + A*fine-tuned weights; writes RUN/wise.json and RUN/wise.png."""
    from cliptune.commands.wise import parse_alphas, wise_sweep

    result = wise_sweep(run, data, parse_alphas(alphas))
    for alpha, val, test in zip(result["alphas"], result["val_top1"], result["test_top1"]):
        _echo_result(f"alpha {alpha:.2f}: val top-1 {val:.4f}  test top-1 {test:.4f}")
    _echo_result(f"best alpha (on val): {result['best_alpha']:g}")


@cli.command("export")
@click.argument("run", type=click.Path())
@click.option("--format", "fmt", required=True,
              help="merged: whole open_clip model with the method merged (.safetensors); hub: that model in open_clip's "
                   "Hugging Face Hub folder layout with a model card (loads as local-dir:DIR); adapter: peft adapter folder; "
                   "classifier: self-contained classifier folder (any method); onnx: image -> logits graph (.onnx, any method).")
@click.option("--output", required=True, type=click.Path(), help="File (merged, onnx) or folder (hub, adapter, classifier) to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --output.")
@click.option("--wise-alpha", type=float, help="merged only: write the WiSE-FT mixture (1-A)*zero-shot + A*fine-tuned.")
def export_command(run, fmt, output, overwrite, wise_alpha):
    """Export a finished run's best weights (or, as onnx, a classifier export) for use outside cliptune."""
    from cliptune.deploy.export import export_run

    path = export_run(run, fmt, output, overwrite=overwrite, wise_alpha=wise_alpha)
    _echo_result(f"wrote {fmt} export to {path}")


@cli.command()
@click.argument("run", type=click.Path())
@click.option("--repo", required=True, help="Hugging Face model repository to upload to (org/name), created if missing.")
@click.option("--private", is_flag=True, help="Create the repository as private.")
def push(run, repo, private):
    """Upload a finished run as an open_clip model on the Hugging Face Hub (the `export --format hub` folder)."""
    from cliptune.deploy.push import push_hub

    _echo_result(f"pushed {run} to {push_hub(run, repo, private)}")


@cli.command()
@click.argument("source", metavar="RUN_OR_EXPORT", type=click.Path())
@click.argument("images", metavar="IMAGE_OR_DIR...", nargs=-1, required=True, type=click.Path())
@click.option("--topk", default=5, show_default=True, type=click.IntRange(min=1), help="Classes listed per image.")
@click.option("--format", "fmt", default="table", show_default=True, type=click.Choice(["table", "csv", "json"]))
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1), help="Images per forward pass.")
@click.option("--output", type=click.Path(dir_okay=False), help="Write the predictions to this file instead of stdout.")
def predict(source, images, topk, fmt, batch_size, output):
    """Top-k classes of images (folders are walked recursively) with a run's or export's classifier."""
    import torch

    from cliptune.deploy.predict import predict_paths, render
    from cliptune.core.runfolder import atomic_write_text

    device = "cuda" if torch.cuda.is_available() else "cpu"
    classifier, predictions, unreadable = predict_paths(source, images, topk, batch_size, device)
    text = render(classifier, predictions, unreadable, fmt)
    if output:
        atomic_write_text(output, text)
        click.echo(f"wrote {len(predictions)} prediction(s) to {output}", err=True)
    else:
        click.echo(text, nl=False)
    if unreadable:
        click.echo(f"skipped {len(unreadable)} unreadable file(s): {', '.join(map(str, unreadable))}", err=True)


@cli.command()
@click.argument("runs", metavar="RUN...", nargs=-1, required=True, type=click.Path())
@click.option("--output", required=True, type=click.Path(dir_okay=False), help="HTML file to write.")
def report(runs, output):
    """Compare runs side by side in one self-contained HTML page (each run also has RUN/report.html)."""
    from cliptune.deploy.report import write_comparison

    click.echo(f"wrote {write_comparison(runs, output)}")


@cli.command(cls=MethodOptionsCommand, methods=methods_exporting_merged)
@config_flags(*MODEL_SETTINGS, "tasks", "controls", "reference", "reference_texts", "strategy", "report_to")
@click.option("--method", help="full | lora [full]")
@config_flags("templates", "seed", "distill_image", "distill_text", "avg_every", "wise_alpha", "modx_alpha", "l2",
              *TRAINING_SETTINGS)
@run_folder_options
def continual(recipe, set_values, out, resume, overwrite, method_values, **options):
    """Learn a sequence of tasks, measuring forgetting and zero-shot transfer (MTIL metrics)."""
    from cliptune.continual.loop import continual as run_continual, continual_defaults
    from cliptune.methods import CONTINUAL_DEFAULT_METHOD

    config = None
    if not resume:
        config = build_config(recipe, _cli_values(**options), list(set_values), method_values,
                              default_method=CONTINUAL_DEFAULT_METHOD, protocol=continual_defaults)
    result = run_continual(config, out, overwrite=overwrite, resume=resume)
    _echo_result(f"{result['strategy']} ({result['method']}): transfer {result['transfer']:.4f}  avg {result['avg']:.4f}  last {result['last']:.4f}")
    _echo_result(f"run folder: {out}  (continual.json, continual.png)")


@cli.group(invoke_without_command=True)
@click.pass_context
def methods(ctx):
    """List the methods (name, what trains, paper); `methods show NAME` prints one's defaults and options."""
    if ctx.invoked_subcommand is None:
        from cliptune.methods import METHODS

        width = max(len(name) for name in METHODS)
        for name, cls in METHODS.items():
            click.echo(f"{name.ljust(width)}  {cls.trains}  [{cls.paper}]")


@methods.command("show")
@click.argument("name")
@click.option("--shots", type=int, default=16, show_default=True, help="Shot count the defaults are shown for.")
def methods_show(name, shots):
    """A method's training defaults (for --shots) and its options with their help text."""
    from cliptune.methods import describe_method

    click.echo(describe_method(name, shots), nl=False)


@cli.command()
@config_flags(*MODEL_SETTINGS, *[name for name in DATA_SETTINGS if name != "seed"])
@click.option("--methods", required=True, help="Comma list of methods, e.g. linear-probe,coop,lora.")
@click.option("--shots", "shots_list", required=True, help="Comma list of images per class, e.g. 1,4,16.")
@click.option("--seeds", default="1", show_default=True, help="Comma list of seeds; every cell runs once per seed.")
@click.option("--steps", type=int, help="Optimizer-step budget of every cell instead of epochs [each method's default].")
@config_flags("epochs", "lr", "batch_size", "optimizer", "weight_decay", "warmup_steps", "grad_accum", "mixed_precision",
              "label_smoothing", "aug_views", "num_workers", "metric", "report_to")
@recipe_option
@set_option
@click.option("--sweep", "sweep_trials", default=0, type=click.IntRange(min=0),
              help="Tune every (method, shots) pair first with an N-trial `cliptune sweep` on val [0: the defaults].")
@click.option("--out", required=True, type=click.Path(), help="Compare folder: cells/ (one run folder each), cache/, compare.*")
def compare(methods, shots_list, seeds, steps, recipe, set_values, out, sweep_trials, **options):
    """Every (method, shots, seed) cell as a run; writes compare.json/.md/.png and prints the table.

    Rerunning the same command skips finished cells and resumes interrupted ones.
    """
    from cliptune.commands.compare import compare as run_compare, parse_names, parse_positive_ints, render_markdown

    result = run_compare(out, parse_names(methods, "--methods"), parse_positive_ints(shots_list, "--shots"),
                         parse_positive_ints(seeds, "--seeds"), steps=steps, recipe=recipe,
                         options=_cli_values(**options), set_values=list(set_values), sweep=sweep_trials)
    click.echo(render_markdown(result), nl=False)
    click.echo(f"compare folder: {out}  (compare.json, compare.md, compare.png, cells/)")


@cli.command(cls=MethodOptionsCommand)
@config_flags(*MODEL_SETTINGS, *DATA_SETTINGS)
@click.option("--method", help="Method to tune [linear-probe]; its search space: lr, budget and its own options.")
@config_flags("shots")
@click.option("--trials", default=20, show_default=True, type=click.IntRange(min=1), help="Finished trials to reach (a rerun adds the missing ones).")
@click.option("--timeout", type=click.FloatRange(min=1), help="Stop starting trials after this many seconds.")
@click.option("--steps", type=int, help="Optimizer-step budget of every trial (then the budget is not searched).")
@click.option("--space", type=click.Path(), help="YAML search space replacing the method's: key: {log|float|int: [low, high]} or {choice: [...]}.")
@config_flags("epochs", "lr", "batch_size", "optimizer", "weight_decay", "aug_views", "num_workers", "metric", "report_to")
@recipe_option
@set_option
@click.option("--out", required=True, type=click.Path(), help="Sweep folder: sweep.db, trials/, cache/, sweep.json/.md/.png, best.yaml.")
def sweep(trials, timeout, space, recipe, set_values, out, method_values, **options):
    """Search a method's settings on val with Optuna (TPE, median pruning); the best trial is tested once.

    Interrupted? Run the same command again: finished trials are kept (OUT/sweep.db).
    """
    from cliptune.commands.sweep import Sweep, read_space

    study = Sweep(out, recipe, _cli_values(**options), list(set_values), method_values,
                  space=read_space(space) if space else None)
    result = study.run(trials, timeout)
    from cliptune.core.metrics import headline, score

    best, zeroshot, metric = result["best"], result["zeroshot"], result["metric"]
    shown = metric if metric in best["test"] else headline(best["test"])[0]  # multi-label: mAP stands for top-1
    label = {"top1": "top-1", "map": "mAP"}.get(shown, shown)
    _echo_result(f"best trial {best['number']}: val {label} {best['val']:.4f}  test {label} {score(best['test'], metric):.4f}  "
                 f"({', '.join(f'{k}={v}' for k, v in best['params'].items())})")
    _echo_result(f"zero-shot: val {label} {score(zeroshot['val'], metric):.4f}  test {label} {score(zeroshot['test'], metric):.4f}")
    if result["guard"]["message"]:
        _echo_result(result["guard"]["message"])
    _echo_result(f"sweep folder: {out}  (sweep.json, sweep.md, sweep.png, best.yaml: cliptune finetune --recipe {Path(out) / 'best.yaml'} --out RUN)")


@cli.group()
def recipes():
    """List and show the bundled recipes."""


@recipes.command("list")
def recipes_list():
    """Name, domain, method, model and summary of every bundled recipe."""
    from cliptune.config import recipes as recipe_lib

    rows = [recipe_lib.describe(str(path)) for path in recipe_lib.recipe_paths()]
    if not rows:
        raise CliptuneError(f"no recipes found in {recipe_lib.RECIPE_DIR} (an incomplete installation?)")
    columns = ("name", "domain", "method", "model")
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}
    click.echo("  ".join(c.upper().ljust(widths[c]) for c in columns) + "  SUMMARY")
    for row in rows:
        click.echo("  ".join(row[c].ljust(widths[c]) for c in columns) + "  " + row["summary"])


@recipes.command("show")
@click.argument("name")
def recipes_show(name):
    """Print a recipe's YAML (a bundled name or a path)."""
    from cliptune.config import recipes as recipe_lib

    click.echo(recipe_lib.show(name), nl=False)


@cli.command()
def info():
    """Versions, devices and accelerate state."""
    from cliptune.commands import api

    click.echo(json.dumps(api.environment_info(), indent=2))


def main() -> None:
    cli(prog_name="cliptune")


if __name__ == "__main__":
    main()
