"""`cliptune export --format onnx`: onnxruntime gives PyTorch's logits (skipped without the onnx extra)."""

import json
import re

import pytest
import torch
from click.testing import CliRunner

import cliptune
from cliptune.cli import cli

onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

METHOD_OPTIONS = {
    "linear-probe": ["--lr", 0.05],
    "coop": ["--n-ctx", 2, "--lr", 0.05],
    "lora": ["--lora-dropout", 0, "--lr", 0.05],
    "cocoop": ["--n-ctx", 2, "--lr", 0.05],
    "maple": ["--n-ctx", 2, "--prompt-depth", 2, "--lr", 0.05],
    "full": ["--lr", 0.001],
}


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.mark.parametrize("method", list(METHOD_OPTIONS))
def test_onnx_logits_match_pytorch_at_any_batch_size(method, tiny_config, split_data, tmp_path):
    out = tmp_path / "run"
    result = run("finetune", "--data", split_data, "--model-config", tiny_config, "--method", method,
                 "--epochs", 1, "--batch-size", 8, *METHOD_OPTIONS[method], "--out", out)
    assert result.exit_code == 0, result.output
    target = tmp_path / "model.onnx"
    result = run("export", out, "--format", "onnx", "--output", target)
    assert result.exit_code == 0, result.output

    sidecar = json.loads(target.with_suffix(".json").read_text())
    classifier = cliptune.load(out)
    assert sidecar["classes"] == classifier.classes and sidecar["preprocessing"]["crop"] == [32, 32]
    session = onnxruntime.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    (batch_axis, *_), = [i.shape for i in session.get_inputs()]
    assert isinstance(batch_axis, str)  # dynamic batch
    import onnx

    names = [initializer.name for initializer in onnx.load(str(target)).graph.initializer]
    assert not any("lora_" in name for name in names)  # LoRA is traced merged into the weights
    # class text features are constants: the text tower is in the graph only where prompts depend on the image
    text_tower = [name for name in names if re.match(r"(.*\.)?clip\.transformer\.", name)]  # not clip.visual.transformer
    assert bool(text_tower) == (method == "cocoop")
    for batch in (1, 7, 130):  # 130: more images than CoCoOp evaluates per chunk (512 prompts / 4 classes)
        images = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        got = torch.from_numpy(session.run(None, {sidecar["input"]: images.numpy()})[0])
        assert got.shape == (batch, len(classifier.classes))
        assert (got - classifier.logits(images)).abs().max() < 1e-4


def test_onnx_export_of_a_classifier_export_and_refusals(tiny_config, split_data, tmp_path):
    zs = tmp_path / "zs"
    assert run("zeroshot", "--data", split_data, "--model-config", tiny_config, "--out", zs).exit_code == 0
    folder = tmp_path / "classifier"
    assert run("export", zs, "--format", "classifier", "--output", folder).exit_code == 0
    target = tmp_path / "zs.onnx"
    result = run("export", folder, "--format", "onnx", "--output", target)
    assert result.exit_code == 0, result.output
    images = torch.randn(3, 3, 32, 32)
    session = onnxruntime.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    assert (torch.from_numpy(session.run(None, {"image": images.numpy()})[0]) - cliptune.load(zs).logits(images)).abs().max() < 1e-4

    result = run("export", zs, "--format", "onnx", "--output", target)
    assert result.exit_code != 0 and "already exists" in result.output
    result = run("export", zs, "--format", "onnx", "--output", tmp_path / "model.bin")
    assert result.exit_code != 0 and "must be a .onnx file" in result.output
