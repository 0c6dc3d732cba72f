"""`export --format hub`: open_clip's Hub layout that plain open_clip loads as `local-dir:` and cliptune zero-shots."""

import json

import open_clip
import pytest
import torch
from click.testing import CliRunner

from cliptune.cli import cli
from cliptune.commands import api
from cliptune.config.run import build_config
from cliptune.deploy.export import merged_state_dict


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, colour_data, tiny_config):
    out = tmp_path_factory.mktemp("hub") / "run"
    config = build_config(None, {"data": str(colour_data), "model_config": tiny_config, "method": "lora", "epochs": 2,
                                 "lr": 1e-2, "batch_size": 8})
    return api.finetune(config, out), out


def test_the_hub_folder_loads_in_plain_open_clip_and_reproduces_the_runs_test_top1(lora_run, colour_data, tmp_path):
    metrics, run = lora_run
    hub = tmp_path / "hub"
    result = CliRunner().invoke(cli, ["export", str(run), "--format", "hub", "--output", str(hub)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in hub.iterdir()) == ["README.md", "open_clip_config.json", "open_clip_model.safetensors",
                                                              "templates.txt"]
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{hub}")
    merged = merged_state_dict(run)
    loaded = model.state_dict()
    assert loaded.keys() == merged.keys() and all(torch.equal(loaded[k], merged[k]) for k in merged)
    result = CliRunner().invoke(cli, ["--quiet", "zeroshot", "--model", f"local-dir:{hub}", "--data", str(colour_data),
                                      "--templates", str(hub / "templates.txt"), "--out", str(tmp_path / "zs")])
    assert result.exit_code == 0, result.output
    zeroshot = json.loads((tmp_path / "zs" / "metrics.json").read_text())["test"]
    assert zeroshot["top1"] == pytest.approx(metrics["test"]["top1"], abs=1e-6)  # LoRA classifies zero-shot style


def test_the_model_card_says_what_was_adapted_and_how_it_scores(lora_run, tmp_path):
    metrics, run = lora_run
    hub = tmp_path / "hub"
    CliRunner().invoke(cli, ["export", str(run), "--format", "hub", "--output", str(hub)])
    card = (hub / "README.md").read_text()
    front = card.split("---")[1]
    assert "library_name: open_clip" in front and "pipeline_tag: zero-shot-image-classification" in front
    assert "base_model: tiny-clip (random init)" in front
    assert f"| adapted (lora) | {100 * metrics['test']['top1']:.1f} |" in card
    assert f"| zero-shot (base model) | {100 * metrics['zeroshot']['top1']:.1f} |" in card


def test_methods_that_do_not_merge_and_bad_folders_are_refused_in_one_line(colour_data, tiny_config, tmp_path):
    run = tmp_path / "probe"
    api.finetune(build_config(None, {"data": str(colour_data), "model_config": tiny_config}), run)
    result = CliRunner().invoke(cli, ["export", str(run), "--format", "hub", "--output", str(tmp_path / "hub")])
    assert result.exit_code != 0 and "method 'linear-probe' cannot be exported as 'hub'" in result.output
    assert not (tmp_path / "hub").exists()
    result = CliRunner().invoke(cli, ["zeroshot", "--model", f"local-dir:{tmp_path}", "--data", str(colour_data),
                                      "--out", str(tmp_path / "zs")])
    assert result.exit_code != 0 and "no open_clip_config.json in" in result.output


def test_push_exports_first_and_fails_in_one_line_offline(lora_run, colour_data, tiny_config, tmp_path):
    """The tests run with HF_HUB_OFFLINE=1: the export succeeds (in a temporary folder), the upload is refused in one
    line that says how to upload by hand; a run without a Hub layout is refused before any network."""
    _, run = lora_run
    result = CliRunner().invoke(cli, ["push", str(run), "--repo", "someone/cliptune-test"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "cannot push to the Hub in offline mode" in result.output and "--format hub --output DIR" in result.output
    probe = tmp_path / "probe"
    api.finetune(build_config(None, {"data": str(colour_data), "model_config": tiny_config}), probe)
    result = CliRunner().invoke(cli, ["push", str(probe), "--repo", "someone/cliptune-test"])
    assert result.exit_code != 0 and "method 'linear-probe' cannot be exported as 'hub'" in result.output
