"""PromptSRC: independent deep prompts in both towers, the three self-regulating terms and the Gaussian prompt
aggregation, each against a computation written out here from muzairkhattak/PromptSRC `trainers/promptsrc.py`."""

import math
import signal

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from cliptune.commands import api
from cliptune.config.run import build_config
from cliptune.core.errors import InterruptedRun
from cliptune.methods import build_method
from cliptune.methods.base import Method
from cliptune.models.loading import load_model
from cliptune.models.zeroshot import zeroshot_weights
from helpers import maple_block_inputs

NAMES = ["red apple", "green leaf", "blue sky"]
TEMPLATES = ["a photo of a {}.", "a picture of {}."]


@pytest.fixture(scope="module")
def tiny(tiny_config):
    return load_model(model_config=tiny_config, seed=0)


def images(n=4):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_prompts_are_independent_per_tower_and_layer(tiny):
    method = build_method("promptsrc", tiny, NAMES, TEMPLATES, {"vision_ctx": 3}).eval()
    assert method.depth == 2 and method.config.n_ctx == 4
    assert {n for n, p in method.named_parameters() if p.requires_grad} == {"ctx", "deep_text.0", "vision.0", "vision.1"}
    assert method.vision[0].shape == (3, tiny.image.width)
    text_seen, image_seen, vision = maple_block_inputs(method, tiny, images(3))
    assert torch.equal(image_seen[1][:, -3:], method.vision[1].expand(3, -1, -1))  # layer 2: its own tokens
    assert torch.allclose(image_seen[0][:, -3:], tiny.clip.visual.ln_pre(method.vision[0]).expand(3, -1, -1), atol=1e-6)
    assert torch.equal(text_seen[1][:, 1:5], method.deep_text[0].expand(len(NAMES), -1, -1))
    with torch.no_grad():  # a visual prompt changes the image side only
        text = method.text_features().clone()
        method.vision[1].add_(1.0)
        assert torch.allclose(method.text_features(), text)


def test_the_loss_adds_the_three_self_regulating_terms(tiny):
    method = build_method("promptsrc", tiny, NAMES, TEMPLATES, {"text_weight": 3.0, "image_weight": 2.0}).train()
    with torch.no_grad():
        for p in method.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    x, labels = images(), torch.tensor([0, 1, 2, 2])
    logits = method(x)
    loss = method.loss(logits, labels)
    with torch.no_grad():
        text, image = method.text_features(), method.image_features(x)
        scale = float(tiny.logit_scale)
        hand = zeroshot_weights(tiny.text, NAMES, TEMPLATES)
        clip_image = F.normalize(tiny.image.encode(x, normalize=False), dim=-1)
        clip_logits = scale * clip_image @ hand.T
        teacher = clip_logits.softmax(1)
        kl = (teacher * (teacher.log() - (scale * image @ text.T).log_softmax(1))).sum() / (4 * len(NAMES))
        expected = (F.cross_entropy(scale * image @ text.T, labels) + 3.0 * (text - hand).abs().mean()
                    + 2.0 * (image - clip_image).abs().mean() + kl)
    assert float(kl) > 1e-4 and float((text - hand).abs().mean()) > 1e-4
    assert torch.allclose(loss, expected, atol=1e-5)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.trainable_parameters())
    method.eval()
    assert torch.equal(method.loss(method(x), labels), F.cross_entropy(method(x), labels))  # no terms in evaluation


def test_at_depth_one_from_the_templates_words_the_text_term_is_zero(tiny):
    """The context "a photo of a" with no deeper text prompts is the hand-written prompt: its text features are the
    frozen model's, so the text weight changes nothing (the image and logit terms of the visual prompts remain)."""
    x = images()
    regularisers = []
    for weight in (25.0, 0.0):
        method = build_method("promptsrc", tiny, NAMES, ["a photo of a {}."], {"prompt_depth": 1, "text_weight": weight})
        method.train()(x)
        regularisers.append(method._regulariser.detach())
    with torch.no_grad():
        text = method.text_features()
    assert (text - zeroshot_weights(tiny.text, NAMES, ["a photo of a {}."])).abs().max() < 1e-5
    assert float(regularisers[1]) > 1e-6 and torch.allclose(regularisers[0], regularisers[1], atol=1e-5)


def test_gaussian_aggregation_weighs_each_epoch_by_its_normal_density(tiny):
    method = build_method("promptsrc", tiny, NAMES, TEMPLATES, {"gpa_mean": 2.0, "gpa_std": 1.5})
    values = []
    for epoch in (1, 2, 3):
        with torch.no_grad():
            method.ctx.fill_(float(epoch * epoch))
        values.append(float(epoch * epoch))
        method.after_epoch(epoch)
    density = [math.exp(-0.5 * ((e - 2.0) / 1.5) ** 2) / (1.5 * math.sqrt(2 * math.pi)) for e in (1, 2, 3)]
    expected = sum(d * v for d, v in zip(density, values)) / sum(density)
    final = method.final_state()
    assert torch.allclose(final["ctx"], torch.full_like(method.ctx, expected), atol=1e-5)
    assert set(final) == set(method.learned_state_dict())
    far = build_method("promptsrc", tiny, NAMES, TEMPLATES, {"gpa_mean": 1000.0, "gpa_std": 1.0})
    for epoch in (1, 2):  # densities of 1e-216000: underflow in linear space, not in logs
        with torch.no_grad():
            far.ctx.fill_(float(epoch))
        far.after_epoch(epoch)
    assert torch.allclose(far.final_state()["ctx"], torch.full_like(far.ctx, 2.0))  # the epoch nearer the mean
    assert build_method("promptsrc", tiny, NAMES, TEMPLATES).final_state() is None  # no epoch run: nothing to average


def _run(data, tiny_config, out, resume=False):
    values = {"data": str(data), "model_config": tiny_config, "method": "promptsrc", "epochs": 3, "batch_size": 4,
              "lr": 0.05, "promptsrc": {"gpa_mean": 2, "gpa_std": 1}}
    return api.finetune(build_config(None, values), out, resume=resume)


def test_a_run_ends_with_the_aggregated_prompts_and_an_interrupted_run_resumes_the_same_average(
        tiny_config, colour_data, tmp_path, monkeypatch):
    straight = _run(colour_data, tiny_config, tmp_path / "straight")
    best = load_file(str(tmp_path / "straight" / "checkpoints" / "best" / "method.safetensors"))
    last = load_file(str(tmp_path / "straight" / "checkpoints" / "last" / "trainable.safetensors"))
    assert torch.equal(best["ctx"], best["gpa.ctx"]) and not torch.equal(best["ctx"], last["ctx"])  # the average
    # colour_data: 27 training images, batch 4, last partial batch dropped -> 6 steps per epoch; interrupt in epoch 2,
    # when the average holds epoch 1
    original, steps = Method.after_optimizer_step, {"n": 0}

    def after_step(self):
        steps["n"] += 1
        if steps["n"] == 8:
            signal.raise_signal(signal.SIGINT)
        original(self)

    monkeypatch.setattr(Method, "after_optimizer_step", after_step)
    with pytest.raises(InterruptedRun, match="interrupted in epoch 2"):
        _run(colour_data, tiny_config, tmp_path / "resumed")
    monkeypatch.setattr(Method, "after_optimizer_step", original)
    resumed = _run(colour_data, tiny_config, tmp_path / "resumed", resume=True)
    again = load_file(str(tmp_path / "resumed" / "checkpoints" / "best" / "method.safetensors"))
    assert resumed["test"] == straight["test"] and again.keys() == best.keys()
    assert all(torch.equal(again[key], best[key]) for key in best)
