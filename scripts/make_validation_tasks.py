#!/usr/bin/env python
"""Build cliptune's validation tasks: small few-shot tasks in domains other than the bundled digits, each with
its own tiny CLIP, for checking that method defaults hold beyond the sample data (see benchmarks/method_defaults.py).

Run from the repository root (needs scikit-image at build time only; nothing here is a runtime dependency)::

    pip install scikit-image
    python scripts/make_validation_tasks.py --out validation_tasks            # textures and shapes
    python scripts/make_validation_tasks.py --out /elsewhere --tasks photos,patterns   # held-out tasks

Tasks (8 classes; train 40 / val 10 / test 40 images per class, 32x32 RGB; a disjoint pretraining pool of 150
images per class trains the task's CLIP, with the demo's recipe from scripts/make_demo_assets.py):

- `textures`: crops of scikit-image's bundled photographs (`skimage.data`: brick, grass, gravel, coins, moon,
  Hubble deep field, immunohistochemistry stain, printed page; BSD-licensed sample data). The pretraining pool is
  cut from the left half of each photograph, the task's train/val/test crops from the right half.
- `shapes`: geometric shapes drawn with Pillow (random colours, size, rotation, position and noise).
- `photos`: crops of eight other scikit-image photographs (coffee, cat, astronaut, rocket, horse, camera man, retina,
  cell), cut as `textures`; its CLIP keeps the logit scale at its initial 14.3
  (`scale_schedule=False`), as an under-trained model would. Meant to be held out: build it outside the repository.
- `patterns`: two-colour periodic patterns drawn with numpy (checkerboard, dots, waves, zigzag, grid, spiral,
  rings, blotches; random colours, frequency, phase and rotation); held out like `photos`, its CLIP at 14.3 too.

Each task is written as `OUT/<task>/{train,val,test}/<class>/<i>.png` plus `OUT/<task>/validation-<task>-clip.json`
and `.safetensors` (an open_clip config and state_dict, loaded with `--model-config` / `--pretrained`).
Building is seeded and deterministic; it takes about 1.5 minutes per task on one CPU thread.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_demo_assets as demo  # noqa: E402  (the tiny-CLIP recipe and model config)

import open_clip  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

SIZE = 32
COUNTS = {"pretrain": 150, "train": 40, "val": 10, "test": 40}
TEMPLATES = ["a photo of a {}.", "a picture of {}.", "an image of {}.", "{}."]
TEXTURES = {"brick": "brick", "grass": "grass", "gravel": "gravel", "coins": "coins", "moon": "moon",
            "hubble_deep_field": "stars", "immunohistochemistry": "tissue", "page": "text"}
PHOTOS = {"coffee": "coffee", "chelsea": "cat", "astronaut": "astronaut", "rocket": "rocket", "horse": "horse",
          "camera": "camera man", "retina": "retina", "cell": "cell"}
SHAPES = ["circle", "square", "triangle", "star", "cross", "ring", "diamond", "stripes"]
PATTERNS = ["checkerboard", "dots", "waves", "zigzag", "grid", "spiral", "rings", "blotches"]
HELD_OUT = ("photos", "patterns")  # their CLIPs keep the initial logit scale, as an under-trained model would
# bands of each photograph's width: the pretraining pool, and the few-shot task's splits (drawn alike, so that val
# predicts test as in a real few-shot task)
BANDS = {"pretrain": (0.0, 0.5), "train": (0.5, 1.0), "val": (0.5, 1.0), "test": (0.5, 1.0)}


def texture_crop(photo: np.ndarray, split: str, rng: np.random.Generator) -> Image.Image:
    height, width = photo.shape[:2]
    low, high = (int(b * width) for b in BANDS[split])
    side = int(rng.integers(24, max(25, min(96, high - low, height))))
    x = int(rng.integers(low, high - side + 1))
    y = int(rng.integers(0, height - side + 1))
    crop = Image.fromarray(photo[y:y + side, x:x + side]).convert("RGB").resize((SIZE, SIZE), Image.BICUBIC)
    return crop.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop


def _colour(rng):
    return tuple(int(c) for c in rng.integers(0, 256, 3))


def _noisy(image: Image.Image, rng) -> Image.Image:
    pixels = np.asarray(image, dtype=np.int16) + rng.integers(-25, 26, (SIZE, SIZE, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def shape_image(name: str, rng: np.random.Generator) -> Image.Image:
    scale = 4  # draw large, downsample: smooth edges
    canvas = Image.new("RGB", (SIZE * scale, SIZE * scale), _colour(rng))
    draw = ImageDraw.Draw(canvas)
    colour = _colour(rng)
    r = rng.uniform(0.25, 0.42) * SIZE * scale
    cx, cy = (rng.uniform(0.4, 0.6) * SIZE * scale for _ in range(2))
    turn = rng.uniform(0, 2 * math.pi)

    def polygon(points):
        return [(cx + px * math.cos(turn) - py * math.sin(turn), cy + px * math.sin(turn) + py * math.cos(turn)) for px, py in points]

    if name == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif name == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=colour, width=int(r * 0.3))
    elif name == "square":
        draw.polygon(polygon([(-r, -r), (r, -r), (r, r), (-r, r)]), fill=colour)
    elif name == "diamond":
        draw.polygon(polygon([(0, -r), (0.6 * r, 0), (0, r), (-0.6 * r, 0)]), fill=colour)
    elif name == "triangle":
        draw.polygon(polygon([(r * math.cos(a), r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]), fill=colour)
    elif name == "star":
        draw.polygon(polygon([((r if k % 2 == 0 else 0.45 * r) * math.cos(-math.pi / 2 + k * math.pi / 5),
                               (r if k % 2 == 0 else 0.45 * r) * math.sin(-math.pi / 2 + k * math.pi / 5)) for k in range(10)]),
                     fill=colour)
    elif name == "cross":
        w = 0.3 * r
        draw.polygon(polygon([(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w)]),
                     fill=colour)
    else:  # stripes
        for k in range(-3, 4, 2):
            draw.polygon(polygon([(k * r / 3.5, -1.5 * r), ((k + 1) * r / 3.5, -1.5 * r), ((k + 1) * r / 3.5, 1.5 * r),
                                  (k * r / 3.5, 1.5 * r)]), fill=colour)
    return _noisy(canvas.resize((SIZE, SIZE), Image.LANCZOS), rng)


def pattern_image(name: str, rng: np.random.Generator) -> Image.Image:
    """A two-colour periodic pattern at a random frequency, phase and rotation (drawn at 4x, downsampled)."""
    n = SIZE * 4
    turn = rng.uniform(0, 2 * math.pi)
    y, x = np.mgrid[-1:1:n * 1j, -1:1:n * 1j]
    x, y = x - rng.uniform(-0.3, 0.3), y - rng.uniform(-0.3, 0.3)
    u, v = x * math.cos(turn) - y * math.sin(turn), x * math.sin(turn) + y * math.cos(turn)
    f, phase = rng.uniform(2.5, 5.0) * math.pi, rng.uniform(0, 2 * math.pi)
    radius, angle = np.hypot(u, v), np.arctan2(v, u)
    if name == "checkerboard":
        mask = np.sin(f * u + phase) * np.sin(f * v + phase) > 0
    elif name == "dots":
        mask = np.cos(f * u + phase) + np.cos(f * v + phase) > 1.1
    elif name == "waves":
        mask = np.sin(f * u + 1.5 * np.sin(2.5 * v + phase)) > 0
    elif name == "zigzag":
        mask = np.sin(f * (u + 0.35 * np.abs((v * 2.5 + phase) % 2 - 1))) > 0
    elif name == "grid":
        mask = (np.abs(np.sin(f * u + phase)) < 0.3) | (np.abs(np.sin(f * v + phase)) < 0.3)
    elif name == "spiral":
        mask = np.sin(3 * angle + 2 * f * radius + phase) > 0
    elif name == "rings":
        mask = np.sin(2 * f * radius + phase) > 0
    else:  # blotches: smoothed noise, thresholded
        coarse = rng.normal(size=(6, 6))
        mask = np.asarray(Image.fromarray(coarse.astype(np.float32)).resize((n, n), Image.BICUBIC)) > 0
    pixels = np.where(mask[..., None], np.array(_colour(rng)), np.array(_colour(rng))).astype(np.uint8)
    return _noisy(Image.fromarray(pixels).resize((SIZE, SIZE), Image.LANCZOS), rng)


def task_images(task: str, split: str, rng: np.random.Generator) -> dict:
    """{class word: [PIL images]} for one split of one task."""
    count = COUNTS[split]
    if task in ("shapes", "patterns"):
        draw, names = (shape_image, SHAPES) if task == "shapes" else (pattern_image, PATTERNS)
        return {name: [draw(name, rng) for _ in range(count)] for name in names}
    import skimage.data

    sources = TEXTURES if task == "textures" else PHOTOS
    photos = {word: np.asarray(getattr(skimage.data, name)()) for name, word in sources.items()}
    return {word: [texture_crop(photo, split, rng) for _ in range(count)] for word, photo in photos.items()}


def build(task: str, out: Path) -> None:
    root = out / task
    if root.exists():
        shutil.rmtree(root)
    rng = np.random.default_rng({"textures": 1, "shapes": 2, "photos": 3, "patterns": 4}[task])
    pools = {split: task_images(task, split, rng) for split in COUNTS}
    for split in ("train", "val", "test"):
        for word, images in pools[split].items():
            (root / split / word).mkdir(parents=True, exist_ok=True)
            for i, image in enumerate(images):
                image.save(root / split / word / f"{i}.png")

    name = f"validation-{task}-clip"
    config_path = root / f"{name}.json"
    config_path.write_text(json.dumps(demo.MODEL_CFG, indent=4) + "\n")
    open_clip.add_model_config(config_path)  # registered under the file's stem, the task's own name
    _, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
    norm = [t for t in preprocess.transforms if type(t).__name__ == "Normalize"][0]
    words = list(pools["pretrain"])
    x_all = torch.stack([torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
                         for word in words for image in pools["pretrain"][word]])
    y_all = torch.tensor([c for c, word in enumerate(words) for _ in pools["pretrain"][word]])
    demo.seed_everything(demo.SEED)
    model, seconds, _ = demo.train_clip(name, x_all, y_all, words, TEMPLATES, norm.mean, norm.std, open_clip.get_tokenizer(name),
                                        scale_schedule=task not in HELD_OUT)
    save_file({k: v.detach().float().contiguous() for k, v in model.state_dict().items()}, str(root / f"{name}.safetensors"))
    print(f"{task}: {len(words)} classes, CLIP trained in {seconds:.0f} s, logit scale {float(model.logit_scale.detach().exp()):.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--tasks", default="textures,shapes", help="comma list of textures, shapes, photos, patterns")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for task in args.tasks.split(","):
        build(task, args.out)


if __name__ == "__main__":
    main()
