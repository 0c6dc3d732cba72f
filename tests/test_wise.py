"""WiSE-FT: exact endpoints of the interpolation, and the val/test sweep of a full fine-tuning run."""

import json

import pytest
import torch
from click.testing import CliRunner

from cliptune.cli import cli
from cliptune.core.errors import CliptuneError
from cliptune.data.templates import load_templates
from cliptune.commands.wise import parse_alphas
from cliptune.deploy.wise import run_weights
from cliptune.models.interpolation import interpolate


def test_interpolate_endpoints_are_exact_and_the_middle_is_linear():
    generator = torch.Generator().manual_seed(0)
    zeroshot = {"w": torch.randn(4, 3, generator=generator), "steps": torch.tensor([3])}
    finetuned = {"w": torch.randn(4, 3, generator=generator), "steps": torch.tensor([3])}
    assert torch.equal(interpolate(zeroshot, finetuned, 0)["w"], zeroshot["w"])
    assert torch.equal(interpolate(zeroshot, finetuned, 1)["w"], finetuned["w"])
    assert torch.allclose(interpolate(zeroshot, finetuned, 0.25)["w"], 0.75 * zeroshot["w"] + 0.25 * finetuned["w"])
    assert interpolate(zeroshot, finetuned, 0.5)["steps"].dtype == torch.int64
    with pytest.raises(CliptuneError, match="in \\[0, 1\\]"):
        interpolate(zeroshot, finetuned, 1.5)
    with pytest.raises(CliptuneError, match="different keys"):
        interpolate(zeroshot, {"w": finetuned["w"]}, 0.5)
    with pytest.raises(CliptuneError, match="comma-separated"):
        parse_alphas("0,half,1")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_config, split_data):
    out = tmp_path_factory.mktemp("wise") / "run"
    result = CliRunner().invoke(cli, ["finetune", "--model-config", tiny_config, "--data", str(split_data),
                                      "--method", "full", "--epochs", "2", "--batch-size", "8", "--lr", "0.002",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_wise_sweep_reproduces_zeroshot_and_finetuned_accuracy(full_run):
    result = CliRunner().invoke(cli, ["wise", str(full_run), "--alphas", "0,0.5,1"])
    assert result.exit_code == 0, result.output
    wise = json.loads((full_run / "wise.json").read_text())
    metrics = json.loads((full_run / "metrics.json").read_text())
    assert set(wise) == {"alphas", "val_top1", "test_top1", "best_alpha"} and wise["alphas"] == [0, 0.5, 1]
    assert metrics["test"]["top1"] > metrics["zeroshot"]["top1"]  # the two endpoints are distinguishable
    assert wise["test_top1"][0] == metrics["zeroshot"]["top1"]
    assert wise["test_top1"][-1] == metrics["test"]["top1"] and wise["val_top1"][-1] == metrics["val"]["top1"]
    best = max(range(3), key=lambda i: (wise["val_top1"][i], -i))
    assert wise["best_alpha"] == wise["alphas"][best]
    assert (full_run / "wise.png").stat().st_size > 1000
    assert "best alpha (on val)" in result.output


def test_run_weights_differ_only_where_training_happened(full_run):
    _, zeroshot, finetuned = run_weights(full_run)
    assert set(zeroshot) == set(finetuned) == {"clip"}  # the zero-shot head has no weights of its own
    zeroshot, finetuned = zeroshot["clip"], finetuned["clip"]
    changed = {k for k in zeroshot if not torch.equal(zeroshot[k], finetuned[k])}
    assert changed and "logit_scale" not in changed  # locked by default
    assert any(k.startswith("visual.") for k in changed) and any(k.startswith("transformer.") for k in changed)


def test_wise_needs_mergeable_weights_or_a_linear_head(tiny_config, split_data, tmp_path):
    out = tmp_path / "coop"
    result = CliRunner().invoke(cli, ["finetune", "--model-config", tiny_config, "--data", str(split_data),
                                      "--method", "coop", "--n-ctx", "2", "--epochs", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(cli, ["wise", str(out)])
    assert result.exit_code == 2 and "needs a run whose weights merge into CLIP or a linear head" in result.output


def _zeroshot_top1(tiny_config, data, pretrained, out):
    result = CliRunner().invoke(cli, ["zeroshot", "--model-config", tiny_config, "--pretrained", str(pretrained),
                                      "--data", str(data), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return json.loads((out / "metrics.json").read_text())["test"]["top1"]


def test_export_wise_alpha_endpoints(full_run, tiny_config, split_data, tmp_path):
    from safetensors.torch import load_file

    files = {}
    for alpha in ("0", "1", "0.5"):
        files[alpha] = tmp_path / f"wise-{alpha}.safetensors"
        result = CliRunner().invoke(cli, ["export", str(full_run), "--format", "merged", "--wise-alpha", alpha,
                                          "--output", str(files[alpha])])
        assert result.exit_code == 0, result.output
    merged = tmp_path / "merged.safetensors"
    assert CliRunner().invoke(cli, ["export", str(full_run), "--format", "merged", "--output", str(merged)]).exit_code == 0
    _, zeroshot, finetuned = run_weights(full_run)
    zeroshot, finetuned = zeroshot["clip"], finetuned["clip"]
    assert not any(path.name.endswith(".head.safetensors") for path in tmp_path.iterdir())
    mixes = {alpha: load_file(str(path)) for alpha, path in files.items()}
    assert all(torch.equal(mixes["0"][k], zeroshot[k]) for k in zeroshot)
    assert all(torch.equal(mixes["1"][k], v) for k, v in load_file(str(merged)).items())
    assert torch.allclose(mixes["0.5"]["visual.proj"], (zeroshot["visual.proj"] + finetuned["visual.proj"]) / 2)
    # the exported files are plain open_clip checkpoints: zero-shot with them gives the run's two accuracies
    metrics = json.loads((full_run / "metrics.json").read_text())
    assert _zeroshot_top1(tiny_config, split_data, files["0"], tmp_path / "zs0") == metrics["zeroshot"]["top1"]
    assert _zeroshot_top1(tiny_config, split_data, files["1"], tmp_path / "zs1") == metrics["test"]["top1"]
    result = CliRunner().invoke(cli, ["export", str(full_run), "--format", "merged", "--wise-alpha", "2",
                                      "--output", str(tmp_path / "bad.safetensors")])
    assert result.exit_code == 2 and "in [0, 1]" in result.output


def test_export_wise_alpha_of_a_lora_run_mixes_its_merged_weights(tiny_config, split_data, tmp_path):
    from safetensors.torch import load_file

    run = tmp_path / "lora"
    result = CliRunner().invoke(cli, ["finetune", "--model-config", tiny_config, "--data", str(split_data),
                                      "--method", "lora", "--epochs", "1", "--batch-size", "8", "--lr", "0.01",
                                      "--out", str(run)])
    assert result.exit_code == 0, result.output
    for args in (["--wise-alpha", "1", "--output", str(tmp_path / "one.safetensors")],
                 ["--output", str(tmp_path / "merged.safetensors")]):
        result = CliRunner().invoke(cli, ["export", str(run), "--format", "merged", *args])
        assert result.exit_code == 0, result.output
    one, merged = load_file(str(tmp_path / "one.safetensors")), load_file(str(tmp_path / "merged.safetensors"))
    assert one.keys() == merged.keys() and all(torch.equal(one[k], merged[k]) for k in one)
    result = CliRunner().invoke(cli, ["export", str(run), "--format", "adapter", "--wise-alpha", "0.5",
                                      "--output", str(tmp_path / "adapter")])
    assert result.exit_code == 2 and "only applies to --format merged" in result.output


def _wise_endpoints(run):
    result = CliRunner().invoke(cli, ["wise", str(run), "--alphas", "0,0.5,1"])
    assert result.exit_code == 0, result.output
    return json.loads((run / "wise.json").read_text()), json.loads((run / "metrics.json").read_text())


@pytest.fixture(scope="module")
def linear_head_run(tmp_path_factory, tiny_config, split_data):
    out = tmp_path_factory.mktemp("wise-linear") / "run"
    result = CliRunner().invoke(cli, ["finetune", "--model-config", tiny_config, "--data", str(split_data),
                                      "--method", "full", "--set", "full.head=linear", "--train-towers", "vision",
                                      "--epochs", "2", "--batch-size", "8", "--lr", "0.002", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_wise_of_a_linear_head_run_interpolates_the_head_too(linear_head_run, tiny_config):
    from cliptune.models.loading import load_model
    from cliptune.models.zeroshot import zeroshot_weights

    _, zeroshot, finetuned = run_weights(linear_head_run)
    assert set(zeroshot) == set(finetuned) == {"clip", "head"}
    model = load_model(model_config=tiny_config)
    classes = json.loads((linear_head_run / "checkpoints/best/method.json").read_text())["classes"]
    # WiSE-FT's zero-shot head: zero-shot weights x logit scale, bias 0
    expected = zeroshot_weights(model.text, classes, load_templates(None)) * model.clip.logit_scale.exp()
    assert torch.allclose(zeroshot["head"]["weight"], expected, atol=1e-5) and not zeroshot["head"]["bias"].any()
    assert not torch.equal(zeroshot["head"]["weight"], finetuned["head"]["weight"])
    wise, metrics = _wise_endpoints(linear_head_run)
    assert wise["test_top1"][0] == metrics["zeroshot"]["top1"] and wise["test_top1"][-1] == metrics["test"]["top1"]


def test_export_of_a_linear_head_run_writes_the_head_beside_the_checkpoint(linear_head_run, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    _, zeroshot, finetuned = run_weights(linear_head_run)
    for alpha in ("0.5", None):
        output = tmp_path / f"mix-{alpha}.safetensors"
        extra = ["--wise-alpha", alpha] if alpha else []
        result = CliRunner().invoke(cli, ["export", str(linear_head_run), "--format", "merged", "--output", str(output), *extra])
        assert result.exit_code == 0, result.output
        head = load_file(str(tmp_path / f"mix-{alpha}.head.safetensors"))
        a = 0.5 if alpha else 1.0
        for key in ("weight", "bias"):
            assert torch.allclose(head[key], (1 - a) * zeroshot["head"][key] + a * finetuned["head"][key], atol=1e-6)
        clip = load_file(str(output))
        assert torch.allclose(clip["visual.proj"], (1 - a) * zeroshot["clip"]["visual.proj"] + a * finetuned["clip"]["visual.proj"], atol=1e-6)
        with safe_open(str(tmp_path / f"mix-{alpha}.head.safetensors"), "pt") as f:
            assert json.loads(f.metadata()["classes"]) == json.loads((linear_head_run / "checkpoints/best/method.json").read_text())["classes"]
    result = CliRunner().invoke(cli, ["export", str(linear_head_run), "--format", "merged", "--output", str(tmp_path / "mix-None.safetensors")])
    assert result.exit_code == 2 and "already exists" in result.output


def test_wise_of_a_linear_probe_run_mixes_the_probe_with_the_zeroshot_head(tiny_config, split_data, tmp_path):
    run = tmp_path / "probe"
    result = CliRunner().invoke(cli, ["finetune", "--model-config", tiny_config, "--data", str(split_data),
                                      "--linear-probe-init", "random", "--epochs", "3", "--lr", "0.05", "--out", str(run)])
    assert result.exit_code == 0, result.output
    _, zeroshot, finetuned = run_weights(run)
    assert set(zeroshot) == {"head"} and not zeroshot["head"]["bias"].any()  # zero-shot head whatever the init
    wise, metrics = _wise_endpoints(run)
    assert wise["test_top1"][0] == metrics["zeroshot"]["top1"] and wise["test_top1"][-1] == metrics["test"]["top1"]
    result = CliRunner().invoke(cli, ["export", str(run), "--format", "merged", "--wise-alpha", "0.5",
                                      "--output", str(tmp_path / "x.safetensors")])
    assert result.exit_code == 2 and "cannot be exported as 'merged'" in result.output
