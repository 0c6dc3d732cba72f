"""Resume is bitwise: an interrupted run continued with --resume ends exactly where the straight run does.

Each test counts the micro-batches the resumed run executes (only the remaining ones) and compares
weights with `torch.equal`, so a resume that silently restarts, repeats a step or drifts fails.
"""

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from cliptune.commands import api
from cliptune.cli import cli
from cliptune.config.run import build_config
from cliptune.training.engine import Trainer
from cliptune.core.errors import InterruptedRun
from cliptune.methods.base import Method

# colour_data: 27 training images; batch 4 -> 7 micro-batches per epoch, grad_accum 2 -> 4 optimizer steps
EPOCHS, BATCHES_PER_EPOCH, STEPS_PER_EPOCH = 3, 7, 4
SETTINGS = {
    # cached augmented features, no randomness in the step
    "linear-probe": {"method": "linear-probe", "aug_views": 2, "lr": 0.05, "linear-probe": {"solver": "sgd"}},
    # images through the towers: augmentation and LoRA dropout draw from the RNG every step. Crops of at most
    # 60 % of the area never hit RandomResizedCrop's rejection loop, which could re-align two random streams
    # that went out of step and hide a draw too many.
    "lora": {"method": "lora", "lr": 0.01, "aug_crop_scale": [0.3, 0.6], "aug_color_jitter": 0.2},
}
_REFERENCES = {}


def _values(data, tiny_config, name):
    return {"data": str(data), "model_config": tiny_config, "epochs": EPOCHS, "batch_size": 4, "grad_accum": 2, **SETTINGS[name]}


def _config(data, tiny_config, name):
    return build_config(None, _values(data, tiny_config, name))


def _reference(name, data, tiny_config, tmp_path_factory):
    """The uninterrupted run (computed once per setting)."""
    if name not in _REFERENCES:
        out = tmp_path_factory.mktemp(f"straight-{name}") / "run"
        _REFERENCES[name] = (api.finetune(_config(data, tiny_config, name), out), out)
    return _REFERENCES[name]


def _counting_fit(monkeypatch):
    """Record the summary of every Trainer.fit call (its `batches_run` counts executed micro-batches)."""
    summaries = []
    original = Trainer.fit

    def fit(self, *args, **kwargs):
        summaries.append(original(self, *args, **kwargs))
        return summaries[-1]

    monkeypatch.setattr(Trainer, "fit", fit)
    return summaries


def _assert_same_run(resumed, resumed_dir, reference, reference_dir):
    assert resumed["train"]["history"] == reference["train"]["history"]
    assert resumed["test"] == reference["test"] and resumed["val"] == reference["val"]
    for checkpoint in ("last/trainable.safetensors", "best/method.safetensors"):
        a = load_file(str(reference_dir / "checkpoints" / checkpoint))
        b = load_file(str(resumed_dir / "checkpoints" / checkpoint))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (checkpoint, key, (a[key] - b[key]).abs().max())


@pytest.mark.parametrize("name", ["linear-probe", "lora"])
def test_ctrl_c_inside_an_optimizer_step_resumes_bitwise(name, tiny_config, colour_data, tmp_path, tmp_path_factory, monkeypatch):
    reference, reference_dir = _reference(name, colour_data, tiny_config, tmp_path_factory)
    # a real SIGINT, delivered after the 6th optimizer step has changed the weights but before the step
    # has finished (epoch 2, 2 of 4 steps done): the checkpoint must be that step's whole state
    original_after_step = Method.after_optimizer_step
    steps = {"n": 0}

    def after_step(self):
        steps["n"] += 1
        if steps["n"] == STEPS_PER_EPOCH + 2:
            signal.raise_signal(signal.SIGINT)  # delivered to this thread, handled before it returns
        original_after_step(self)

    monkeypatch.setattr(Method, "after_optimizer_step", after_step)
    out = tmp_path / "interrupted"
    with pytest.raises(InterruptedRun, match="interrupted in epoch 2"):
        api.finetune(_config(colour_data, tiny_config, name), out)
    assert not (out / "metrics.json").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the training handler is removed
    monkeypatch.setattr(Method, "after_optimizer_step", original_after_step)

    summaries = _counting_fit(monkeypatch)
    resumed = api.finetune(None, out, resume=True)
    done = BATCHES_PER_EPOCH + 2 * 2  # epoch 1, then two accumulated pairs of epoch 2
    assert summaries[0].batches_run == EPOCHS * BATCHES_PER_EPOCH - done
    _assert_same_run(resumed, out, reference, reference_dir)


