"""Numbers checked against independent computations: ECE and NLL by hand, the zero-shot head against
open_clip's own `build_zero_shot_classifier`, the warm-up/cosine learning rates, and gradient
accumulation (k micro-batches update exactly like one batch k times as large)."""

import math

import pytest
import torch
from open_clip.zero_shot_classifier import build_zero_shot_classifier

from cliptune.training import engine
from cliptune.training import session as session_lib
from cliptune.config.run import build_config
from cliptune.training.engine import Trainer
from cliptune.methods import build_method
from cliptune.core.metrics import classification_metrics
from cliptune.models.loading import load_model
from cliptune.models.zeroshot import zeroshot_weights


def test_ece_and_nll_match_a_hand_computation():
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.38, 0.62], [0.55, 0.45]])
    labels = torch.tensor([0, 1, 1, 1])
    # confidences 0.9 (right), 0.9 (wrong), 0.62 (right), 0.55 (wrong); 15 equal bins of width 1/15:
    # (13/15, 14/15] holds both 0.9s: accuracy 1/2 -> |0.5 - 0.9| * 2/4 = 0.2
    # (9/15, 10/15] holds 0.62: |1 - 0.62| * 1/4 = 0.095;  (8/15, 9/15] holds 0.55: |0 - 0.55| * 1/4 = 0.1375
    metrics = classification_metrics(probs.log(), labels, ["a", "b"])
    assert metrics["ece"] == pytest.approx(0.2 + 0.095 + 0.1375, abs=1e-6)
    assert metrics["nll"] == pytest.approx(-(math.log(0.9) + math.log(0.1) + math.log(0.62) + math.log(0.45)) / 4, abs=1e-6)
    assert metrics["top1"] == 0.5 and metrics["per_class"] == pytest.approx({"a": 1.0, "b": 1 / 3})


def test_zeroshot_head_equals_open_clips_build_zero_shot_classifier(tiny_config):
    model = load_model(model_config=tiny_config, seed=2)
    classnames = ["red apple", "green leaf", "blue sky", "a rather long class name"]
    templates = ["a photo of a {}.", "a blurry photo of the {}.", "{}"]
    reference = build_zero_shot_classifier(model.clip, model.tokenizer, classnames, templates,
                                           num_classes_per_batch=3, device="cpu", use_tqdm=False)
    ours = zeroshot_weights(model.text, classnames, templates)
    assert ours.shape == (len(classnames), reference.shape[0])
    assert torch.allclose(ours, reference.T, atol=1e-6)


def _probe_fit(data, tiny_config, monkeypatch=None, **values):
    """Linear probe on cached features (no randomness in training); returns the trained head."""
    config = build_config(None, {"data": str(data), "model_config": tiny_config, "epochs": 2, "optimizer": "sgd",
                                 "lr": 0.5, "momentum": 0.9, **values})
    accelerator = session_lib.make_accelerator()
    session = session_lib.Session.open(config, accelerator)
    method = build_method("linear-probe", session.model, session.data.classnames, session.templates, {"solver": "sgd"})
    Trainer(method, config, None, accelerator).fit(session.inputs("train", True, train=True), None, session.data.classes)
    return method.head.weight.detach().clone(), method.head.bias.detach().clone()


def test_gradient_accumulation_equals_one_large_batch(tiny_config, colour_data):
    # 27 training images: batches of 16 are [16, 11]; micro-batches of 4 accumulated 4 at a time are
    # [4, 4, 4, 4] and [4, 4, 3], an uneven last group that must still weigh every image equally
    large = _probe_fit(colour_data, tiny_config, batch_size=16, grad_accum=1)
    accumulated = _probe_fit(colour_data, tiny_config, batch_size=4, grad_accum=4)
    unaccumulated = _probe_fit(colour_data, tiny_config, batch_size=4, grad_accum=1)
    for a, b, c in zip(large, accumulated, unaccumulated):
        assert torch.allclose(a, b, atol=1e-6), (a - b).abs().max()
        assert not torch.allclose(a, c, atol=1e-3)  # the comparison can tell batch sizes apart


def test_learning_rates_follow_linear_warmup_then_cosine(tiny_config, colour_data, monkeypatch):
    used = []

    class RecordingSGD(torch.optim.SGD):
        def step(self, closure=None):
            used.append(self.param_groups[0]["lr"])
            return super().step(closure)

    monkeypatch.setattr(engine, "build_optimizer", lambda config, parameters: RecordingSGD(parameters, lr=config.lr))
    # 27 images, batch 4 -> 7 micro-batches, accumulation 2 -> 4 updates per epoch, 8 in all; a warm-up of 3 is
    # capped at a fifth of the run: 1 step
    _probe_fit(colour_data, tiny_config, batch_size=4, grad_accum=2, warmup_steps=3, lr=0.1)
    base, warmup, total = 0.1, 1, 8
    expected = [base * (s + 1) / warmup if s < warmup  # wise-ft src/models/utils.py:15-16
                else base * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))) for s in range(total)]
    assert used == pytest.approx(expected, abs=1e-12)
    assert expected[0] == base and expected[-1] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 6 / 7)))
