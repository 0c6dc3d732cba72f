"""Contrastive fine-tuning on image-caption pairs against class templates: does pairing each image with its own
caption (`--caption-prob`) change the class-based test accuracy, at the defaults a user gets?

Neither the bundled digits nor the validation tasks ship captions, so this writes one for every image from what
the image shows beyond its class: its brightness and its dominant colour ("a dark red picture of a star"), into a
CSV manifest beside the images (`path,label,caption`, the layout a user's caption manifest has). Each setting then
runs `--method full --loss contrastive` (FLYP's loss and defaults) with `--caption-prob` 0 (class templates only,
FLYP as published), 0.5 and 1, and soft-contrastive at 1:

    python scripts/make_validation_tasks.py --out validation_tasks
    python benchmarks/captions.py --tasks validation_tasks [--shots 16] [--seed 1]
"""

from __future__ import annotations

import argparse
import csv
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from cliptune.commands import api
from cliptune.config.run import build_config
from cliptune.data.folders import display_name, image_files_under
from validation_tasks import task_settings

COLOURS = {"red": (200, 40, 40), "green": (40, 170, 60), "blue": (40, 60, 200), "yellow": (220, 210, 40),
           "purple": (150, 50, 170), "cyan": (40, 190, 200), "orange": (230, 130, 30), "white": (235, 235, 235),
           "grey": (128, 128, 128), "black": (20, 20, 20), "brown": (120, 80, 40), "pink": (230, 140, 180)}


def describe(image: Path, classname: str) -> str:
    """`a {brightness} {colour} picture of a {class}` from the image's pixels."""
    pixels = np.asarray(Image.open(image).convert("RGB"), dtype=np.float32).reshape(-1, 3)
    brightness = ("dark", "plain", "bright")[min(2, int(pixels.mean() / 256 * 3))]
    # the colour farthest from grey is the one that stands out (a shape on a background, a stain, a leaf)
    salient = pixels[np.argmax(np.abs(pixels - pixels.mean(axis=1, keepdims=True)).sum(axis=1))]
    colour = min(COLOURS, key=lambda name: float(((np.array(COLOURS[name]) - salient) ** 2).sum()))
    return f"a {brightness} {colour} picture of a {classname}"


def caption_manifest(root: Path, out: Path) -> Path:
    """Every image of the ImageFolder `root` (split folders kept as the split column) with its caption."""
    with out.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "split", "caption"])
        for image in image_files_under(root):
            split, label = image.relative_to(root).parts[:2]
            writer.writerow([str(image.resolve()), label, split, describe(image, display_name(label))])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=Path, help="folder written by scripts/make_validation_tasks.py")
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    runs = [("contrastive", 0.0), ("contrastive", 0.5), ("contrastive", 1.0), ("soft-contrastive", 1.0)]
    print(f"Test top-1 (%), {args.shots} shots, seed {args.seed}, --method full at its defaults.\n")
    print("| setting | zero-shot | " + " | ".join(f"{loss} p={p:g}" for loss, p in runs) + " |")
    print("|---|---|" + "---|" * len(runs))
    with tempfile.TemporaryDirectory() as scratch:
        for name, (root, values) in task_settings(args.tasks).items():
            values = dict(values)
            recipe = values.pop("recipe", None)
            manifest = caption_manifest(root, Path(scratch) / f"{name}.csv")
            cells, zeroshot = [], None
            for loss, probability in runs:
                config = build_config(recipe, {**values, "data": str(manifest), "method": "full", "shots": args.shots,
                                               "seed": args.seed}, method_values={"loss": loss, "caption_prob": probability})
                metrics = api.finetune(config, Path(scratch) / name / f"{loss}-{probability}")
                zeroshot = metrics["zeroshot"]["top1"]
                cells.append(f"{100 * metrics['test']['top1']:.1f}")
            print(f"| {name} | {100 * zeroshot:.1f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