def test_ctrl_c_during_validation_stops_after_the_epoch_checkpoint(tiny_config, colour_data, tmp_path, tmp_path_factory, monkeypatch):
    reference, reference_dir = _reference("linear-probe", colour_data, tiny_config, tmp_path_factory)
    original_predict = Trainer.predict

    def predict(self, *args):
        signal.raise_signal(signal.SIGINT)  # in epoch 1's validation pass, handled before it returns
        return original_predict(self, *args)

    monkeypatch.setattr(Trainer, "predict", predict)
    out = tmp_path / "interrupted"
    with pytest.raises(InterruptedRun, match="interrupted after epoch 1"):
        api.finetune(_config(colour_data, tiny_config, "linear-probe"), out)
    monkeypatch.setattr(Trainer, "predict", original_predict)
    summaries = _counting_fit(monkeypatch)
    resumed = api.finetune(None, out, resume=True)
    assert summaries[0].batches_run == (EPOCHS - 1) * BATCHES_PER_EPOCH
    _assert_same_run(resumed, out, reference, reference_dir)


def test_kill_9_between_epoch_checkpoints_resumes_from_the_last_one(tiny_config, colour_data, tmp_path, tmp_path_factory, monkeypatch):
    reference, reference_dir = _reference("lora", colour_data, tiny_config, tmp_path_factory)
    out = tmp_path / "killed"
    # a separate process that SIGKILLs itself in the middle of epoch 3: no Python code runs after that
    script = textwrap.dedent(f"""
        import os, signal
        from cliptune.commands import api
        from cliptune.config.run import build_config
        from cliptune.methods.base import Method
        steps = []
        def after_step(self):
            steps.append(1)
            if len(steps) == {2 * STEPS_PER_EPOCH + 1}:
                os.kill(os.getpid(), signal.SIGKILL)
        Method.after_optimizer_step = after_step
        api.finetune(build_config(None, {_values(colour_data, tiny_config, "lora")!r}), {str(out)!r})
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    summaries = _counting_fit(monkeypatch)
    resumed = api.finetune(None, out, resume=True)
    assert summaries[0].batches_run == BATCHES_PER_EPOCH  # epoch 3 again, from the epoch-2 checkpoint
    _assert_same_run(resumed, out, reference, reference_dir)


def test_resume_with_nothing_to_resume_says_so(tiny_config, colour_data, tmp_path):
    runner = CliRunner()
    empty = runner.invoke(cli, ["finetune", "--out", str(tmp_path / "never"), "--resume"])
    assert empty.exit_code != 0 and empty.output.strip().splitlines() == [
        f"error: nothing to resume in {tmp_path / 'never'} (no config.yaml)"]
    # a run stopped before its first checkpoint (e.g. Ctrl-C while caching features) is not silently restarted
    started = tmp_path / "started"
    build = build_config(None, {"data": str(colour_data), "model_config": tiny_config})
    from cliptune.config.run import save_config

    save_config(build, started / "config.yaml")
    result = runner.invoke(cli, ["finetune", "--out", str(started), "--resume"])
    assert result.exit_code != 0
    assert result.output.strip().splitlines() == [
        f"error: nothing to resume in {started}: it stopped before its first checkpoint; start it again without --resume"]
    assert sorted(p.name for p in started.iterdir()) == ["config.yaml"]
