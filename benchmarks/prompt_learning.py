"""CoOp training cost: cached image features vs. the floor and vs. re-encoding the images every step.

CoOp's image tower is frozen, so cliptune encodes the training images once and each step runs only
the text encoder over the class prompts. This script times, on random data and a randomly initialised
model (no download):

* CoOp seconds/epoch through the real training loop (cliptune.training.engine.Trainer on cached features);
* the floor: one text-encoder forward+backward over all class prompts, times steps/epoch;
* the reference design that re-encodes each image batch with the frozen image tower every step;
* peak memory of each phase (CUDA: max allocated; CPU: process peak RSS so far).

    python benchmarks/prompt_learning.py                      # ViT-B-32, 10 classes, batch 32, n_ctx 16
    python benchmarks/prompt_learning.py --model-config tests/fixtures/tiny-clip.json --repeats 1   # smoke run
"""

from __future__ import annotations

import argparse
import math
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cliptune.training.session import make_accelerator  # noqa: E402
from cliptune.config.run import RunConfig  # noqa: E402
from cliptune.training.engine import Inputs, Trainer  # noqa: E402
from cliptune.methods import build_method  # noqa: E402
from cliptune.models.loading import load_model  # noqa: E402


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def timed(device: torch.device, work) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    began = time.perf_counter()
    work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--model-config", help="JSON open_clip config instead of --model (e.g. a tiny test model)")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--shots", type=int, default=16, help="training images per class")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--n-ctx", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2, help="timed epochs of each design (after a warm-up one); the minimum is reported")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    torch.manual_seed(0)
    device = torch.device(args.device)
    model = load_model(None if args.model_config else args.model, None, args.model_config, device=device)
    classnames = [f"class number {i}" for i in range(args.classes)]
    n = args.classes * args.shots
    steps = math.ceil(n / args.batch_size)
    labels = torch.arange(n) % args.classes
    height, width = model.image_size
    images = torch.randn(n, 3, height, width)
    print(f"model {model.spec.display_name} ({height}x{width} images, text context {model.text.context_length}, "
          f"width {model.text.width}) on {device}, {torch.get_num_threads()} threads; {args.classes} classes, "
          f"{n} training images, batch {args.batch_size} -> {steps} steps/epoch, n_ctx {args.n_ctx}")

    # cached features: what cliptune does once per run (timed, though not part of an epoch)
    def encode_all():
        with torch.no_grad():
            return torch.cat([model.image.encode(images[i : i + args.batch_size].to(device), normalize=False)
                              for i in range(0, n, args.batch_size)])

    features = []
    cache_seconds = timed(device, lambda: features.append(encode_all()))
    features = features[0].cpu()

    # 1. CoOp through the real training loop on cached features (one epoch per fit)
    config = RunConfig(method="coop", epochs=1, batch_size=args.batch_size, lr=0.002, optimizer="sgd",
                       methods={"coop": {"n_ctx": args.n_ctx}})
    method = build_method("coop", model, classnames, [], {"n_ctx": args.n_ctx}).to(device)
    accelerator = make_accelerator("no")
    train = Inputs(labels=labels, features=features)

    def coop_epoch() -> float:
        summary = Trainer(method, config, None, accelerator).fit(train, None, classnames)
        return summary.seconds

    # 2. the floor: text encoder forward+backward over all class prompts, once per step
    def text_pass():
        loss = F.normalize(method.prompts.encode(method.ctx), dim=-1).sum()
        loss.backward()
        method.ctx.grad = None

    def floor_epoch() -> float:
        return timed(device, lambda: [text_pass() for _ in range(steps)])

    # 3. the reference design: re-encode every image batch with the frozen image tower, then the same CoOp step
    optimizer = torch.optim.SGD(method.trainable_parameters(), lr=0.002, momentum=0.9)

    def reference_step(batch: slice):
        with torch.no_grad():
            image_features = model.image.encode(images[batch].to(device), normalize=False)
        loss = method.loss(method(image_features), labels[batch].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def reference_epoch() -> float:
        method.train()
        return timed(device, lambda: [reference_step(slice(i, i + args.batch_size)) for i in range(0, n, args.batch_size)])

    # warm-up pass in a fixed order, which also gives each design's peak memory
    reset_peak(device)
    times = {"coop": [coop_epoch()]}
    coop_memory = peak_memory_mib(device)
    times["floor"] = [floor_epoch()]
    reset_peak(device)
    times["reference"] = [reference_epoch()]
    reference_memory = peak_memory_mib(device)
    # timed repeats, interleaved so that load from other processes hits all three alike; report the minimum
    for _ in range(args.repeats):
        for name, run in (("coop", coop_epoch), ("floor", floor_epoch), ("reference", reference_epoch)):
            times[name].append(run())
    coop, floor, reference = (min(times[k][1:]) for k in ("coop", "floor", "reference"))

    memory_kind = "max allocated" if device.type == "cuda" else "process peak RSS so far"
    print(f"feature cache (once per run):            {cache_seconds:8.3f} s")
    print(f"CoOp on cached features (engine):        {coop:8.3f} s/epoch   peak memory {coop_memory:8.1f} MiB ({memory_kind})")
    print(f"floor (text fwd+bwd x {steps} steps):          {floor:8.3f} s/epoch   ratio CoOp/floor {coop / floor:.2f} (target <= 1.3)")
    print(f"reference (re-encode images every step): {reference:8.3f} s/epoch   peak memory {reference_memory:8.1f} MiB ({memory_kind})")
    print(f"speed-up of cached features over the reference: {reference / coop:.2f}x "
          f"(break-even after {cache_seconds / max(1e-9, reference - coop):.1f} epochs)")


if __name__ == "__main__":
    main()
