"""The command line end to end: outputs, and one-line errors with nothing half-written."""

import json
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from cliptune.cli import cli
from cliptune.models.loading import load_model
from helpers import make_imagefolder


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result


def model_args(tiny_config):
    return ["--model-config", tiny_config]


def test_zeroshot_command(tiny_config, split_data, tmp_path):
    result = run("zeroshot", "--data", split_data, *model_args(tiny_config), "--out", tmp_path / "zs")
    assert result.exit_code == 0, result.output
    assert "zero-shot test: top-1" in result.output
    metrics = json.loads((tmp_path / "zs/metrics.json").read_text())
    assert metrics["method"] == "zeroshot" and metrics["test"]["n"] == 16 and len(metrics["classes"]) == 4
    assert metrics["classnames"][0] == "corn (maize) common rust"


def test_zeroshot_with_templates_file_and_val_split(tiny_config, split_data, tmp_path):
    templates = tmp_path / "templates.txt"
    templates.write_text("a leaf with {}.\na photo of {}.\n")
    result = run("zeroshot", "--data", split_data, *model_args(tiny_config), "--templates", templates,
                 "--split", "val", "--out", tmp_path / "zs")
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "zs/metrics.json").read_text())
    assert metrics["templates"] == ["a leaf with {}.", "a photo of {}."] and metrics["val"]["n"] == 8


def test_finetune_then_eval(tiny_config, split_data, tmp_path):
    out = tmp_path / "lp"
    result = run("finetune", "--data", split_data, *model_args(tiny_config), "--method", "linear-probe",
                 "--epochs", 3, "--lr", 0.05, "--batch-size", 8, "--optimizer", "sgd", "--seed", 1,
                 "--set", "weight_decay=0", "--out", out)
    assert result.exit_code == 0, result.output
    assert "zero-shot test: top-1" in result.output and "linear-probe test: top-1" in result.output
    metrics = json.loads((out / "metrics.json").read_text())
    evaluated = run("eval", out, "--json")
    assert evaluated.exit_code == 0, evaluated.output
    report = json.loads(evaluated.output[evaluated.output.index("{"):])
    assert report["test"]["top1"] == metrics["test"]["top1"]
    assert (out / "eval" / f"{split_data.name}-test.json").is_file()
    # refuse to clobber a finished run, unless asked
    again = run("finetune", "--data", split_data, *model_args(tiny_config), "--epochs", 1, "--out", out)
    assert again.exit_code != 0 and "already holds a finished run" in again.output
    replaced = run("finetune", "--data", split_data, *model_args(tiny_config), "--solver", "sgd", "--epochs", 1, "--out", out, "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert json.loads((out / "metrics.json").read_text())["train"]["epochs"] == 1


def test_eval_of_class_specific_head_on_other_classes_is_refused(tiny_config, split_data, colour_data, tmp_path):
    out = tmp_path / "lp"
    assert run("finetune", "--data", split_data, *model_args(tiny_config), "--epochs", 1, "--out", out).exit_code == 0
    result = run("eval", out, "--data", colour_data)
    assert result.exit_code != 0 and "cannot be evaluated there" in result.output


def _assert_clean_failure(result, message, out=None):
    assert result.exit_code != 0
    assert "error: " in result.output and message in result.output, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1
    if out is not None:
        assert not (out / "metrics.json").exists()


@pytest.fixture()
def bad_checkpoint(tiny_config, tmp_path):
    state = load_model(model_config=tiny_config).clip.state_dict()
    state["text_projection"] = torch.zeros(2, 2)
    path = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def test_bad_inputs_give_one_line_errors(tiny_config, split_data, tmp_path, bad_checkpoint):
    out = tmp_path / "out"
    one_class = make_imagefolder(tmp_path / "one", classes=("only",), per_class=3)
    empty_class = make_imagefolder(tmp_path / "empty", classes=("a", "b"), per_class=3)
    for image in (empty_class / "b").iterdir():
        image.unlink()
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("epochs: [1\n")
    unknown_key = tmp_path / "unknown.yaml"
    unknown_key.write_text("epochs: 1\nlearnrate: 2\n")
    base = ["finetune", *model_args(tiny_config), "--out", out]
    cases = [
        ([*base, "--data", tmp_path / "missing"], f"--data {tmp_path / 'missing'}: no such folder"),
        ([*base, "--data", one_class], "need at least 2"),
        ([*base, "--data", empty_class], "has no readable images"),
        ([*base, "--data", split_data, "--method", "magic"], "unknown method 'magic'"),
        ([*base, "--data", split_data, "--optimizer", "adam"], "'optimizer' must be one of adamw, sgd, lion"),
        ([*base, "--data", split_data, "--recipe", bad_yaml], "malformed YAML"),
        ([*base, "--data", split_data, "--recipe", unknown_key], "unknown config key 'learnrate'"),
        ([*base, "--data", split_data, "--set", "nope=1"], "unknown config key 'nope'"),
        (["finetune", "--model", "ViT-Q-1", "--data", split_data, "--out", out], "unknown model 'ViT-Q-1'"),
        ([*base, "--data", split_data, "--pretrained", tmp_path / "none.pt"], "checkpoint file not found"),
        ([*base, "--data", split_data, "--pretrained", bad_checkpoint], "does not match model"),
        ([*base, "--data", split_data, "--linear-probe-init", "magic"], "'linear-probe.init' must be one of zeroshot, random"),
    ]
    for args, message in cases:
        _assert_clean_failure(run(*args), message, out)
        assert not out.exists() or not any(out.iterdir()), f"{message}: left files in {out}"


def test_corrupt_file_warning_and_strict(tiny_config, tmp_path):
    data = make_imagefolder(tmp_path / "d", classes=("a", "b"), per_class=6)
    (data / "a" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    ok = run("zeroshot", "--data", data, *model_args(tiny_config), "--out", tmp_path / "ok")
    assert ok.exit_code == 0 and "skipped 1 file(s)" in ok.output
    strict = run("zeroshot", "--data", data, *model_args(tiny_config), "--strict", "--out", tmp_path / "strict")
    _assert_clean_failure(strict, "not a readable image")


def test_debug_shows_traceback(tiny_config, tmp_path):
    result = subprocess.run([sys.executable, "-m", "cliptune", "--debug", "zeroshot", "--data", str(tmp_path / "x"),
                             "--model-config", tiny_config, "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_info_reports_versions_and_accelerate_state():
    result = run("info")
    assert result.exit_code == 0
    info = json.loads(result.output)
    assert info["torch"].startswith("2.") and info["accelerate_state"]["num_processes"] == 1


def test_a_reader_that_stops_early_is_not_an_error():
    import shlex
    import subprocess
    import sys

    done = subprocess.run(f"{shlex.quote(sys.executable)} -m cliptune recipes list | head -n 1", shell=True,
                          capture_output=True, text=True, timeout=60)
    assert done.stdout.startswith("NAME") and done.stderr == ""
