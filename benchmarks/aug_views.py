"""Accuracy and time against the size of the augmented-view bank (`--aug-views N`) on the bundled data.

With a frozen image tower the training images are encoded once per view; each epoch draws one view per
image. This prints, for methods on cached features, the test top-1 and the wall time of each bank size
(N = 0 is the plain view, no augmentation), so the default bank can be chosen from the curve.

    python benchmarks/aug_views.py [--methods coop,clip-adapter] [--views 0,4,8,16,32] [--steps 200]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from cliptune.commands import api
from cliptune.config.run import build_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="coop,clip-adapter,tip-adapter-f")
    parser.add_argument("--views", default="0,4,8,16,32")
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seeds", default="1,2")
    args = parser.parse_args()
    views = [int(v) for v in args.views.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"bundled data (recipe demo: crops 0.8-1, no flips), {args.shots} shots, {args.steps} steps, seeds {seeds}")
    print("| method | views | test top-1 (mean over seeds) | wall s (mean) |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            for count in views:
                top1, seconds = [], []
                for seed in seeds:
                    config = build_config("demo", {"method": method, "shots": args.shots, "steps": args.steps,
                                                   "aug_views": count, "seed": seed})
                    began = time.perf_counter()
                    metrics = api.finetune(config, Path(tmp) / f"{method}-{count}-{seed}")
                    seconds.append(time.perf_counter() - began)
                    top1.append(metrics["test"]["top1"])
                print(f"| {method} | {count} | {100 * sum(top1) / len(top1):.1f} | {sum(seconds) / len(seconds):.1f} |", flush=True)


if __name__ == "__main__":
    main()
