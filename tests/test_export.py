"""`cliptune export`: merged files plain open_clip loads, adapters `cliptune eval` reloads, clear refusals."""

import json

import open_clip
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from cliptune.cli import cli
from cliptune.deploy.export import load_run_method, merged_state_dict
from cliptune.models.loading import load_model
from cliptune.models.zeroshot import zeroshot_weights

TEMPLATES = ["a photo of a {}.", "a {} leaf."]


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def lora_run(tiny_config, split_data, tmp_path_factory):
    """A tiny LoRA run (random init, high lr, so the adapter really moves) with its own templates."""
    out = tmp_path_factory.mktemp("lora") / "run"
    templates = out.parent / "templates.txt"
    templates.write_text("\n".join(TEMPLATES) + "\n")
    result = run("finetune", "--data", split_data, "--model-config", tiny_config, "--templates", templates,
                 "--method", "lora", "--lora-dropout", 0, "--epochs", 1, "--lr", 0.05, "--batch-size", 8,
                 "--out", out)
    assert result.exit_code == 0, result.output
    return out


def test_merged_export_loads_in_plain_open_clip_and_reproduces_the_run(lora_run, tiny_config, split_data, tmp_path):
    metrics = json.loads((lora_run / "metrics.json").read_text())
    assert metrics["train"]["trainable_params"] == 3 * (2 * 2) * (2 * 64 + 2 * 32)
    out = tmp_path / "merged.safetensors"
    result = run("export", lora_run, "--format", "merged", "--output", out)
    assert result.exit_code == 0, result.output

    # a fresh, plain open_clip model from the file gives the run's (unmerged) logits
    open_clip.add_model_config(tiny_config)
    fresh, _, _ = open_clip.create_model_and_transforms("tiny-clip", pretrained=str(out))
    method = load_run_method(lora_run)
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = method(images)
        model = load_model(model_config=tiny_config)
        model.clip = fresh.eval()
        weights = zeroshot_weights(model.text, method.classnames, TEMPLATES)
        got = model.logit_scale * F.normalize(fresh.encode_image(images), dim=-1) @ weights.T
    assert (got - expected).abs().max() < 1e-4
    base = load_model(model_config=tiny_config).clip.state_dict()
    assert any(not torch.equal(base[k], v) for k, v in merged_state_dict(lora_run).items())  # LoRA really merged

    # and `cliptune zeroshot --pretrained FILE` with the run's templates gives the run's test accuracy
    templates = lora_run.parent / "templates.txt"
    zs = run("zeroshot", "--data", split_data, "--model-config", tiny_config, "--pretrained", out,
             "--templates", templates, "--out", tmp_path / "zs")
    assert zs.exit_code == 0, zs.output
    zeroshot = json.loads((tmp_path / "zs" / "metrics.json").read_text())
    assert abs(zeroshot["test"]["top1"] - metrics["test"]["top1"]) < 1e-3


def test_adapter_export_is_small_and_reloads_through_eval(lora_run, tmp_path):
    metrics = json.loads((lora_run / "metrics.json").read_text())
    out = tmp_path / "adapter"
    result = run("export", lora_run, "--format", "adapter", "--output", out)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 2
    assert (out / "adapter_model.safetensors").stat().st_size < 20_000
    evaluated = run("eval", lora_run, "--adapter", out, "--json")
    assert evaluated.exit_code == 0, evaluated.output
    report = json.loads(evaluated.output[evaluated.output.index("{"):])
    # the same predictions as the run, to the NLL; the run's NLL is not the base model's, so an adapter
    # that loaded nothing (LoRA B = 0) would fail this
    assert report["test"]["per_class"] == metrics["test"]["per_class"]
    assert report["test"]["nll"] == pytest.approx(metrics["test"]["nll"], abs=1e-5)
    assert abs(metrics["test"]["nll"] - metrics["zeroshot"]["nll"]) > 1e-3
    # exporting again needs --overwrite
    again = run("export", lora_run, "--format", "adapter", "--output", out)
    assert again.exit_code == 2 and "--overwrite" in again.output


def test_adapter_from_another_setup_is_refused(lora_run, tiny_config, split_data, tmp_path):
    other = tmp_path / "r4"
    result = run("finetune", "--data", split_data, "--model-config", tiny_config, "--method", "lora", "--lora-r", 4,
                 "--lora-towers", "text", "--epochs", 1, "--out", other)
    assert result.exit_code == 0, result.output
    assert run("export", other, "--format", "adapter", "--output", tmp_path / "a4").exit_code == 0
    evaluated = run("eval", lora_run, "--adapter", tmp_path / "a4")
    assert evaluated.exit_code == 2 and "different setup" in evaluated.output


def test_unmergeable_method_and_bad_output_are_clear_errors(lora_run, tiny_config, split_data, tmp_path):
    probe = tmp_path / "probe"
    result = run("finetune", "--data", split_data, "--model-config", tiny_config, "--method", "linear-probe",
                 "--epochs", 1, "--out", probe)
    assert result.exit_code == 0, result.output
    refused = run("export", probe, "--format", "merged", "--output", tmp_path / "m.safetensors")
    assert refused.exit_code == 2
    assert "method 'linear-probe' cannot be exported as 'merged'" in refused.output and "lora" in refused.output
    assert not (tmp_path / "m.safetensors").exists()
    wrong_suffix = run("export", lora_run, "--format", "merged", "--output", tmp_path / "model.pt")
    assert wrong_suffix.exit_code == 2 and ".safetensors" in wrong_suffix.output
    missing = run("export", tmp_path / "nothing", "--format", "adapter", "--output", tmp_path / "a")
    assert missing.exit_code == 2 and "error:" in missing.output
