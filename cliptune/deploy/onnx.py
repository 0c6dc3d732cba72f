"""`cliptune export RUN --format onnx --output FILE.onnx`: preprocessed images -> class logits, one ONNX graph.

The classifier of any run (or classifier export) is traced once in evaluation mode after one forward
pass, so whatever the method computes once per class list (learned prompts' text features, a linear
head, a zero-shot head) is baked in as constants, and what depends on the image (the image tower,
CoCoOp's per-image prompts, MaPLe's vision prompts) stays in the graph. A method that folds into CLIP's
weights (lora, full) is traced merged: a plain image tower and a fixed head. The batch axis is dynamic.
`FILE.json` beside it holds the classes and the preprocessing. Needs the `onnx` extra
(`pip install "cliptune[onnx]"`); after writing, onnxruntime must reproduce PyTorch's logits, at a
batch size other than the traced one, or nothing is kept.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import torch

from cliptune.deploy.classifier import SELF_CHECK_TOLERANCE, Classifier, export_classifier, load, merges, probe_images
from cliptune.core.errors import CliptuneError
from cliptune.core.runfolder import _atomic, atomic_write_json

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
OPSET = 17


def _require_onnx():
    try:
        import onnx  # noqa: F401
        import onnxruntime
    except ImportError:
        raise CliptuneError('ONNX export needs the onnx extra: pip install "cliptune[onnx]" (onnx and onnxruntime)') from None
    return onnxruntime


def check_output(output: Path) -> None:
    if output.suffix != ".onnx":
        raise CliptuneError(f"--output for an ONNX export must be a .onnx file, got {output}")


def sidecar_path(output: Path) -> Path:
    return output.with_suffix(".json")


def onnx_logits(path: str | Path, images: torch.Tensor) -> torch.Tensor:
    """Logits of an exported graph under onnxruntime (CPU)."""
    onnxruntime = _require_onnx()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: images.cpu().numpy()})[0])


def _trace(classifier: Classifier, path: Path) -> None:
    network = classifier.network.eval()
    example = probe_images(classifier, batch=2, seed=1)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the fused attention kernel has no ONNX form
    try:
        with torch.no_grad(), warnings.catch_warnings():
            network(example)  # fills per-class-list caches, so the trace sees them as constants
            warnings.simplefilter("ignore")  # tracer and legacy-exporter notices
            torch.onnx.export(network, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                              opset_version=OPSET, dynamo=False)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def export_onnx(source: str | Path, output: str | Path) -> Path:
    """Write `output` (.onnx) and its JSON sidecar for a run or classifier export; verified with onnxruntime."""
    output = Path(output)
    check_output(output)
    _require_onnx()
    classifier = load(source)
    with tempfile.TemporaryDirectory(dir=output.parent if output.parent.is_dir() else None) as tmp:
        traced = Path(tmp) / "model.onnx"
        merged = load(export_classifier(source, Path(tmp) / "merged", classifier)) if merges(classifier) else None
        try:
            _trace(merged or classifier, traced)
        except Exception as exc:  # noqa: BLE001 - the tracer's errors name internals; say what failed
            raise CliptuneError(f"method '{classifier.method}' could not be traced to ONNX: {type(exc).__name__}: {exc}") from None
        images = probe_images(classifier, batch=5)
        difference = float((onnx_logits(traced, images) - classifier.logits(images).cpu()).abs().max())
        if difference > SELF_CHECK_TOLERANCE:
            raise CliptuneError(f"the ONNX graph of method '{classifier.method}' does not reproduce PyTorch "
                                f"(logits differ by {difference:.2e} at batch 5); nothing was written")
        _atomic(output, lambda path: path.write_bytes(traced.read_bytes()))
    atomic_write_json(sidecar_path(output), {
        "format": "cliptune-onnx", "input": INPUT_NAME, "output": OUTPUT_NAME,
        "output_meaning": ("class logits; " + ("the sigmoid of each" if classifier.scoring == "sigmoid" else
                                                "softmax over the last axis") + " gives probabilities"
                           + ("; multi-label: a class is predicted when its probability reaches its threshold"
                              if classifier.thresholds is not None else "")),
        "thresholds": classifier.thresholds, "scores": classifier.scoring,
        "method": classifier.method, "classes": classifier.classes, "classnames": classifier.classnames,
        "preprocessing": classifier.preprocessing, "source": classifier.info["source"], "opset": OPSET,
    })
    return output
