"""The `cliptune` command line: parses options and calls the library (cliptune.api).

torch, open_clip and accelerate are imported inside the commands that use them, so `--help`, `recipes`
and option errors answer at once.
"""

from __future__ import annotations

import json
import logging
import os
import sys

import click

from cliptune import progress
from cliptune.config import build_config
from cliptune.errors import CliptuneError

log = logging.getLogger("cliptune")


class CliptuneGroup(click.Group):
    """Turns CliptuneError (and anything unexpected) into one line on stderr and a non-zero exit."""

    def invoke(self, ctx):
        debug = "--debug" in sys.argv or ctx.params.get("debug", False)
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
    progress.ENABLED = not quiet
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

data_options = option_group([
    click.option("--data", type=click.Path(), help="ImageFolder root (class folders, or train/ val/ test/ of them)."),
    click.option("--val-fraction", type=float, help="Validation share when the data has no val/ folder [0.1]."),
    click.option("--test-fraction", type=float, help="Test share when the data has no test/ folder [0.2]."),
    click.option("--classnames", type=click.Path(), help="YAML mapping class folder -> name (or {name, descriptions})."),
    click.option("--templates", type=click.Path(), help="Prompt templates file (one per line, each with '{}')."),
    click.option("--seed", type=int, help="Seed for splits, shots, initialisation and training [0]."),
    click.option("--strict/--no-strict", default=None, help="Fail on unreadable image files instead of skipping them."),
])


TRAINING_OPTIONS = [
    click.option("--shots", type=int, help="Images per class sampled from train (seeded)."),
    click.option("--epochs", type=int),
    click.option("--lr", type=float),
    click.option("--batch-size", type=int, help="Global batch size (split across processes)."),
    click.option("--optimizer", help="adamw | sgd | lion"),
    click.option("--weight-decay", type=float),
    click.option("--warmup-steps", type=int),
    click.option("--grad-accum", type=int, help="Gradient accumulation steps."),
    click.option("--mixed-precision", help="no | fp16 | bf16"),
    click.option("--label-smoothing", type=float, help="Label smoothing added to any loss [0]."),
    click.option("--aug-views", type=int, help="Augmented views cached per training image when the image tower is frozen (0 = none)."),
    click.option("--num-workers", type=int, help="DataLoader workers for image decoding."),
    click.option("--recipe", help="Recipe name (recipes/NAME.yaml) or YAML path."),
    click.option("--set", "set_values", multiple=True, metavar="KEY=VALUE", help="Override any config key (highest precedence)."),
    click.option("--out", required=True, type=click.Path(), help="Run folder to write."),
    click.option("--resume", is_flag=True, help="Continue the interrupted run in --out from its last checkpoint."),
    click.option("--overwrite", is_flag=True, help="Replace a finished run in --out."),
]


training_options = option_group(TRAINING_OPTIONS)  # shared by finetune and continual


def _cli_values(**values):
    return {key: value for key, value in values.items() if value is not None}


# Method options as CLI flags: each goes into the `<method>:` section of the run's method, e.g.
# `--n-ctx 4` with `--method coop` sets `coop.n_ctx`. Methods add their flags here.
METHOD_FLAGS = [
    click.option("--linear-probe-init", "init", help="linear-probe head initialisation: zeroshot | random."),
    click.option("--lora-r", "lora_r", type=int, help="lora: rank of each update [2]."),
    click.option("--lora-alpha", "lora_alpha", type=float, help="lora: scaling numerator (update x alpha/r) [1]."),
    click.option("--lora-dropout", "lora_dropout", type=float, help="lora: dropout on the LoRA branch [0.25]."),
    click.option("--lora-towers", "lora_towers", help="lora: towers to adapt, comma list of vision,text [vision,text]."),
    click.option("--lora-targets", "lora_targets", help="lora: attention projections, comma list of q,k,v,out [q,k,v]."),
    click.option("--lora-layers", "lora_layers", help="lora: blocks to adapt: all, or indices/ranges like 6-11 [all]."),
    click.option("--train-towers", "train_towers", help="full: towers to fine-tune, comma list of vision,text [vision,text]."),
    click.option("--unlock-last", "unlock_last", type=int, help="full: train only the last N blocks of each tower (+ final norms/projections) [all]."),
    click.option("--lock-logit-scale/--no-lock-logit-scale", "lock_logit_scale", default=None, help="full: keep the logit scale fixed [lock]."),
    click.option("--loss", "loss", type=click.Choice(["ce", "contrastive", "soft-target"]), help="full: ce | contrastive (FLYP) | soft-target [ce]."),
    click.option("--soft-epsilon", "soft_epsilon", type=float, help="full: soft-target share moved to similar classes [0.1]."),
    click.option("--soft-tau", "soft_tau", type=float, help="full: soft-target class-similarity temperature [0.05]."),
    click.option("--n-ctx", "n_ctx", type=int, help="coop/cocoop/maple: learned context tokens [16/4/2]."),
    click.option("--ctx-init", "ctx_init", help="coop/cocoop/maple: initialise the context from this phrase, e.g. 'a photo of a'."),
    click.option("--class-specific/--no-class-specific", "class_specific", default=None, help="coop: one context per class (CSC) [off]."),
    click.option("--class-token-position", "class_token_position", type=click.Choice(["end", "middle", "front"]), help="coop: where the class name goes [end]."),
    click.option("--prompt-depth", "prompt_depth", type=int, help="maple: layers carrying prompts, input included [9]."),
]
METHOD_FLAG_NAMES = ["init", "lora_r", "lora_alpha", "lora_dropout", "lora_towers", "lora_targets", "lora_layers", "train_towers", "unlock_last", "lock_logit_scale", "loss", "soft_epsilon", "soft_tau", "n_ctx", "ctx_init", "class_specific", "class_token_position", "prompt_depth"]


