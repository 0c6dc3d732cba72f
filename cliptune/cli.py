"""The `cliptune` command line: parses options and calls the library (cliptune.commands.api).

torch, open_clip and accelerate are imported inside the commands that use them, so `--help`, `recipes`
and option errors answer at once.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import click

from cliptune.core import progress
from cliptune.config.run import CHOICES, build_config
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


model_options = option_group([
    click.option("--model", help="open_clip architecture (e.g. ViT-B-16) or hf-hub:org/repo."),
    click.option("--pretrained", help="open_clip pretrained tag (e.g. laion2b_s34b_b79k) or a local .pt/.pth/.bin/.safetensors file."),
    click.option("--model-config", type=click.Path(), help="JSON open_clip model config for a custom architecture."),
])

DATA_OPTIONS = [
    click.option("--data", type=click.Path(), help="ImageFolder root (class folders, or train/ val/ test/ of them)."),
    click.option("--val-fraction", type=float, help="Validation share when the data has no val/ folder [0.1]."),
    click.option("--test-fraction", type=float, help="Test share when the data has no test/ folder [0.2]."),
    click.option("--classnames", type=click.Path(), help="YAML mapping class folder -> name (or {name, descriptions})."),
    click.option("--templates", type=click.Path(), help="Prompt templates file (one per line, each with '{}')."),
    click.option("--seed", type=int, help="Seed for splits, shots, initialisation and training [0]."),
    click.option("--strict/--no-strict", default=None, help="Fail on unreadable image files instead of skipping them."),
]
data_options = option_group(DATA_OPTIONS)


def options_named(options, *names):
    """The options of a shared list with these parameter names, in the list's order (to reuse flags)."""

    def name(option):
        return click.command("probe")(option(lambda: None)).params[0].name  # the parameter the decorator adds

    chosen = [option for option in options if name(option) in names]
    assert len(chosen) == len(names), f"no option for some of {names}"
    return option_group(chosen)


TRAINING_OPTIONS = [
    click.option("--shots", type=int, help="Images per class sampled from train (seeded)."),
    click.option("--epochs", type=int, help="Training epochs [the method's default]."),
    click.option("--steps", type=int, help="Optimizer-step budget instead of --epochs; the schedule scales to it."),
    click.option("--lr", type=float, help="Learning rate [the method's default]."),
    click.option("--batch-size", type=int, help="Global batch size (split across processes)."),
    click.option("--optimizer", help="adamw | sgd | lion"),
    click.option("--weight-decay", type=float),
    click.option("--warmup-steps", type=int, help="Linear warm-up to --lr over this many optimizer steps."),
    click.option("--warmup-epochs", type=int, help="Constant warm-up epochs at --warmup-lr first (Dassl) [method default]."),
    click.option("--warmup-lr", type=float, help="Learning rate of the constant warm-up [1e-5]."),
    click.option("--select", metavar="[" + "|".join(CHOICES["select"]) + "]", help="Checkpoint evaluated at the end [method default]."),
    click.option("--val-shots", type=int, help="Validation images per class [min(--shots, 4) with --shots, else all]."),
    click.option("--grad-accum", type=int, help="Gradient accumulation steps."),
    click.option("--mixed-precision", help="no | fp16 | bf16"),
    click.option("--label-smoothing", type=float, help="Label smoothing added to any loss [0]."),
    click.option("--aug-views", type=int, help="Augmented views cached per training image when the image tower is frozen (0 = none)."),
    click.option("--aug-per-step/--no-aug-per-step", default=None, help="Frozen image tower: re-augment and re-encode every step (exact, slower) instead of a view bank."),
    click.option("--num-workers", type=int, help="DataLoader workers [0 on CPU (exact resume); up to 8 per process on GPU]."),
    click.option("--image-cache", metavar="[" + "|".join(CHOICES["image_cache"]) + "]",
                 help="Decode and resize images once: in memory, memory-mapped under RUN/cache, auto (memory when it fits) or off [auto]."),
    click.option("--eval-every", type=int, help="Validate every N epochs and after the last [auto: validation under ~20% of training]."),
    click.option("--grad-checkpointing/--no-grad-checkpointing", default=None,
                 help="Recompute tower activations in the backward pass: less memory, one more forward per step [off]."),
    click.option("--recipe", help="Recipe name (recipes/NAME.yaml) or YAML path."),
    click.option("--set", "set_values", multiple=True, metavar="KEY=VALUE", help="Override any config key (highest precedence)."),
    click.option("--out", required=True, type=click.Path(), help="Run folder to write."),
    click.option("--resume", is_flag=True, help="Continue the interrupted run in --out from its last checkpoint."),
    click.option("--overwrite", is_flag=True, help="Replace a finished run in --out."),
]


