"""Many classes: peak memory and step time of each method that encodes class prompts with gradients, against the
class count, with the text tower run in chunks of prompts under activation checkpointing (the default,
`--text-chunk 0`: as many prompts as fit 512 MB of activations, at most 128) and in one call.

    python benchmarks/many_classes.py [--methods coop,kgcoop,cocoop,maple,promptsrc,mocoop,lora,full] [--classes 10,100,1000,10000]
                                      [--steps 3] [--repeats 3] [--mmap-threshold 65536] [--one-call-up-to 1000]

Each setting runs in a fresh process on the bundled demo model, at the method's default batch size for 16 shots
(CoCoOp 1, MaPLe and PromptSRC 4, the others 32), with one prompt template (MoCoOp: the demo recipe's three, a prompt each); memory is the peak during training minus the
resident size before the first step, the median of `--repeats` processes. Run it alone on the machine.

The children run with glibc's mmap threshold fixed (`--mmap-threshold 65536`, MALLOC_MMAP_THRESHOLD_): by default
glibc raises it after each large free, so chunk after chunk of activations is carved from a heap that fragments and
never shrinks, and the resident size measures the allocator, not the computation (LoRA at 10000 classes: 1.6 GB
resident by default, 93 MB with the fixed threshold). The fixed threshold costs step time (every large block is a
fresh mapping), so step times are quoted from `--mmap-threshold 0` (glibc's default). Set the same variable for long
many-class runs on Linux when memory matters more than speed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
import psutil, torch
import torch.nn.functional as F
from cliptune.config.run import build_config
from cliptune.methods import build_method, method_class
from cliptune.training.session import model_from_config

name = sys.argv[1]
classes, chunk, steps = (int(a) for a in sys.argv[2:5])
model = model_from_config(build_config("demo"), "cpu")
options = {"text_chunk": chunk, **({"n_ctx": 4} if name == "coop" else {})}
templates = build_config("demo").templates if name == "mocoop" else ["a photo of a {}."]  # mocoop: one prompt each
method = build_method(name, model, [f"class number {i}" for i in range(classes)], templates, options).train()
batch = method_class(name).training_defaults(16)["batch_size"]
inputs = torch.randn(batch, model.text.output_dim) if method.uses_image_features else torch.randn(batch, 3, *model.image_size)
labels = torch.randint(0, classes, (batch,))
optimizer = torch.optim.SGD(method.trainable_parameters(), lr=1e-4, momentum=0.9)
before = psutil.Process().memory_info().rss
began = time.perf_counter()
for _ in range(steps):
    optimizer.zero_grad()
    method.loss(method(inputs), labels).backward()
    optimizer.step()
seconds = (time.perf_counter() - began) / steps
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"batch": batch, "step_s": seconds, "peak_mb": max(0, peak - before) / 2**20}))
"""


def run(name: str, classes: int, chunk: int, steps: int, repeats: int, threshold: int) -> str:
    """The median over `repeats` fresh processes (a process's peak resident size varies with the allocator)."""
    results = []
    for _ in range(repeats):
        done = subprocess.run([sys.executable, "-c", CHILD, name, str(classes), str(chunk), str(steps)],
                              capture_output=True, text=True, env=environment(threshold))
        if done.returncode:
            return f"failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}"
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    step, peak = (statistics.median(r[key] for r in results) for key in ("step_s", "peak_mb"))
    return f"{results[0]['batch']:>6} {step:>8.3f} {peak:>10.0f}"


def environment(threshold: int) -> dict:
    """The children's environment: glibc's mmap threshold fixed at `threshold` bytes (0: glibc's own default)."""
    env = {key: value for key, value in os.environ.items() if key != "MALLOC_MMAP_THRESHOLD_"}
    return {**env, "MALLOC_MMAP_THRESHOLD_": str(threshold)} if threshold else env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="coop,kgcoop,cocoop,maple,promptsrc,mocoop,lora,full")
    parser.add_argument("--classes", default="10,100,1000,10000")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per setting (medians are printed)")
    parser.add_argument("--mmap-threshold", type=int, default=65536, help="glibc's MALLOC_MMAP_THRESHOLD_ (0: its default)")
    parser.add_argument("--one-call-up-to", type=int, default=1000, help="largest class count also run in one call")
    args = parser.parse_args()
    print(f"{'method':>8} {'classes':>8} {'text calls':>12} {'batch':>6} {'step s':>8} {'peak MB':>10}")
    for name in args.methods.split(","):
        for classes in map(int, args.classes.split(",")):
            settings = [("chunked", 0)] + ([("one call", 10**9)] if classes <= args.one_call_up_to else [])
            for label, chunk in settings:
                print(f"{name:>8} {classes:>8} {label:>12} {run(name, classes, chunk, args.steps, args.repeats, args.mmap_threshold)}", flush=True)


if __name__ == "__main__":
    main()
