"""Where a run's wall time goes, and the training step against plain open_clip, for full, lora and maple.

    python benchmarks/time_to_result.py                          # both settings, methods at their defaults
    python benchmarks/time_to_result.py --setting bundled --methods lora
    python benchmarks/time_to_result.py --grad-checkpointing      # also each run with --grad-checkpointing
    python benchmarks/time_to_result.py --mixed-precision bf16    # runs and floor under bf16 autocast (GPU)
    python benchmarks/time_to_result.py --quick                   # smoke test: 1 epoch, 2 shots, 2 floor steps

Settings:
- bundled:  the demo CLIP on the bundled digits (`sample_data`), 16 shots;
- vit-b-32: a ViT-B-32-sized random model (`--model ViT-B-32` without --pretrained) on a tiny synthetic
            ImageFolder (8 classes; 4 train, 2 val and 4 test images per class, 256 x 256 PNGs: with the
            default batch of 32, one full batch per epoch).

Each run is `cliptune finetune --method M` (the method's defaults otherwise) in a fresh process, so the
start-up figure includes Python's imports. The wall-time split comes from the run's own timestamps
(metrics.json `time`: start-up, decoding, zero-shot pass, features, training, per-epoch validation,
final evaluation, checkpoints/other) and so does the peak memory (CUDA: max allocated; CPU: peak RSS).
After training, the same process times the floor on the run's batch size: plain open_clip forward +
backward of the image batch and every class prompt (benchmarks/lora.py's variants: for full, all
weights trainable + AdamW; for lora and maple, the frozen model with gradients through the
activations only; never checkpointed, so a `+ckpt` row's ratio shows what checkpointing costs). The
run's step is its training seconds per image x the batch size, so data
loading and augmentation count against it. Targets: training >= 70 % of wall; step <= 1.3 x floor.
Run it alone on the machine: other load inflates every figure.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("full", "lora", "maple")
SETTINGS = ("bundled", "vit-b-32")
FLOOR_OF = {"full": "full", "lora": "floor", "maple": "floor"}  # benchmarks/lora.py variant each method is held to
TRAIN_SHARE_TARGET, STEP_TARGET = 0.70, 1.3
PHASES = (("startup", "start"), ("decode", "decode"), ("zeroshot", "0-shot"), ("inputs", "feats"), ("train", "train"),
          ("eval", "val"), ("final_eval", "final"), ("other", "other"))


def tiny_imagefolder(root: Path, classes: int = 8, counts=(("train", 4), ("val", 2), ("test", 4)), side: int = 256) -> Path:
    """Noisy single-colour images, one colour per class: decoding and resizing cost like real photos of that size."""
    from PIL import Image

    rng = random.Random(0)
    for split, count in counts:
        for label in range(classes):
            colour = [rng.randint(0, 255) for _ in range(3)]
            folder = root / split / f"class_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                noise = bytes(max(0, min(255, c + rng.randint(-50, 50))) for _ in range(side * side) for c in colour)
                Image.frombytes("RGB", (side, side), noise).save(folder / f"{index}.png")
    return root


def finetune_args(setting: str, method: str, out: Path, data: Path, args) -> list:
    if setting == "bundled":
        model = ["--model-config", str(ROOT / "cliptune/assets/demo/demo-clip.json"),
                 "--pretrained", str(ROOT / "cliptune/assets/demo/demo-clip.safetensors")]
    else:
        model = ["--model", "ViT-B-32"]
    extra = ["--shots", str(args.shots)] if setting == "bundled" else []
    extra += ["--epochs", str(args.epochs)] if args.epochs else []
    extra += ["--steps", str(args.steps)] if args.steps else []
    extra += ["--mixed-precision", args.mixed_precision] if args.mixed_precision else []
    # --cache-dir run: each run encodes its own features (a warm shared cache would hide that phase)
    return ["finetune", *model, "--data", str(data), "--method", method, *extra, "--cache-dir", "run", "--out", str(out),
            "--overwrite"]


def one_run(argv: list, method: str, floor_steps: int) -> dict:
    """In this (fresh) process: the finetune run, then the floor step on the run's batch size."""
    import torch

    from cliptune.cli import cli
    from cliptune.config.run import load_config
    from cliptune.data.templates import load_templates

    cli.main(["--quiet", *argv], standalone_mode=False)
    out = Path(argv[argv.index("--out") + 1])
    metrics = json.loads((out / "metrics.json").read_text())
    config = load_config(out / "config.yaml")
    sys.path.insert(0, str(Path(__file__).parent))
    import lora as lora_benchmark  # the floor variants: one definition for both benchmarks

    device = "cuda" if torch.cuda.is_available() else "cpu"
    floor_args = argparse.Namespace(model=config.model, model_config=config.model_config, device=device,
                                    batch_size=config.batch_size, classes=len(metrics["classes"]),
                                    template_list=load_templates(config.templates))
    plain_step, _ = lora_benchmark._setup(FLOOR_OF[method], floor_args)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.mixed_precision)

    def step():  # under the run's autocast, as accelerate runs the run's steps
        with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            plain_step()

    step()  # warm-up
    times = []
    for _ in range(floor_steps):
        began = time.perf_counter()
        step()
        times.append(time.perf_counter() - began)
    train = metrics["train"]
    return {"time": metrics["time"], "step": train["seconds"] / max(1, train["images_seen"]) * config.batch_size,
            "floor": statistics.median(times), "batch_size": config.batch_size, "epochs": train["epochs"],
            "validated": sum("val_top1" in h for h in train["history"]), "top1": metrics["test"]["top1"], "device": device}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=(*SETTINGS, "all"), default="all")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma list of full, lora, maple")
    parser.add_argument("--shots", type=int, default=16, help="bundled setting: images per class")
    parser.add_argument("--epochs", type=int, help="override the methods' default epochs")
    parser.add_argument("--steps", type=int, help="an optimizer-step budget instead (e.g. for lora's 500 x shots steps on a CPU)")
    parser.add_argument("--floor-steps", type=int, default=5)
    parser.add_argument("--grad-checkpointing", action="store_true", help="also run each method with --grad-checkpointing")
    parser.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), help="passed to the runs; the floor uses the same autocast")
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 epoch, 2 shots, 2 floor steps")
    parser.add_argument("--one", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # child process: METHOD FLOOR_STEPS finetune-args...
        method, floor_steps, *argv = args.one
        print("RESULT " + json.dumps(one_run(argv, method, int(floor_steps))))
        return
    if args.quick:
        args.epochs, args.shots, args.floor_steps = args.epochs or 1, 2, 2
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    settings = SETTINGS if args.setting == "all" else (args.setting,)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for setting in settings:
            data = ROOT / "sample_data" if setting == "bundled" else tiny_imagefolder(Path(tmp) / "tiny")
            for method in methods:
                for checkpointing in ((False, True) if args.grad_checkpointing else (False,)):
                    argv = finetune_args(setting, method, Path(tmp) / f"{setting}-{method}-{checkpointing}", data, args)
                    argv += ["--grad-checkpointing"] if checkpointing else []
                    child = subprocess.run([sys.executable, __file__, "--one", method, str(args.floor_steps), *argv],
                                           capture_output=True, text=True, cwd=ROOT)
                    line = next((ln for ln in child.stdout.splitlines() if ln.startswith("RESULT ")), None)
                    if child.returncode or line is None:
                        sys.exit(f"{setting} {method} failed:\n{child.stderr[-3000:]}")
                    result = json.loads(line[len("RESULT "):])
                    rows.append((setting, method + (" +ckpt" if checkpointing else ""), result))
                    print(f"done: {setting} {rows[-1][1]}", file=sys.stderr)

    print(f"device {rows[0][2]['device']}; seconds of wall time per phase (from each run's metrics.json 'time')")
    header = f"{'setting':<9}{'method':<12}{'wall':>7}" + "".join(f"{label:>8}" for _, label in PHASES)
    print(header + f"{'train%':>8}{'step s':>9}{'floor s':>9}{'ratio':>7}{'peak MB':>9}{'epochs':>8}{'val':>5}{'top1':>7}")
    checks = []
    for setting, name, r in rows:
        t = r["time"]
        ratio = r["step"] / r["floor"]
        print(f"{setting:<9}{name:<12}{t['total']:>7.1f}" + "".join(f"{t.get(key, 0.0):>8.1f}" for key, _ in PHASES)
              + f"{t['train_share']:>8.0%}{r['step']:>9.3f}{r['floor']:>9.3f}{ratio:>7.2f}{t['peak_memory_mb']:>9.0f}"
              + f"{r['epochs']:>8}{r['validated']:>5}{r['top1']:>7.3f}")
        checks.append((f"{setting} {name}", t["train_share"], ratio))
    print(f"targets: training >= {TRAIN_SHARE_TARGET:.0%} of wall, step <= {STEP_TARGET} x floor "
          f"(batch {rows[0][2]['batch_size']}; floor: plain open_clip fwd+bwd, same batch, same process)")
    for name, share, ratio in checks:
        print(f"  {name:<24} train share {share:6.1%} {'ok' if share >= TRAIN_SHARE_TARGET else 'MISSED':<7}"
              f"step/floor {ratio:5.2f} {'ok' if ratio <= STEP_TARGET else 'MISSED'}")


if __name__ == "__main__":
    main()
