"""`cliptune sweep`: Optuna trials on one open session, scored on val, resumable, and a best.yaml that reproduces
the best trial."""

import json

import pytest
import yaml
from click.testing import CliRunner

from cliptune.cli import cli
from cliptune.commands.sweep import check_space, method_space, read_space
from cliptune.methods import METHODS
from cliptune.core.errors import CliptuneError


@pytest.fixture
def space_file(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({"lr": {"log": [1e-3, 1e-1]}, "coop.ctx_init": {"choice": ["", "a photo of a"]}}))
    return path


def _sweep(tiny_config, split_data, out, space, trials):
    return CliRunner().invoke(cli, ["sweep", "--model-config", tiny_config, "--data", str(split_data), "--method", "coop",
                                    "--n-ctx", "2", "--steps", "4", "--trials", str(trials), "--space", str(space),
                                    "--set", "aug_views=0", "--out", str(out)])


def test_sweep_reports_val_scored_trials_and_best_yaml_reproduces_the_best(tiny_config, split_data, space_file, tmp_path, monkeypatch):
    import cliptune.training.session as session_module

    loads = []
    original = session_module.load_model
    monkeypatch.setattr(session_module, "load_model", lambda *a, **k: loads.append(1) or original(*a, **k))
    out = tmp_path / "sweep"
    result = _sweep(tiny_config, split_data, out, space_file, 3)
    assert result.exit_code == 0, result.output
    assert len(loads) == 1  # the model is loaded once for every trial and the final test evaluation
    report = json.loads((out / "sweep.json").read_text())
    assert [t["state"] for t in report["trials"]] == ["complete"] * 3
    assert all(set(t["params"]) == {"lr", "coop.ctx_init"} and t["seconds"] > 0 for t in report["trials"])
    best = report["best"]
    assert best["val"] == max(t["val"] for t in report["trials"]) and set(best["test"]) >= {"top1", "top5", "n"}
    assert set(report["zeroshot"]) == {"val", "test"} and "top1" in report["zeroshot"]["test"]
    trial_metrics = json.loads((out / best["run"] / "metrics.json").read_text())
    assert trial_metrics["test"] is None  # trials never look at test
    checkpoints = out / best["run"] / "checkpoints"
    assert (checkpoints / "best").is_dir() and not (checkpoints / "last").exists()  # a trial is rerun, never resumed
    for name in ("sweep.md", "sweep.png", "best.yaml", "sweep.db"):
        assert (out / name).is_file()
    assert f"best trial {best['number']}" in result.output

    rerun = CliRunner().invoke(cli, ["finetune", "--recipe", str(out / "best.yaml"), "--out", str(tmp_path / "again")])
    assert rerun.exit_code == 0, rerun.output
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert again["val"]["top1"] == best["val"] and again["test"]["top1"] == best["test"]["top1"]

    # an interrupted or repeated sweep keeps its finished trials: the same command adds none, a larger --trials adds the rest
    before = {p.name: p.stat().st_mtime_ns for p in (out / "trials").iterdir()}
    assert _sweep(tiny_config, split_data, out, space_file, 3).exit_code == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "trials").iterdir()} == before
    assert _sweep(tiny_config, split_data, out, space_file, 4).exit_code == 0
    report = json.loads((out / "sweep.json").read_text())
    assert len(report["trials"]) == 4 and {p.name for p in (out / "trials").iterdir()} >= set(before)


def test_trials_report_their_val_curve_to_the_pruner(tiny_config, split_data, space_file, tmp_path):
    import optuna

    out = tmp_path / "sweep"
    result = CliRunner().invoke(cli, ["sweep", "--model-config", tiny_config, "--data", str(split_data), "--method", "coop",
                                      "--n-ctx", "2", "--epochs", "2", "--trials", "1", "--space", str(space_file),
                                      "--set", "aug_views=0", "--set", "eval_every=1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name="sweep", storage=f"sqlite:///{out / 'sweep.db'}")
    assert sorted(study.trials[0].intermediate_values) == [1, 2]


def test_space_keys_are_checked_and_each_method_declares_its_own(tmp_path):
    with pytest.raises(CliptuneError, match="unknown search key 'coop.n_tokens'"):
        check_space({"coop.n_tokens": ("int", 1, 4)}, "coop")
    with pytest.raises(CliptuneError, match="cannot search 'shots'"):
        check_space({"shots": ("int", 1, 4)}, "coop")
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: {uniform: [1, 2]}\n")
    with pytest.raises(CliptuneError, match="'lr' must be one of"):
        read_space(bad)
    coop = method_space("coop", 16, None)
    assert coop["lr"] == ("log", pytest.approx(0.0002), pytest.approx(0.02)) and coop["epochs"] == ("int", 50, 200)
    assert "coop.ctx_init" in coop and "epochs" not in method_space("coop", 16, 200)  # --steps: the budget is yours
    assert {"lora.lora_r", "lora.lora_alpha", "lora.lora_towers", "steps"} <= set(method_space("lora", 16, None))
    assert "clip-adapter.ratio" in method_space("clip-adapter", 16, None) and method_space("linear-probe", 16, None) == {}
    for method in METHODS:  # every default space names its own method's options (a subclass inherits its parent's)
        check_space(method_space(method, 16, None), method)
    assert {"promptsrc.n_ctx", "promptsrc.prompt_depth", "promptsrc.text_weight"} <= set(method_space("promptsrc", 16, None))
    with pytest.raises(CliptuneError, match="unknown search key 'promptsrc.section'"):  # a class variable, not an option
        check_space({"promptsrc.section": ("choice", ["x"])}, "promptsrc")


def test_unknown_space_key_is_a_one_line_error(tiny_config, split_data, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("coop.n_tokens: {int: [1, 4]}\n")
    result = _sweep(tiny_config, split_data, tmp_path / "sweep", space, 1)
    assert result.exit_code == 2 and "unknown search key 'coop.n_tokens'" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "sweep").exists()


def test_compare_sweep_runs_each_cell_with_its_tuned_settings(tiny_config, split_data, tmp_path):
    out = tmp_path / "compare"
    result = CliRunner().invoke(cli, ["compare", "--model-config", tiny_config, "--data", str(split_data),
                                      "--methods", "coop,linear-probe", "--shots", "2", "--steps", "3", "--sweep", "2",
                                      "--set", "coop.n_ctx=2", "--set", "aug_views=0", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "compare.json").read_text())
    tuned = report["sweeps"]["coop-2shot"]["params"]
    assert set(tuned) == {"lr", "coop.n_ctx", "coop.ctx_init"}
    assert report["sweeps"]["linear-probe-2shot"]["params"] is None  # nothing to search: its defaults stand
    cell = yaml.safe_load((out / "cells" / "coop-2shot-seed1" / "config.yaml").read_text())
    assert cell["lr"] == tuned["lr"] and cell["coop"]["ctx_init"] == tuned["coop.ctx_init"]
    assert "Settings from a sweep" in (out / "compare.md").read_text()
    sweep = json.loads((out / "sweeps" / "coop-2shot" / "sweep.json").read_text())
    assert len(sweep["trials"]) == 2 and sweep["best"]["params"] == tuned
