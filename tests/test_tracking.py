"""--report-to: accelerate's tracker gets the settings, per-step loss and lr, per-epoch validation, test metrics."""

import json

import pytest
from click.testing import CliRunner

from cliptune.cli import cli

pytest.importorskip("tensorboard")


def test_report_to_tensorboard_logs_steps_epochs_and_results(colour_data, tiny_config, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["--quiet", "finetune", "--data", str(colour_data), "--model-config", tiny_config,
                                      "--method", "coop", "--epochs", "2", "--batch-size", "8", "--lr", "0.01",
                                      "--report-to", "tensorboard", "--out", str(out)])
    assert result.exit_code == 0, result.output
    log = EventAccumulator(str(out / "tracking" / "cliptune"))  # the run's scalars (hyperparameters: a subfolder)
    log.Reload()
    scalars = set(log.Tags()["scalars"])
    metrics = json.loads((out / "metrics.json").read_text())
    steps = [event.step for event in log.Scalars("train/loss")]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) > 2  # every optimizer step
    assert {"train/lr", "epoch/loss", "epoch/val_top1", "test/top1", "zeroshot/top1", "test/balanced_accuracy"} <= scalars
    assert log.Scalars("test/top1")[-1].value == pytest.approx(metrics["test"]["top1"])
    assert [e.step for e in log.Scalars("epoch/loss")] == [steps[len(steps) // 2 - 1], steps[-1]]  # after each epoch


def test_a_tracker_that_is_not_installed_is_one_line(colour_data, tiny_config, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    result = CliRunner().invoke(cli, ["finetune", "--data", str(colour_data), "--model-config", tiny_config,
                                      "--report-to", "mlflow", "--out", str(tmp_path / "run")])
    assert result.exit_code != 0 and "--report-to mlflow needs the mlflow package" in result.output
    assert not (tmp_path / "run").exists()


def test_continual_reports_each_tasks_steps_on_one_axis_and_the_accuracy_matrix(split_data, colour_data, tiny_config, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "cl"
    result = CliRunner().invoke(cli, ["--quiet", "continual", "--model-config", tiny_config, "--strategy", "naive",
                                      "--task", f"{split_data}:Corn_(maize)___Common_rust,Grape___Black_rot",
                                      "--task", f"{split_data}:Tomato___Late_blight,Tomato___healthy",
                                      "--control", str(colour_data), "--epochs", "1", "--batch-size", "8", "--lr", "1e-3",
                                      "--report-to", "tensorboard", "--out", str(out)])
    assert result.exit_code == 0, result.output
    log = EventAccumulator(str(out / "tracking" / "cliptune"))
    log.Reload()
    saved = json.loads((out / "continual.json").read_text())
    steps = [event.step for event in log.Scalars("train/loss")]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) == 4  # 2 updates per task, task 2 after task 1
    after = [event.step for event in log.Scalars("acc/task2")]
    assert after == [0, 2, 4]  # zero-shot, then after each task
    assert [event.value for event in log.Scalars("acc/task2")] == pytest.approx([saved["zeroshot"][1]] + [r[1] for r in saved["acc"]])
    assert [event.value for event in log.Scalars("control/1")][-1] == pytest.approx(saved["control_acc"][-1][0])
    assert log.Scalars("mtil/transfer")[-1].value == pytest.approx(saved["transfer"])


def _scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = EventAccumulator(str(folder))
    log.Reload()
    return {tag: [(event.step, event.value) for event in log.Scalars(tag)] for tag in log.Tags()["scalars"]}


def test_compare_and_sweep_report_their_summaries(colour_data, split_data, tiny_config, tmp_path):
    import yaml

    out = tmp_path / "grid"
    result = CliRunner().invoke(cli, ["--quiet", "compare", "--data", str(colour_data), "--model-config", tiny_config,
                                      "--methods", "linear-probe,coop", "--shots", "1,2", "--epochs", "1", "--batch-size", "8",
                                      "--report-to", "tensorboard", "--out", str(out)])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "compare.json").read_text())
    assert all(cell["status"] == "finished" for cell in saved["cells"])
    scalars = _scalars(out / "tracking" / "compare")
    for row in saved["summary"]:
        assert (row["shots"], pytest.approx(row["top1_mean"])) in scalars[f"top1/{row['method']}"]
    assert [step for step, _ in scalars["top1/zero-shot"]] == [1, 2]  # by shots
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"lr": {"log": [1e-3, 1e-1]}}))
    out = tmp_path / "sweep"
    result = CliRunner().invoke(cli, ["--quiet", "sweep", "--model-config", tiny_config, "--data", str(split_data),
                                      "--method", "coop", "--n-ctx", "2", "--steps", "2", "--trials", "2", "--space",
                                      str(space), "--set", "aug_views=0", "--report-to", "tensorboard", "--out", str(out)])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "sweep.json").read_text())
    scalars = _scalars(out / "tracking" / "sweep")
    trials = [(t["number"], pytest.approx(t["val"])) for t in saved["trials"]]
    assert scalars["sweep/val"] == trials
    assert scalars["sweep/best_val"][-1][1] == pytest.approx(saved["best"]["val"])
    assert scalars["sweep/best_test_top1"] == [(1, pytest.approx(saved["best"]["test"]["top1"]))]
