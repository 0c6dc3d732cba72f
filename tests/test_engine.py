"""The shared training loop: equivalences, determinism, augmentation caching (resume: test_resume.py, torchrun: test_distributed.py)."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from cliptune.commands import api
from cliptune.core.errors import CliptuneError
from cliptune.training import session as session_lib
from cliptune.config.run import build_config
from cliptune.data.folders import eval_transform, load_imagefolder
from cliptune.training.engine import Trainer
from cliptune.models.features import image_features
from cliptune.methods import build_method
from cliptune.models.loading import load_model
from cliptune.models.zeroshot import zeroshot_weights


def _config(data, tiny_config, **values):
    """A linear probe trained by the engine (the sgd solver), on the tiny model."""
    base = {"data": str(data), "model_config": tiny_config, "epochs": 3, "lr": 0.05, "batch_size": 8}
    base.update(values)
    return build_config(None, base, ["linear-probe.solver=sgd"])


def test_linear_probe_starts_as_the_zeroshot_classifier(tiny_config, colour_data):
    model = load_model(model_config=tiny_config)
    data = load_imagefolder(colour_data)
    templates = ["a photo of a {}.", "a {} thing."]
    method = build_method("linear-probe", model, data.classnames, templates)
    features = image_features(model, data.splits["test"], eval_transform(model.image_size, model.mean, model.std))
    expected = model.logit_scale * F.normalize(features, dim=-1) @ zeroshot_weights(model.text, data.classnames, templates).T
    assert torch.allclose(method(features), expected, atol=1e-5)


def test_finetune_metrics_and_run_folder(tiny_config, colour_data, tmp_path):
    metrics = api.finetune(_config(colour_data, tiny_config, epochs=8), tmp_path / "run")
    run = tmp_path / "run"
    for name in ("config.yaml", "metrics.json", "log.txt", "checkpoints/best/method.safetensors", "checkpoints/best/method.json"):
        assert (run / name).is_file(), name
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["method"] == "linear-probe" and saved["classes"] == ["blue_sky", "green_leaf", "red_apple"]
    for block in ("test", "zeroshot"):
        assert 0 <= saved[block]["top1"] <= saved[block]["top5"] <= 1 and saved[block]["n"] == 6
    assert set(saved["test"]["per_class"]) == set(saved["classes"])
    assert saved["train"]["epochs"] == 8 and saved["train"]["images_seen"] == 8 * 27
    assert saved["train"]["trainable_params"] == 3 * 32 + 3
    # colours are trivially separable: the probe must learn them, while a random model's zero-shot cannot
    assert saved["test"]["top1"] == 1.0 > saved["zeroshot"]["top1"]
    assert metrics == saved


def test_frozen_backbone_is_bit_identical(tiny_config, colour_data, tmp_path):
    config = _config(colour_data, tiny_config)
    accelerator = session_lib.make_accelerator()
    session = session_lib.Session.open(config, accelerator)
    before = {k: v.clone() for k, v in session.model.clip.state_dict().items()}
    method = build_method("linear-probe", session.model, session.data.classnames, session.templates)
    head_before = method.head.weight.detach().clone()
    Trainer(method, config, None, accelerator).fit(session.inputs("train", True, train=True), None, session.data.classes)
    for key, value in session.model.clip.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not torch.equal(method.head.weight, head_before)


@pytest.mark.parametrize("optimizer", ["sgd", "lion"])
def test_other_optimizers_train(tiny_config, colour_data, tmp_path, optimizer):
    metrics = api.finetune(_config(colour_data, tiny_config, optimizer=optimizer, epochs=6, lr=0.01 if optimizer == "lion" else 0.5), tmp_path / optimizer)
    assert metrics["train"]["history"][-1]["loss"] < metrics["train"]["history"][0]["loss"]


def test_training_is_deterministic(tiny_config, colour_data, tmp_path):
    a = api.finetune(_config(colour_data, tiny_config, aug_views=2), tmp_path / "a")
    b = api.finetune(_config(colour_data, tiny_config, aug_views=2), tmp_path / "b")
    assert a["train"]["history"] == b["train"]["history"]
    assert a["test"] == b["test"]


def test_aug_views_are_cached_once_and_drawn_per_epoch(tiny_config, colour_data, tmp_path, monkeypatch):
    model = load_model(model_config=tiny_config)
    data = load_imagefolder(colour_data)
    config = _config(colour_data, tiny_config, aug_views=3)
    session = session_lib.Session(config, model, data, ["a {}."], session_lib.make_accelerator(), tmp_path)
    views = session.features("train", augmented=True)
    assert views.shape[:2] == (3, len(data.splits["train"]))
    assert not torch.allclose(views[0], views[1])  # views differ: augmentation is not dropped
    calls = []
    monkeypatch.setattr("cliptune.models.features._encode", lambda *a, **k: calls.append(1))
    session.memory.clear()
    again = session.features("train", augmented=True)  # from the on-disk cache, no re-encoding
    assert not calls and torch.equal(again, views)
    trainer = Trainer(None, config, None, session.accelerator)
    inputs = session.inputs("train", True, train=True)
    assert not torch.equal(trainer._view_choice(inputs, 0), trainer._view_choice(inputs, 1))


def test_bf16_mixed_precision_runs_on_cpu(tiny_config, colour_data, tmp_path):
    # its own process: accelerate fixes the mixed precision per process (this one's runs use "no")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "cliptune", "--quiet", "finetune", "--data", str(colour_data), "--model-config",
                           tiny_config, "--epochs", "2", "--mixed-precision", "bf16", "--out", str(tmp_path / "bf16")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((tmp_path / "bf16/metrics.json").read_text())
    assert 0 <= metrics["test"]["top1"] <= 1 and "mixed_precision: bf16" in (tmp_path / "bf16/config.yaml").read_text()


def test_another_mixed_precision_in_the_same_process_is_one_clear_error(tiny_config, colour_data, tmp_path):
    session_lib.make_accelerator("no")
    with pytest.raises(CliptuneError, match="cannot follow 'no' in one Python process"):
        api.finetune(_config(colour_data, tiny_config, mixed_precision="bf16", epochs=1), tmp_path / "bf16")
    assert not (tmp_path / "bf16").exists()  # refused before the run folder