training_options = option_group(TRAINING_OPTIONS)  # shared by finetune and continual
fallback_option = click.option(
    "--fallback", "result_fallback", metavar="[" + "|".join(CHOICES["result_fallback"]) + "]",
    help="What a run keeps when it ends below zero-shot on val: none (the adapted model, with a warning) or zero-shot [none].")


def _cli_values(**values):
    return {key: value for key, value in values.items() if value is not None}


class MethodOptionsCommand(click.Command):
    """A command whose method flags (`--n-ctx`, `--lora-r`, ...) are generated from the methods' config
    dataclasses on first use (parsing or --help), so that `cliptune --help` never imports a method.

    The parsed flag values reach the callback as one `method_values` mapping, keyed by option name.
    """

    def __init__(self, *args, methods=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.select_methods = methods  # callable -> method names whose flags apply; None = all
        self._method_params = None

    def method_params(self):
        if self._method_params is None:
            from cliptune.methods import METHODS

            names = self.select_methods() if self.select_methods else sorted(METHODS)
            self._method_params = method_flag_options([METHODS[name] for name in names])
        return self._method_params

    def get_params(self, ctx):
        params = super().get_params(ctx)
        return params[:-1] + self.method_params() + params[-1:]  # before --help

    def invoke(self, ctx):
        ctx.params["method_values"] = {p.name: ctx.params.pop(p.name, None) for p in self.method_params()}
        return super().invoke(ctx)


def method_flag_options(method_classes) -> list:
    """One click option per distinct method flag; a flag shared by several methods names one option field."""
    import typing
    from dataclasses import fields

    from cliptune.core.options import default_of, flag_name

    by_flag: dict = {}
    for cls in method_classes:
        hints = typing.get_type_hints(cls.config_class)
        for spec in fields(cls.config_class):
            by_flag.setdefault(flag_name(spec), []).append((cls.name, spec, hints[spec.name]))
    options = []
    for flag, users in by_flag.items():
        names = {spec.name for _, spec, _ in users}
        if len(names) > 1:
            raise TypeError(f"method flag {flag} names different options: {sorted(names)}")
        _, spec, annotation = users[0]
        defaults = "/".join("unset" if default_of(s) is None else str(default_of(s)) for _, s, _ in users)
        text = f"{'/'.join(name for name, _, _ in users)}: {spec.metadata.get('help', '')} [{defaults}]"
        args = typing.get_args(annotation)
        base = next((a for a in args if a is not type(None)), annotation) if args else annotation
        if base is bool:
            options.append(click.Option([f"{flag}/--no-{flag[2:]}", spec.name], default=None, help=text))
            continue
        # choices are checked by the config dataclass (one-line error), not by click (a usage block)
        choices = spec.metadata.get("choices")
        metavar = "[" + "|".join(map(str, choices)) + "]" if choices else None
        options.append(click.Option([flag, spec.name], type={int: int, float: float}.get(base, str), metavar=metavar, help=text))
    return options


@cli.command()
@model_options
@data_options
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "val", "test"]))
@click.option("--recipe", help="Recipe name (recipes/NAME.yaml) or YAML path for defaults.")
@click.option("--set", "set_values", multiple=True, metavar="KEY=VALUE", help="Override any config key.")
@click.option("--out", required=True, type=click.Path(), help="Run folder to write.")
@click.option("--overwrite", is_flag=True, help="Replace a finished run in --out.")
def zeroshot(split, recipe, set_values, out, overwrite, **options):
    """Zero-shot classification with averaged prompt templates."""
    from cliptune.commands import api

    config = build_config(recipe, _cli_values(**options), list(set_values))
    metrics = api.zeroshot(config, out, split=split, overwrite=overwrite)
    result = metrics[split]
    _echo_result(f"zero-shot {split}: top-1 {result['top1']:.4f}  top-5 {result['top5']:.4f}  n={result['n']}")


