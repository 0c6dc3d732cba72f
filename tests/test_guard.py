"""The zero-shot guard: a run that ends below zero-shot on val says so, and `--fallback zero-shot` keeps the
zero-shot classifier exactly (its stored predictions, `predict` and `eval` all give the zero-shot results)."""

import html
import json

import pytest
import torch
from click.testing import CliRunner

from cliptune.cli import cli
from cliptune.commands.api import zeroshot_guard
from cliptune.deploy.classifier import load, probe_images
from cliptune.deploy.report import load_predictions

# Full fine-tuning at lr 1 for one epoch wrecks the bundled demo CLIP: certainly below its zero-shot model.
WRECK = ["--recipe", "demo", "--method", "full", "--shots", "2", "--epochs", "1", "--lr", "1", "--optimizer", "sgd",
         "--warmup-steps", "0", "--set", "max_grad_norm=null"]


def test_guard_says_nothing_when_adaptation_helps_and_names_both_accuracies_when_not():
    assert zeroshot_guard("coop", {"top1": 0.5}, {"top1": 0.4})["message"] is None
    assert zeroshot_guard("coop", {"top1": 0.4}, {"top1": 0.4})["below_zeroshot"] is False  # a tie keeps the adapted model
    guard = zeroshot_guard("coop", {"top1": 0.17}, {"top1": 0.25})
    assert guard["below_zeroshot"] and not guard["fallback"]
    assert guard["message"] == "coop ended below zero-shot on val (0.17 vs 0.25); see 'cliptune sweep' or --fallback zero-shot"
    kept = zeroshot_guard("coop", {"top1": 0.17}, {"top1": 0.25}, "zero-shot")
    assert kept["fallback"] and "kept the zero-shot classifier" in kept["message"]
    assert zeroshot_guard("coop", None, None, "zero-shot")["fallback"] is False  # no val split: nothing to compare


@pytest.fixture(scope="module")
def zeroshot_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("guard") / "zeroshot"
    result = CliRunner().invoke(cli, ["zeroshot", "--recipe", "demo", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_a_run_below_zeroshot_prints_the_guard_line_and_records_it(tmp_path):
    out = tmp_path / "wrecked"
    result = CliRunner().invoke(cli, ["finetune", *WRECK, "--out", str(out)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    guard = metrics["guard"]
    assert guard["below_zeroshot"] and not guard["fallback"] and "result" not in metrics
    assert guard["val"] == metrics["val"]["top1"] < guard["zeroshot_val"] == metrics["zeroshot_val"]["top1"]
    assert f"full ended below zero-shot on val ({guard['val']:.2f} vs {guard['zeroshot_val']:.2f})" in result.output
    assert html.escape(guard["message"]) in (out / "report.html").read_text()


def test_fallback_zeroshot_returns_exactly_the_zeroshot_predictions(tmp_path, zeroshot_run):
    out = tmp_path / "fallback"
    result = CliRunner().invoke(cli, ["finetune", *WRECK, "--fallback", "zero-shot", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "kept the zero-shot classifier" in result.output and "(the zero-shot fallback)" in result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["result"] == "zero-shot" and metrics["guard"]["fallback"]
    assert metrics["test"] == metrics["zeroshot"] and metrics["adapted"]["test"]["top1"] < metrics["test"]["top1"]
    # the stored test predictions are the zero-shot run's, bit for bit
    assert torch.equal(load_predictions(out, "test")[0], load_predictions(zeroshot_run, "test")[0])
    # and so is what `predict` / `export --format classifier` load from the run
    fallback, zeroshot = load(out), load(zeroshot_run)
    images = probe_images(zeroshot)
    assert torch.equal(fallback.logits(images), zeroshot.logits(images))
    # commands that need the adapted weights refuse, naming what the run kept
    refused = CliRunner().invoke(cli, ["export", str(out), "--format", "merged", "--output", str(tmp_path / "m.safetensors")])
    assert refused.exit_code != 0 and "kept the zero-shot classifier" in refused.output
