"""Every method at its defaults against zero-shot, on the bundled demo and on the validation tasks.

A default is kept only when it holds on more than one task, so this prints one table with a column per task
(test top-1 %, 16 shots, one CPU-sized `--steps` budget for every method that trains, `compare`'s cells), the
zero-shot row first and `<` after each result that ends below zero-shot. Build the tasks first
(`python scripts/make_validation_tasks.py --out validation_tasks`):

    python benchmarks/method_defaults.py --tasks validation_tasks [--steps 200] [--seeds 1] [--out runs/method-defaults]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cliptune.commands.compare import compare
from cliptune.methods import METHODS


def task_options(root: Path) -> dict:
    """compare()'s data and model options for a validation task folder (its ImageFolder and its own CLIP)."""
    config = next(root.glob("validation-*-clip.json"))
    return {"data": str(root), "options": {"model_config": str(config), "pretrained": str(config.with_suffix(".safetensors"))}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=Path, help="folder written by scripts/make_validation_tasks.py")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--seeds", default="1")
    parser.add_argument("--out", type=Path, default=Path("runs/method-defaults"))
    args = parser.parse_args()
    methods, seeds = args.methods.split(","), [int(s) for s in args.seeds.split(",")]
    tasks = {"demo": {"recipe": "demo"}}
    if args.tasks:
        tasks.update({folder.name: task_options(folder) for folder in sorted(args.tasks.iterdir())
                  if folder.is_dir() and any(folder.glob("validation-*-clip.json"))})  # other folders are not tasks
    results = {}
    for name, task in tasks.items():
        results[name] = compare(args.out / name, methods, [args.shots], seeds, steps=args.steps, **task)
    print(f"Test top-1 (%), {args.shots} shots, --steps {args.steps}, seeds {args.seeds}; '<': below zero-shot.\n")
    print("| method | " + " | ".join(results) + " |")
    print("|---|" + "---|" * len(results))
    zeroshot = {name: r["zeroshot"][0]["top1_mean"] for name, r in results.items()}
    print("| zero-shot | " + " | ".join(f"{100 * z:.1f}" for z in zeroshot.values()) + " |")
    for method in methods:
        cells = []
        for name, r in results.items():
            entry = next(e for e in r["summary"] if e["method"] == method)
            top1 = entry["top1_mean"]
            cells.append("failed" if top1 is None else f"{100 * top1:.1f}" + (" <" if top1 < zeroshot[name] else ""))
        print(f"| {method} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
