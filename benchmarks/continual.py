"""Every continual strategy on the continual demo and on the validation tasks: how much of the never-trained control
classes' zero-shot accuracy each keeps, and the MTIL metrics.

The demo is `recipes/continual-demo.yaml` as it ships. Each validation task (`python scripts/make_validation_tasks.py
--out validation_tasks`) is cut like the demo, whose control is four classes: its 8 classes in folder order, the first
two are task 1, the next two task 2, the last four the control (a control of two classes was at chance, or at 100 %
and never forgotten, so it could not tell strategies apart); the reference images (zscl) are the task classes' validation images; the budget is
the demo recipe's (full fine-tuning, 16 shots, 5 epochs, lr 1e-4, batch 16).

    python benchmarks/continual.py --tasks validation_tasks [--strategies naive,lwf,lwf-vr,zscl,wise,modx]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from cliptune.config.run import build_config
from cliptune.continual import STRATEGIES
from cliptune.continual.loop import continual, continual_defaults
from cliptune.data.templates import DEFAULT_TEMPLATES


def task_values(root: Path) -> dict:
    """continual-demo's settings with a validation task's classes, CLIP and templates."""
    classes = sorted(folder.name for folder in (root / "train").iterdir() if folder.is_dir())
    first, second, control = classes[:2], classes[2:4], classes[4:]
    config = next(root.glob("validation-*-clip.json"))
    return {"model_config": str(config), "pretrained": str(config.with_suffix(".safetensors")),
            "tasks": [f"{root}:{','.join(first)}", f"{root}:{','.join(second)}"], "controls": [f"{root}:{','.join(control)}"],
            "reference": f"{root}/val:{','.join(first + second)}", "templates": list(DEFAULT_TEMPLATES)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=Path, help="folder written by scripts/make_validation_tasks.py")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    args = parser.parse_args()
    settings = {"demo": {}}
    if args.tasks:
        settings.update({folder.name: task_values(folder) for folder in sorted(args.tasks.iterdir())
                         if folder.is_dir() and any(folder.glob("validation-*-clip.json"))})
    print("| setting | strategy | control after t1 / t2 | Transfer | Avg | Last |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as scratch:
        for name, values in settings.items():
            for strategy in args.strategies.split(","):
                config = build_config("continual-demo", {**values, "strategy": strategy}, protocol=continual_defaults)
                result = continual(config, Path(scratch) / name / strategy)
                if strategy == args.strategies.split(",")[0]:
                    print(f"| {name} | zero-shot | {result['zeroshot_control'][0]:.3f} | | | |")
                control = " / ".join(f"{row[0]:.3f}" for row in result["control_acc"])
                print(f"| {name} | {strategy} | {control} | {result['transfer']:.3f} | {result['avg']:.3f} | {result['last']:.3f} |",
                      flush=True)


if __name__ == "__main__":
    main()
