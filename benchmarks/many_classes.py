"""Prompt learning with many classes: peak memory and step time of CoOp's training step against the class count,
with the text tower run in chunks of classes under activation checkpointing (`--set coop.text_chunk=N`; by default
128 at a time beyond 128 classes) and in one call.

    python benchmarks/many_classes.py [--classes 10,100,1000] [--steps 5] [--batch 32]

Each setting runs in a fresh process (its peak resident memory is its own); memory is the peak during training
minus the resident size before the first step. Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
import psutil, torch
import torch.nn.functional as F
from cliptune.config.run import build_config
from cliptune.methods import build_method
from cliptune.training.session import model_from_config

classes, chunk, steps, batch = (int(a) for a in sys.argv[1:5])
model = model_from_config(build_config("demo"), "cpu")
method = build_method("coop", model, [f"class number {i}" for i in range(classes)], ["a photo of a {}."],
                      {"n_ctx": 4, "text_chunk": chunk}).train()
optimizer = torch.optim.SGD(method.trainable_parameters(), lr=0.002, momentum=0.9)
features = torch.randn(batch, model.clip.text_projection.shape[1])
labels = torch.randint(0, classes, (batch,))
before = psutil.Process().memory_info().rss
began = time.perf_counter()
for _ in range(steps):
    optimizer.zero_grad()
    F.cross_entropy(method(features), labels).backward()
    optimizer.step()
seconds = (time.perf_counter() - began) / steps
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"step_s": seconds, "peak_mb": max(0, peak - before) / 2**20}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", default="10,100,1000")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    print(f"{'classes':>8} {'text calls':>12} {'step s':>8} {'training peak MB':>17}")
    for classes in map(int, args.classes.split(",")):
        for label, chunk in (("chunked", 0), ("one call", 10**9)):
            done = subprocess.run([sys.executable, "-c", CHILD, str(classes), str(chunk), str(args.steps), str(args.batch)],
                                  capture_output=True, text=True)
            if done.returncode:
                print(f"{classes:>8} {label:>12}  failed: {done.stderr.strip().splitlines()[-1]}")
                continue
            result = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{classes:>8} {label:>12} {result['step_s']:>8.3f} {result['peak_mb']:>17.0f}")


if __name__ == "__main__":
    main()
