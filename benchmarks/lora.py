"""Seconds per training step and peak memory: LoRA vs full fine-tuning vs the frozen-backbone floor.

    python benchmarks/lora.py                      # ViT-B-32-sized random model, CPU, a few steps
    python benchmarks/lora.py --device cuda --batch-size 32 --steps 20

All three run the same classification step (images through the image tower, every class prompt
through the text tower, logits, cross-entropy, backward):

- lora:  cliptune's `--method lora` (r=2 on q,k,v of both towers) + AdamW on the adapter;
- full:  every CLIP weight trainable + AdamW;
- floor: the frozen model, gradients flowing only through activations (input pixels and token
         embeddings require grad), no optimizer: no adapter can be cheaper than this.

Peak memory (peak RSS on CPU, peak allocated on CUDA) is measured with each variant alone in a
fresh process; step times in one process with the variants' steps interleaved. Targets: lora step <= 1.2x floor and <= 1.0x full; lora peak <= 0.7x full.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import statistics
import time

VARIANTS = ("lora", "full", "floor")


def _peak_mb(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _setup(variant: str, args):
    """Build one variant; returns (step function, trainable parameter count)."""
    import torch
    import torch.nn.functional as F

    from cliptune.methods import build_method
    from cliptune.models.loading import load_model

    torch.manual_seed(0)
    model = load_model(args.model, None, getattr(args, "model_config", None), device=args.device)
    classnames = [f"class {i}" for i in range(args.classes)]
    templates = getattr(args, "template_list", None) or [
        "a photo of a {}.", "a close-up photo of a {}.", "an image of a {}.", "a good photo of a {}."][: args.templates]
    images = torch.randn(args.batch_size, 3, *model.image_size, device=args.device)
    labels = torch.randint(args.classes, (args.batch_size,), device=args.device)
    text = model.text
    tokens = text.tokenize([t.format(c) for c in classnames for t in templates])

    def plain_logits(input_grad: bool):
        embeddings, pixels = text.embed_tokens(tokens), images
        if input_grad:
            embeddings, pixels = embeddings.detach().requires_grad_(), images.detach().requires_grad_()
        features = F.normalize(text.encode_embeddings(embeddings, tokens), dim=-1)
        classes = F.normalize(features.view(args.classes, len(templates), -1).mean(dim=1), dim=-1)
        return model.logit_scale * F.normalize(model.clip.encode_image(pixels), dim=-1) @ classes.T

    if variant == "lora":
        method = build_method("lora", model, classnames, templates, {}).train()
        forward, trainable = (lambda: method(images)), method.trainable_parameters()
    elif variant == "full":
        model.clip.requires_grad_(True)
        forward, trainable = (lambda: plain_logits(False)), list(model.clip.parameters())
    else:
        model.clip.requires_grad_(False)
        forward, trainable = (lambda: plain_logits(True)), []
    optimizer = torch.optim.AdamW(trainable, lr=1e-5) if trainable else None

    def step():
        F.cross_entropy(forward(), labels).backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    return step, sum(p.numel() for p in trainable)


def _memory(variant: str, args, queue) -> None:
    """In a fresh process: peak memory of one variant over a warm-up and one measured step."""
    step, trainable = _setup(variant, args)
    setup_mb = _peak_mb(args.device)
    for _ in range(args.warmup + 1):
        step()
    queue.put({"peak_mb": _peak_mb(args.device), "setup_mb": setup_mb, "trainable": trainable})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--templates", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()

    context = multiprocessing.get_context("spawn")
    results = {}
    for variant in VARIANTS:
        queue = context.Queue()
        process = context.Process(target=_memory, args=(variant, args, queue))
        process.start()
        results[variant] = queue.get()
        process.join()
    # timing: all three in this process, steps interleaved, so a busy machine slows each variant alike
    steps = {variant: _setup(variant, args)[0] for variant in VARIANTS}
    times = {variant: [] for variant in VARIANTS}
    for index in range(args.warmup + args.steps):
        for variant, step in steps.items():
            began = time.perf_counter()
            step()
            if index >= args.warmup:
                times[variant].append(time.perf_counter() - began)
    for variant in VARIANTS:
        results[variant]["seconds"] = statistics.median(times[variant])

    print(f"{args.model} (random init) on {args.device}: batch {args.batch_size}, {args.classes} classes x "
          f"{args.templates} template(s), median of {args.steps} steps after {args.warmup} warm-up")
    print(f"{'variant':<8}{'s/step':>9}{'peak MB':>10}{'setup MB':>10}{'trainable':>12}")
    for variant, r in results.items():
        print(f"{variant:<8}{r['seconds']:>9.3f}{r['peak_mb']:>10.0f}{r['setup_mb']:>10.0f}{r['trainable']:>12,}")
    lora, full, floor = (results[v] for v in VARIANTS)
    checks = [
        ("lora step / floor step", lora["seconds"] / floor["seconds"], 1.2),
        ("lora step / full step", lora["seconds"] / full["seconds"], 1.0),
        ("lora peak / full peak", lora["peak_mb"] / full["peak_mb"], 0.7),
    ]
    for name, ratio, target in checks:
        print(f"{name:<24}{ratio:6.2f}  (target <= {target}) {'ok' if ratio <= target else 'MISSED'}")


if __name__ == "__main__":
    main()