@cli.command(cls=MethodOptionsCommand)
@model_options
@data_options
@click.option("--method", help="Adaptation method [linear-probe]; `cliptune methods` lists them.")
@click.option("--base-novel/--no-base-novel", default=None, help="Base-to-novel protocol: train on the first half of the classes, test on base and novel.")
@fallback_option
@training_options
def finetune(recipe, set_values, out, resume, overwrite, method_values, **options):
    """Adapt the model with a method, then evaluate on the test split."""
    from cliptune.commands import api

    config = None if resume else build_config(recipe, _cli_values(**options), list(set_values), method_values)
    metrics = api.finetune(config, out, overwrite=overwrite, resume=resume)
    zs, test = metrics["zeroshot"], metrics["test"]
    _echo_result(f"zero-shot test: top-1 {zs['top1']:.4f}  top-5 {zs['top5']:.4f}")
    kept = " (the zero-shot fallback)" if metrics.get("result") == "zero-shot" else ""
    _echo_result(f"{metrics['method']} test{kept}: top-1 {test['top1']:.4f}  top-5 {test['top5']:.4f}  n={test['n']}")
    if "novel" in metrics:
        _echo_result(f"zero-shot novel: top-1 {metrics['zeroshot_novel']['top1']:.4f}  harmonic mean {metrics['zeroshot_hm']:.4f}")
        _echo_result(f"{metrics['method']} novel: top-1 {metrics['novel']['top1']:.4f}  harmonic mean {metrics['hm']:.4f}")
    if metrics["guard"]["message"]:
        _echo_result(metrics["guard"]["message"])
    _echo_result(f"run folder: {out}")


@cli.command("eval")
@click.argument("run", type=click.Path())
@click.option("--data", type=click.Path(), help="ImageFolder to evaluate on [the run's own data].")
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
        _echo_result(f"{report['method']} {split}: top-1 {result['top1']:.4f}  top-5 {result['top5']:.4f}  n={result['n']}")


@cli.command()
@click.argument("run", type=click.Path())
@click.option("--data", type=click.Path(), help="ImageFolder to evaluate on [the run's own data].")
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
              help="merged: whole open_clip model with the method merged (.safetensors); adapter: peft adapter folder; "
                   "classifier: self-contained classifier folder (any method); onnx: image -> logits graph (.onnx, any method).")
@click.option("--output", required=True, type=click.Path(), help="File (merged, onnx) or folder (adapter, classifier) to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --output.")
@click.option("--wise-alpha", type=float, help="merged only: write the WiSE-FT mixture (1-A)*zero-shot + A*fine-tuned.")
def export_command(run, fmt, output, overwrite, wise_alpha):
    """Export a finished run's best weights (or, as onnx, a classifier export) for use outside cliptune."""
    from cliptune.deploy.export import export_run

    path = export_run(run, fmt, output, overwrite=overwrite, wise_alpha=wise_alpha)
    _echo_result(f"wrote {fmt} export to {path}")


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


def _mergeable_methods() -> list:
    from cliptune.methods import methods_exporting

    return methods_exporting("merged")


