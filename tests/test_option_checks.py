"""Every run option is checked before any work: one line naming the option, no model loaded, no run folder."""

from dataclasses import fields

import pytest
from click.testing import CliRunner

from cliptune.training import session
from cliptune.cli import cli
from cliptune.config.run import RunConfig, build_config, check_config
from cliptune.core.options import requirement
from cliptune.core.errors import CliptuneError

BOUNDS = ("min", "max", "above", "below")

BAD_VALUES = [
    (["--batch-size", "0"], "'batch_size' must be at least 1, got 0"),
    (["--epochs", "0"], "'epochs' must be at least 1, got 0"),
    (["--lr", "0"], "'lr' must be greater than 0, got 0.0"),
    (["--lr", "-1e-3"], "'lr' must be greater than 0, got -0.001"),
    (["--grad-accum", "0"], "'grad_accum' must be at least 1, got 0"),
    (["--warmup-steps", "-1"], "'warmup_steps' must be at least 0, got -1"),
    (["--weight-decay", "-0.1"], "'weight_decay' must be at least 0, got -0.1"),
    (["--label-smoothing", "1"], "'label_smoothing' must be in [0, 1), got 1.0"),
    (["--val-fraction", "1.5"], "'val_fraction' must be in [0, 1), got 1.5"),
    (["--test-fraction", "-0.1"], "'test_fraction' must be in [0, 1), got -0.1"),
    (["--val-fraction", "0.5", "--test-fraction", "0.5"], "val_fraction + test_fraction must be below 1 (got 0.5 + 0.5)"),
    (["--shots", "0"], "'shots' must be at least 1 (or unset for all images), got 0"),
    (["--aug-views", "-2"], "'aug_views' must be at least 0, got -2"),
    (["--num-workers", "-1"], "'num_workers' must be at least 0 (or unset), got -1"),
    (["--set", "aug_crop_scale=[0.9,0.5]"], "'aug_crop_scale' must be two numbers [min, max] with 0 < min <= max <= 1, got [0.9, 0.5]"),
    (["--set", "momentum=1"], "--set: 'momentum' must be in [0, 1), got 1.0"),
    (["--set", "max_grad_norm=0"], "--set: 'max_grad_norm' must be greater than 0 (or unset), got 0.0"),
    (["--set", "eval_batch_size=0"], "--set: 'eval_batch_size' must be at least 1, got 0"),
]


@pytest.fixture
def no_model_loading(monkeypatch):
    """Any model load fails the test: the checks must come before the work."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr(session, "load_model", refuse)


@pytest.mark.parametrize("args, message", BAD_VALUES, ids=[" ".join(a) for a, _ in BAD_VALUES])
def test_out_of_range_option_is_refused_before_any_work(args, message, tiny_config, split_data, tmp_path, no_model_loading):
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["finetune", "--data", str(split_data), "--model-config", tiny_config,
                                      *args, "--out", str(out)])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"error: {message}"]
    assert not out.exists()


@pytest.mark.parametrize("flag, kind", [("--data", "folder or file"), ("--model-config", "file"), ("--classnames", "file"),
                                        ("--templates", "file")])
def test_missing_input_path_is_named(flag, kind, tiny_config, split_data, tmp_path, no_model_loading):
    missing = tmp_path / "missing"
    options = {"--data": str(split_data), "--model-config": tiny_config, flag: str(missing)}
    out = tmp_path / "run"
    for command in ("finetune", "zeroshot"):
        result = CliRunner().invoke(cli, [command, *[x for pair in options.items() for x in pair], "--out", str(out)])
        assert result.exit_code == 2 and result.output.strip().splitlines() == [f"error: {flag} {missing}: no such {kind}"]
        assert not out.exists()


def test_continual_task_folder_is_checked(tiny_config, tmp_path, no_model_loading):
    result = CliRunner().invoke(cli, ["continual", "--model-config", tiny_config, "--task", f"{tmp_path / 'gone'}:a,b",
                                      "--out", str(tmp_path / "run")])
    assert result.output.strip().splitlines() == [f"error: --task {tmp_path / 'gone'}:a,b: no such folder"]
    assert not (tmp_path / "run").exists()


def test_defaults_pass_and_every_declared_bound_rejects_something():
    check_config(RunConfig(), files=False)
    bounded = [spec for spec in fields(RunConfig) if any(spec.metadata.get(k) is not None for k in BOUNDS)]
    assert {"epochs", "lr", "momentum", "shots", "wise_alpha", "vocab_size"} <= {spec.name for spec in bounded}
    for spec in bounded:  # each declared bound is live: the value just past it fails, naming the key
        low, high, above, below = (spec.metadata.get(k) for k in BOUNDS)
        bad = low - 1 if low is not None else above if above is not None else high + 1 if high is not None else below
        with pytest.raises(CliptuneError, match=f"^'{spec.name}' must be "):
            check_config(RunConfig(**{spec.name: bad}), files=False)


def test_bounds_read_as_words():
    assert requirement({"min": 0, "below": 1}) == "in [0, 1)"
    assert requirement({"min": 0, "max": 1}) == "in [0, 1]"
    assert requirement({"above": 0, "unset": ""}) == "greater than 0 (or unset)"
    assert requirement({"min": 1, "unset": "for all images"}) == "at least 1 (or unset for all images)"


def test_a_recipe_value_out_of_range_names_its_file_and_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("epochs: 3\nmomentum: 1.5\n")
    with pytest.raises(CliptuneError, match=rf"^'momentum' must be in \[0, 1\), got 1.5 in {recipe}:2$"):
        build_config(str(recipe))


def test_every_run_setting_is_declared_with_help():
    for spec in fields(RunConfig):
        if spec.name not in ("methods", "sources"):
            assert spec.metadata.get("help"), spec.name
