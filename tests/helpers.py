"""Synthetic ImageFolders and tiny model configs for fast, offline tests."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import torch

from PIL import Image

FIXTURES = Path(__file__).parent / "fixtures"
TINY_CONFIG = FIXTURES / "tiny-clip.json"
COLOURS = [(220, 40, 40), (40, 200, 60), (50, 70, 220), (230, 210, 40), (180, 60, 200), (40, 200, 210)]


def make_image(path: Path, colour, rng: random.Random, size: int = 32) -> None:
    """A noisy image dominated by one colour: easy to separate, not trivially identical."""
    image = Image.new("RGB", (size, size))
    pixels = image.load()
    for x in range(size):
        for y in range(size):
            pixels[x, y] = tuple(max(0, min(255, c + rng.randint(-60, 60))) for c in colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def make_imagefolder(root: Path, classes: Sequence[str] = ("red_apple", "green_leaf", "blue_sky"),
                     per_class: int = 10, splits: bool = False, seed: int = 0) -> Path:
    """Class folders directly under root, or under train/val/test when `splits`."""
    rng = random.Random(seed)
    layout = {"train": per_class, "val": max(2, per_class // 4), "test": max(2, per_class // 2)} if splits else {"": per_class}
    for split, count in layout.items():
        for index, name in enumerate(classes):
            for i in range(count):
                make_image(root / split / name / f"{i:03d}.png", COLOURS[index % len(COLOURS)], rng)
    return root


@contextmanager
def block_inputs(*block_lists):
    """Record the hidden states each block receives, one dict (block index -> tensor) per block list."""
    records, handles = [], []
    for blocks in block_lists:
        seen = {}
        records.append(seen)
        for index, block in enumerate(blocks):
            handles.append(block.register_forward_pre_hook(
                lambda _m, args, i=index, seen=seen: seen.__setitem__(i, args[0].detach().clone())))
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


def maple_block_inputs(method, model, images):
    """What every text and image block saw during one MaPLe forward, and the vision prompts used."""
    with block_inputs(model.text.blocks, model.image.blocks) as (text_seen, image_seen), torch.no_grad():
        method.text_features()
        method.image_features(images)
        vision = method.vision_prompts()
    return text_seen, image_seen, vision


def free_port() -> int:
    """A TCP port no process listens on now (the OS picks it), for a rendezvous that must not collide with another
    test run's on the same machine."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_two_processes_and_one(args, out: Path, quiet_two: bool = False, launcher: str = "torchrun"):
    """`cliptune ARGS` in two processes (into out/two, on a free port) started by `torchrun --nproc_per_node 2` or by
    `accelerate launch --multi_gpu --num_processes 2` (`launcher`; on a CPU-only machine both start gloo processes),
    and as one process (out/one, in this process: no second start-up); both must succeed. Returns (the two-process
    CompletedProcess, the one-process click Result)."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    quiet = ["--quiet"] if quiet_two else []
    if launcher == "torchrun":
        start = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2", "--master_port", str(port)]
    else:
        start = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
                 "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port)]
    two = subprocess.run([*start, "-m", "cliptune", *quiet, *args, "--out", str(out / "two")], capture_output=True,
                         text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    from click.testing import CliRunner

    from cliptune.cli import cli

    one = CliRunner().invoke(cli, ["--quiet", *args, "--out", str(out / "one")])
    assert one.exit_code == 0, one.output[-2000:]
    return two, one