@cli.command(cls=MethodOptionsCommand, methods=_mergeable_methods)
@model_options
@click.option("--task", "tasks", multiple=True, help="Task ImageFolder (repeat, in order); DIR:class,class selects classes.")
@click.option("--control", "controls", multiple=True, help="Control ImageFolder evaluated zero-shot after each task (repeat).")
@click.option("--reference", help="Reference images for zscl (any folder of images, unlabelled).")
@click.option("--reference-texts", type=click.Path(), help="Reference phrases, one per line [bundled ~1,000 concept names].")
@click.option("--strategy", help="naive | lwf | lwf-vr | zscl | wise [naive]")
@click.option("--method", help="full | lora [full]")
@click.option("--templates", type=click.Path(), help="Prompt templates file.")
@click.option("--seed", type=int)
@click.option("--distill-image", type=float, help="zscl: weight of the image-side distillation [1.0].")
@click.option("--distill-text", type=float, help="zscl: weight of the text-side distillation [1.0].")
@click.option("--avg-every", type=int, help="zscl: weight-average snapshot every N optimizer steps [100].")
@click.option("--wise-alpha", type=float, help="wise: weight of the fine-tuned model after each task [0.8].")
@click.option("--l2", type=float, help="any strategy: weight of ZSCL's L2 pull toward the task-start weights [0].")
@training_options
def continual(recipe, set_values, out, resume, overwrite, tasks, controls, method_values, **options):
    """Learn a sequence of tasks, measuring forgetting and zero-shot transfer (MTIL metrics)."""
    from cliptune.continual.loop import DEFAULT_METHOD, continual as run_continual

    config = None
    if not resume:
        values = _cli_values(**options, tasks=list(tasks) or None, controls=list(controls) or None)
        config = build_config(recipe, values, list(set_values), method_values, default_method=DEFAULT_METHOD)
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
@model_options
@options_named(DATA_OPTIONS, "data", "val_fraction", "test_fraction", "classnames", "templates", "strict")
@click.option("--methods", required=True, help="Comma list of methods, e.g. linear-probe,coop,lora.")
@click.option("--shots", "shots_list", required=True, help="Comma list of images per class, e.g. 1,4,16.")
@click.option("--seeds", default="1", show_default=True, help="Comma list of seeds; every cell runs once per seed.")
@click.option("--steps", type=int, help="Optimizer-step budget of every cell instead of epochs [each method's default].")
@options_named(TRAINING_OPTIONS, "epochs", "lr", "batch_size", "optimizer", "weight_decay", "warmup_steps", "grad_accum",
               "mixed_precision", "label_smoothing", "aug_views", "num_workers", "recipe", "set_values")
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
@model_options
@data_options
@click.option("--method", help="Method to tune [linear-probe]; its search space: lr, budget and its own options.")
@click.option("--shots", type=int, help="Images per class sampled from train (seeded).")
@click.option("--trials", default=20, show_default=True, type=click.IntRange(min=1), help="Finished trials to reach (a rerun adds the missing ones).")
@click.option("--timeout", type=click.FloatRange(min=1), help="Stop starting trials after this many seconds.")
@click.option("--steps", type=int, help="Optimizer-step budget of every trial (then the budget is not searched).")
@click.option("--space", type=click.Path(), help="YAML search space replacing the method's: key: {log|float|int: [low, high]} or {choice: [...]}.")
@options_named(TRAINING_OPTIONS, "epochs", "lr", "batch_size", "optimizer", "weight_decay", "aug_views", "num_workers", "recipe",
               "set_values")
@click.option("--out", required=True, type=click.Path(), help="Sweep folder: sweep.db, trials/, cache/, sweep.json/.md/.png, best.yaml.")
def sweep(trials, timeout, space, recipe, set_values, out, method_values, **options):
    """Search a method's settings on val with Optuna (TPE, median pruning); the best trial is tested once.

    Interrupted? Run the same command again: finished trials are kept (OUT/sweep.db).
    """
    from cliptune.commands.sweep import Sweep, read_space

    study = Sweep(out, recipe, _cli_values(**options), list(set_values), method_values,
                  space=read_space(space) if space else None)
    result = study.run(trials, timeout)
    best, zeroshot = result["best"], result["zeroshot"]
    _echo_result(f"best trial {best['number']}: val top-1 {best['val']:.4f}  test top-1 {best['test']['top1']:.4f}  "
                 f"({', '.join(f'{k}={v}' for k, v in best['params'].items())})")
    _echo_result(f"zero-shot: val top-1 {zeroshot['val']['top1']:.4f}  test top-1 {zeroshot['test']['top1']:.4f}")
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