method_flags = option_group(METHOD_FLAGS)


def _split_method_values(options: dict) -> tuple[dict, dict]:
    method_values = {name: options.pop(name) for name in METHOD_FLAG_NAMES if name in options}
    return options, method_values


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
    from cliptune import api

    config = build_config(recipe, _cli_values(**options), list(set_values))
    metrics = api.zeroshot(config, out, split=split, overwrite=overwrite)
    result = metrics[split]
    _echo_result(f"zero-shot {split}: top-1 {result['top1']:.4f}  top-5 {result['top5']:.4f}  n={result['n']}")


@cli.command()
@model_options
@data_options
@click.option("--method", help="Adaptation method [linear-probe].")
@click.option("--base-novel/--no-base-novel", default=None, help="Base-to-novel protocol: train on the first half of the classes, test on base and novel.")
@training_options
@method_flags
def finetune(recipe, set_values, out, resume, overwrite, **options):
    """Adapt the model with a method, then evaluate on the test split."""
    from cliptune import api

    options, method_values = _split_method_values(options)
    config = None if resume else build_config(recipe, _cli_values(**options), list(set_values), method_values)
    metrics = api.finetune(config, out, overwrite=overwrite, resume=resume)
    zs, test = metrics["zeroshot"], metrics["test"]
    _echo_result(f"zero-shot test: top-1 {zs['top1']:.4f}  top-5 {zs['top5']:.4f}")
    _echo_result(f"{metrics['method']} test: top-1 {test['top1']:.4f}  top-5 {test['top5']:.4f}  n={test['n']}")
    if "novel" in metrics:
        _echo_result(f"zero-shot novel: top-1 {metrics['zeroshot_novel']['top1']:.4f}  harmonic mean {metrics['zeroshot_hm']:.4f}")
        _echo_result(f"{metrics['method']} novel: top-1 {metrics['novel']['top1']:.4f}  harmonic mean {metrics['hm']:.4f}")
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
    from cliptune import api

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
    from cliptune.wise import parse_alphas, wise_sweep

    result = wise_sweep(run, data, parse_alphas(alphas))
    for alpha, val, test in zip(result["alphas"], result["val_top1"], result["test_top1"]):
        _echo_result(f"alpha {alpha:.2f}: val top-1 {val:.4f}  test top-1 {test:.4f}")
    _echo_result(f"best alpha (on val): {result['best_alpha']:g}")


@cli.command("export")
@click.argument("run", type=click.Path())
@click.option("--format", "fmt", required=True,
              help="merged: whole open_clip model with the method merged (.safetensors); adapter: peft adapter folder.")
@click.option("--output", required=True, type=click.Path(), help="File (merged) or folder (adapter) to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --output.")
@click.option("--wise-alpha", type=float, help="merged only: write the WiSE-FT mixture (1-A)*zero-shot + A*fine-tuned.")
def export_command(run, fmt, output, overwrite, wise_alpha):
    """Export a finished run's best weights for use outside cliptune."""
    from cliptune.export import export_run

    path = export_run(run, fmt, output, overwrite=overwrite, wise_alpha=wise_alpha)
    _echo_result(f"wrote {fmt} export to {path}")


@cli.command()
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
@click.option("--wise-alpha", type=float, help="wise: weight of the fine-tuned model after each task [0.5].")
@training_options
@method_flags
def continual(recipe, set_values, out, resume, overwrite, tasks, controls, **options):
    """Learn a sequence of tasks, measuring forgetting and zero-shot transfer (MTIL metrics)."""
    from cliptune.continual import continual as run_continual

    config = None
    if not resume:
        options, method_values = _split_method_values(options)
        values = _cli_values(**options, tasks=list(tasks) or None, controls=list(controls) or None)
        if "method" not in values and build_config(recipe, values, list(set_values)).method == "linear-probe":
            # continual learning needs a mergeable method; its default is full fine-tuning
            values["method"] = "full"
        config = build_config(recipe, values, list(set_values), method_values)
    result = run_continual(config, out, overwrite=overwrite, resume=resume)
    _echo_result(f"{result['strategy']} ({result['method']}): transfer {result['transfer']:.4f}  avg {result['avg']:.4f}  last {result['last']:.4f}")
    _echo_result(f"run folder: {out}  (continual.json, continual.png)")


@cli.group()
def recipes():
    """List and show the bundled recipes."""


@recipes.command("list")
def recipes_list():
    """Name, domain, method, model and summary of every bundled recipe."""
    from cliptune import recipes as recipe_lib

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
    from cliptune import recipes as recipe_lib

    click.echo(recipe_lib.show(name), nl=False)


@cli.command()
def info():
    """Versions, devices and accelerate state."""
    from cliptune import api

    click.echo(json.dumps(api.environment_info(), indent=2))


def main() -> None:
    cli(prog_name="cliptune")


if __name__ == "__main__":
    main()
