"""MoCoOp: prompts initialised from their templates, the router's top-2 mixture and the text and gate losses, each
against an independent computation on a tiny case (dyabel/mocoop prompting/moe.py, prompting/losses.py)."""

import math

import pytest
import torch
import torch.nn.functional as F

from cliptune.core.errors import CliptuneError
from cliptune.methods import build_method
from cliptune.methods.mocoop import gate_loss, text_loss
from cliptune.models.loading import load_model

NAMES = ["red apple", "green leaf", "blue sky", "old stone wall"]
TEMPLATES = ["a photo of a {}.", "{} texture.", "art of the {}, drawn.", "the {} drawn."]


@pytest.fixture(scope="module")
def tiny(tiny_config):
    return load_model(model_config=tiny_config)


def test_each_prompt_starts_as_the_first_template_of_its_group(tiny):
    """Words before and after the class name become context at their places: the prompt's text features at
    initialisation are the zero-shot features of that template (the shared shift starts at zero)."""
    mocoop = build_method("mocoop", tiny, NAMES, TEMPLATES, {"groups": "1,2,1"})
    assert [p.n_ctx for p in mocoop.prompts] == [4, 1, 2] and [p.before for p in mocoop.prompts] == [4, 0, 1]
    with torch.no_grad():
        features = mocoop.prompt_features()
        for index, template in zip(range(3), [TEMPLATES[0], TEMPLATES[1], TEMPLATES[3]]):
            expected = tiny.text.encode(tiny.text.tokenize([template.format(name) for name in NAMES]), normalize=True)
            assert torch.allclose(features[index], expected, atol=1e-5), template
    # prototypes: per group, the normalised mean of its templates' features; the middle group averages two
    grid = torch.stack([tiny.text.encode(tiny.text.tokenize([t.format(n) for n in NAMES]), normalize=True) for t in TEMPLATES])
    assert torch.allclose(mocoop.prototypes[1], F.normalize(grid[1:3].mean(dim=0), dim=-1), atol=1e-5)


def test_the_router_mixes_the_two_best_prompts_of_each_image(tiny):
    mocoop = build_method("mocoop", tiny, NAMES, TEMPLATES, seed=1).eval()
    with torch.no_grad():
        mocoop.shift.normal_(std=0.1)
        for ctx in mocoop.ctx:
            ctx.add_(torch.randn_like(ctx) * 0.05)
        images = torch.randn(5, tiny.text.output_dim)
        logits = mocoop(images)
        prompts = mocoop.prompt_features()
        for b, image in enumerate(F.normalize(images, dim=-1)):
            scores = mocoop.gate.weight @ image + mocoop.gate.bias
            order = sorted(range(len(scores)), key=lambda p: -float(scores[p]))[:2]
            weights = torch.softmax(scores[order], dim=0)
            mixed = weights[0] * prompts[order[0]] + weights[1] * prompts[order[1]]  # (classes, dim), not renormalised
            assert torch.allclose(logits[b], mocoop.scale * mixed @ image, atol=1e-4)


def test_text_loss_is_cross_entropy_of_cosines_within_each_group():
    generator = torch.Generator().manual_seed(0)
    prompts = F.normalize(torch.randn(3, 4, 8, generator=generator), dim=-1)
    prototypes = F.normalize(torch.randn(3, 4, 8, generator=generator), dim=-1)
    total = 0.0
    for g in range(3):
        for c in range(4):
            cosines = [float(prompts[g, c] @ prototypes[g, e]) for e in range(4)]
            total += -cosines[c] + math.log(sum(math.exp(x) for x in cosines))
    assert abs(float(text_loss(prompts, prototypes)) - total / 12) < 1e-5


def test_the_text_loss_in_chunks_of_classes_has_the_same_value_and_gradient():
    generator = torch.Generator().manual_seed(2)
    prompts = F.normalize(torch.randn(2, 7, 8, generator=generator), dim=-1).requires_grad_()
    prototypes = F.normalize(torch.randn(2, 7, 8, generator=generator), dim=-1)
    results = []
    for rows in (0, 3, 1):  # all 7 classes at once (the default here), then 3 and 1 per chunk
        loss = text_loss(prompts, prototypes, rows)
        (grad,) = torch.autograd.grad(loss, prompts)
        results.append((loss.detach(), grad))
    for loss, grad in results[1:]:
        assert torch.allclose(loss, results[0][0], atol=1e-6) and torch.allclose(grad, results[0][1], atol=1e-6)


def test_gate_loss_targets_the_groups_closest_to_the_class_boosted_by_ten():
    generator = torch.Generator().manual_seed(1)
    image = F.normalize(torch.randn(2, 8, generator=generator), dim=-1)
    prototypes = F.normalize(torch.randn(3, 4, 8, generator=generator), dim=-1)  # (groups, classes, dim)
    scores, labels = torch.randn(2, 3, generator=generator), torch.tensor([2, 0])
    total = 0.0
    for b in range(2):
        similarity = [float(image[b] @ prototypes[g, labels[b]]) for g in range(3)]
        best = sorted(range(3), key=lambda g: -similarity[g])[:2]
        boosted = [s + (10.0 if g in best else 0.0) for g, s in enumerate(similarity)]
        target = [math.exp(x) / sum(math.exp(y) for y in boosted) for x in boosted]
        log_probs = F.log_softmax(scores[b], dim=0)
        total += -sum(t * float(lp) for t, lp in zip(target, log_probs))
    assert abs(float(gate_loss(scores, image, prototypes, labels)) - total / 2) < 1e-5


def test_training_adds_both_losses_and_every_part_learns(tiny):
    mocoop = build_method("mocoop", tiny, NAMES, TEMPLATES, {"text_weight": 2.0, "gate_weight": 0.5}).train()
    images, labels = torch.randn(6, tiny.text.output_dim), torch.tensor([0, 1, 2, 3, 0, 1])
    logits = mocoop(images)
    features, scores = mocoop.prompt_features(), mocoop.gate(F.normalize(images, dim=-1))
    expected = (F.cross_entropy(logits, labels) + 2.0 * text_loss(features, mocoop.prototypes)
                + 0.5 * gate_loss(scores, F.normalize(images, dim=-1), mocoop.prototypes, labels))
    loss = mocoop.loss(logits, labels)
    assert torch.allclose(loss, expected, atol=1e-5)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mocoop.trainable_parameters())


@pytest.mark.parametrize("options, message", [({"groups": "1,2"}, "adding up to the 4 templates"),
                                              ({"groups": "a,b"}, "comma-separated group sizes"),
                                              ({"top_k": 5}, "more than the 4 prompts")])
def test_bad_groups_and_top_k_are_one_line_errors(tiny, options, message):
    with pytest.raises(CliptuneError, match=message):
        build_method("mocoop", tiny, NAMES, TEMPLATES, options)


def test_option_defaults_are_the_original_configs():
    """configs/MoCoOp/vit_b16_c4_ep25_batch32_cls_t2t_5_wcl_25_g1_b_lr32.yaml:35-40 (TEXT_LOSS_WEIGHT 5, GATE_LOSS_WEIGHT
    1), prompting/moe.py:413 (top-2)."""
    from cliptune.methods.mocoop import MoCoOpConfig

    config = MoCoOpConfig()
    assert (config.text_weight, config.gate_weight, config.top_k) == (5.0, 1.0, 2)
