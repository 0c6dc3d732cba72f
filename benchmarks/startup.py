"""Start-up times of everyday commands (run alone on an idle machine; the README quotes these).

    python benchmarks/startup.py [--repeats 5]

Prints the median wall time of `cliptune --help`, `cliptune recipes list` and `cliptune finetune --help`
(fresh processes); the phases before the first training step of a cached-feature run (the demo recipe with CoOp,
run once to fill a fresh cache, then timed: its metrics.json `time` block) beside the time a bare interpreter
takes to import open_clip and accelerate; and how long `load_model("ViT-B-32", "openai")` takes to fail against a
hub that accepts connections but never answers (a loopback server; nothing outside this machine is contacted).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_startup import Blackhole  # noqa: E402


def wall(command, env=None) -> float:
    began = time.perf_counter()
    subprocess.run(command, capture_output=True, env=env, check=False)
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    cliptune = [sys.executable, "-m", "cliptune"]
    for label, extra in (("cliptune --help", ["--help"]), ("cliptune recipes list", ["recipes", "list"]),
                         ("cliptune finetune --help", ["finetune", "--help"])):
        times = [wall(cliptune + extra) for _ in range(args.repeats)]
        print(f"{label:28s} median {statistics.median(times):6.2f} s  (min {min(times):.2f}, {args.repeats} runs)")
    cached_run_phases(cliptune, args.repeats)
    hub = Blackhole()
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(Path("/tmp") / f"cliptune-startup-{os.getpid()}"), NO_PROXY="*")
    seconds = wall(cliptune + ["zeroshot", "--model", "ViT-B-32", "--pretrained", "openai", "--data", "sample_data",
                               "--out", f"/tmp/cliptune-startup-run-{os.getpid()}"], env)
    hub.close()
    print(f"{'unreachable hub, whole command':28s} {seconds:6.2f} s  ({len(hub.connections)} connection(s) to the hub)")


def cached_run_phases(cliptune, repeats: int) -> None:
    """Start-up, zero-shot and feature phases of a CoOp demo run whose features are cached (medians of `repeats`)."""
    folder = Path(tempfile.mkdtemp(prefix="cliptune-startup-"))
    env = {**os.environ, "CLIPTUNE_CACHE": str(folder / "cache")}
    run = cliptune + ["finetune", "--recipe", "demo", "--method", "coop", "--steps", "1"]
    subprocess.run(run + ["--out", str(folder / "fill")], capture_output=True, env=env, check=True)
    phases = []
    for index in range(repeats):
        subprocess.run(run + ["--out", str(folder / f"run{index}")], capture_output=True, env=env, check=True)
        phases.append(json.loads((folder / f"run{index}" / "metrics.json").read_text())["time"])
    for name in ("startup", "zeroshot", "inputs"):
        print(f"{'cached run: ' + name:28s} median {statistics.median(p[name] for p in phases):6.2f} s")
    first_step = statistics.median(p["startup"] + p["zeroshot"] + p["inputs"] + p["decode"] for p in phases)
    bare = statistics.median(wall([sys.executable, "-c", "import open_clip, accelerate"]) for _ in range(repeats))
    print(f"{'cached run: to first step':28s} median {first_step:6.2f} s  (a bare `import open_clip, accelerate`: "
          f"{bare:.2f} s)")


if __name__ == "__main__":
    main()
