"""What a sweep costs beyond its trials' training: target at most 1.3x (sum of the trials' training + one start-up
+ one feature pass), since every trial shares one open session (model and data loaded once, features encoded once).

    python benchmarks/sweep.py [--method coop] [--trials 6] [--steps 200] [--recipe demo]

Prints the sweep's wall time, its parts, and the ratio; run it alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from cliptune.commands.sweep import Sweep
from cliptune.methods import method_class


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="demo")
    parser.add_argument("--method", default="coop")
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "sweep"
        began = time.perf_counter()
        # cache_dir run: the sweep encodes its own features once (a warm shared cache would hide that pass)
        sweep = Sweep(out, args.recipe, {"method": args.method, "shots": args.shots, "steps": args.steps, "cache_dir": "run"}, [])
        startup = time.perf_counter() - began
        encoding = time.perf_counter()  # the test split, encoded once for the best trial's test evaluation
        sweep.session.inputs("test", method_class(args.method).uses_image_features)
        test_features = time.perf_counter() - encoding
        result = sweep.run(args.trials)
        total = time.perf_counter() - began
        trials = [json.loads((out / t["run"] / "metrics.json").read_text()) for t in result["trials"] if t["state"] == "complete"]
    # a pruned trial stops inside training and records only its wall time: counted whole, as training
    pruned = sum(t["seconds"] for t in result["trials"] if t["state"] == "pruned")
    training = sum(m["train"]["seconds"] for m in trials) + pruned
    validation = sum(m["train"]["eval_seconds"] for m in trials)
    # one feature pass: every split encoded once (train and val by the first trial, which every later one reads)
    features = trials[0]["time"]["inputs"] + test_features
    budget = training + startup + features
    print(f"{args.method}, {args.shots} shots, --steps {args.steps}: {len(trials)} finished trials "
          f"({len(result['trials']) - len(trials)} pruned)")
    print(f"sweep wall {total:.1f} s = start-up {startup:.1f} s + trials and the final test evaluation {total - startup:.1f} s")
    print(f"trials' training {training:.1f} s (pruned trials' {pruned:.1f} s of it; + validation passes {validation:.1f} s), "
          f"one feature pass {features:.1f} s (test split {test_features:.1f} s)")
    print(f"ratio: sweep wall / (training + start-up + feature pass) = {total / budget:.2f}x (target <= 1.3x)")
    print(f"ratio with the validation passes counted as training: {total / (budget + validation):.2f}x")


if __name__ == "__main__":
    main()
