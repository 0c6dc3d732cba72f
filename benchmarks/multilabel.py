"""Multi-label adaptation at the defaults a user gets: test mAP of zero-shot and of each multi-label method on
multi-label sets built from the bundled digits and from the validation tasks.

Each image is a 2x2 grid whose cells show one to three images of the source set's split (the other cells blank), and
its labels are the classes shown (a class may repeat). The grids are written as `path,labels,split` manifests (the
source's train/val/test images stay in their split), then every method runs `cliptune finetune` on them with
`--shots 16`, seed 1, and the CPU-sized `--steps 200` budget of benchmarks/method_defaults.py (its lr rescaled as
a user's `--steps` run is), nothing else set:

    python scripts/make_validation_tasks.py --out validation_tasks
    python benchmarks/multilabel.py --tasks validation_tasks [--methods linear-probe,coop,lora,full]
"""

from __future__ import annotations

import argparse
import csv
import random
import tempfile
from pathlib import Path

from PIL import Image

from cliptune.commands import api
from cliptune.config.run import build_config
from cliptune.data.folders import image_files_under
from validation_tasks import task_settings

GRIDS = {"train": 240, "val": 40, "test": 120}


def grid_manifest(root: Path, out: Path, seed: int = 0) -> Path:
    """Write 2x2 grids of `root`'s images (an ImageFolder with split folders) and their `path,labels,split` manifest."""
    rng = random.Random(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    with (out / "grids.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "labels", "split"])
        for split, count in GRIDS.items():
            pool = image_files_under(root / split)
            for i in range(count):
                chosen = rng.sample(pool, rng.randint(1, 3))
                cells = rng.sample(range(4), len(chosen))
                with Image.open(chosen[0]) as first:
                    size = first.size[0]
                grid = Image.new("RGB", (2 * size, 2 * size))
                for image, cell in zip(chosen, cells):
                    with Image.open(image) as tile:
                        grid.paste(tile.convert("RGB").resize((size, size)), ((cell % 2) * size, (cell // 2) * size))
                name = f"images/{split}-{i:04d}.png"
                grid.save(out / name)
                writer.writerow([name, "|".join(sorted({image.parent.name for image in chosen})), split])
    return out / "grids.csv"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=Path, help="folder written by scripts/make_validation_tasks.py")
    parser.add_argument("--methods", default="linear-probe,coop,lora,full")
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    methods = args.methods.split(",")
    print(f"Test mAP (%), 2x2 grids of 1-3 images, {args.shots} shots per class, --steps {args.steps}, seed {args.seed}.\n")
    print("| setting | zero-shot | " + " | ".join(methods) + " |")
    print("|---|---|" + "---|" * len(methods))
    with tempfile.TemporaryDirectory() as scratch:
        for name, (root, values) in task_settings(args.tasks).items():
            values = dict(values)
            recipe = values.pop("recipe", None)
            manifest = grid_manifest(root, Path(scratch) / name)
            cells, zeroshot = [], None
            for method in methods:
                config = build_config(recipe, {**values, "data": str(manifest), "method": method, "shots": args.shots,
                                               "seed": args.seed, "steps": args.steps})
                metrics = api.finetune(config, Path(scratch) / name / method)
                zeroshot = metrics["zeroshot"]["map"]
                cells.append(f"{100 * metrics['test']['map']:.1f}")
            print(f"| {name} | {100 * zeroshot:.1f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
