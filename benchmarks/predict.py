"""Inference throughput of an adapted model: `cliptune.load(...).logits` in PyTorch against its ONNX export.

Times preprocessed batches only (decoding and resizing are the same for both), after one warm-up batch,
and checks that both give the same top-1 on every image. Run it alone on the machine: timings on a
shared machine are meaningless.

    python benchmarks/predict.py RUN                          # any run folder or classifier export
    python benchmarks/predict.py RUN --batch-size 1 --batches 50
    python benchmarks/predict.py RUN --threads 4 --onnx /tmp/model.onnx
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def seconds_per_batch(run, images: torch.Tensor, batches: int) -> float:
    run(images)  # warm-up: caches, allocator, onnxruntime's graph optimisation
    began = time.perf_counter()
    for _ in range(batches):
        run(images)
    return (time.perf_counter() - began) / batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="run folder or classifier export")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads for both runtimes")
    parser.add_argument("--onnx", type=Path, help="existing ONNX export of SOURCE (else one is written to a temp folder)")
    args = parser.parse_args()

    import onnxruntime

    import cliptune
    from cliptune.deploy.classifier import probe_images
    from cliptune.deploy.onnx import INPUT_NAME, export_onnx

    torch.set_num_threads(args.threads)
    classifier = cliptune.load(args.source)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.onnx or export_onnx(args.source, Path(tmp) / "model.onnx")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = args.threads
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        images = probe_images(classifier, batch=args.batch_size)
        feeds = {INPUT_NAME: images.numpy()}
        same = torch.equal(classifier.logits(images).argmax(1), torch.from_numpy(session.run(None, feeds)[0]).argmax(1))
        torch_s = seconds_per_batch(classifier.logits, images, args.batches)
        onnx_s = seconds_per_batch(lambda _: session.run(None, feeds), images, args.batches)
    print(f"{classifier.method}, batch {args.batch_size}, {args.threads} thread(s), same top-1: {same}")
    print("| runtime      | ms / batch | images / s |")
    print("|--------------|------------|------------|")
    for name, seconds in (("pytorch", torch_s), ("onnxruntime", onnx_s)):
        print(f"| {name:<12} | {1000 * seconds:10.1f} | {args.batch_size / seconds:10.1f} |")


if __name__ == "__main__":
    main()
