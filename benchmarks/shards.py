"""Reading webdataset shards keeps memory flat as the collection grows: indexing reads tar headers (and the tiny
`.cls` members), never image bytes, and a few-shot run copies out only its shots and evaluation images.

Writes 4, 16 and 64 training shards of 256 samples (each image 64 KB of PNG noise, so the images outweigh their
index a thousand times), then times `load_data(--shots 4)` on each and prints the peak Python heap it allocated
(tracemalloc), the shard bytes on disk, and the ratio of the two:

    python benchmarks/shards.py [--shards 4,16,64] [--per-shard 256]
"""

from __future__ import annotations

import argparse
import io
import os
import tarfile
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
from PIL import Image

from cliptune.data.sources import load_data

CLASSES = 10


def write_collection(out: Path, shards: int, per_shard: int) -> int:
    """`shards` training shards (and one val, one test) of noise images; returns the bytes written."""
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (148, 148, 3), dtype=np.uint8)).save(buffer, format="PNG")
    image = buffer.getvalue()  # one incompressible image, stored under every key
    out.mkdir(parents=True)
    (out / "classnames.txt").write_text("\n".join(f"class {c}" for c in range(CLASSES)) + "\n")
    names = [f"train-{n:06d}.tar" for n in range(shards)] + ["val-000000.tar", "test-000000.tar"]
    for name in names:
        with tarfile.open(out / name, "w") as tar:
            for i in range(per_shard if name.startswith("train") else 40):
                for suffix, payload in ((".png", image), (".cls", str(i % CLASSES).encode())):
                    info = tarfile.TarInfo(f"{name[:-4]}-{i:06d}{suffix}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return sum((out / name).stat().st_size for name in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", default="4,16,64")
    parser.add_argument("--per-shard", type=int, default=256)
    args = parser.parse_args()
    print("| training shards | samples | shards on disk (MB) | peak heap (MB) | heap / disk | seconds |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as scratch:
        os.environ["CLIPTUNE_CACHE"] = str(Path(scratch) / "cache")
        for count in (int(n) for n in args.shards.split(",")):
            folder = Path(scratch) / f"shards-{count}"
            disk = write_collection(folder, count, args.per_shard)
            tracemalloc.start()
            began = time.perf_counter()
            load_data(folder, shots=4, val_shots=4)
            seconds = time.perf_counter() - began
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            print(f"| {count} | {count * args.per_shard} | {disk / 2**20:.0f} | {peak / 2**20:.1f} | {peak / disk:.4f} | "
                  f"{seconds:.2f} |", flush=True)


if __name__ == "__main__":
    main()
