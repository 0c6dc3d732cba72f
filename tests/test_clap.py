"""CLAP: a zero-shot-initialised cosine linear probe with CLAP's class-adaptive L2 penalty (jusiro/CLAP)."""

import pytest
import torch
import torch.nn.functional as F

from cliptune.methods import build_method
from cliptune.methods.clap import class_trust
from cliptune.models.loading import load_model
from cliptune.models.zeroshot import zeroshot_weights
from cliptune.training.engine import Inputs

NAMES = ["red apple", "green leaf", "blue sky"]


@pytest.fixture(scope="module")
def tiny(tiny_config):
    return load_model(model_config=tiny_config)


def _features(tiny, n):
    return torch.randn(n, tiny.clip.text_projection.shape[1], generator=torch.Generator().manual_seed(n))


def test_it_starts_as_the_zero_shot_classifier(tiny):
    clap = build_method("clap", tiny, NAMES, ["a photo of a {}."])
    features = _features(tiny, 6)
    zeroshot = tiny.logit_scale * F.normalize(features, dim=-1) @ zeroshot_weights(tiny.text, NAMES, ["a photo of a {}."]).T
    assert torch.allclose(clap(features), zeroshot, atol=1e-4)
    assert float(clap.penalty().detach()) == 0.0


def test_class_trust_is_the_mean_zero_shot_probability_of_each_class_on_its_own_samples():
    probabilities = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.4, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]])
    trust = class_trust(probabilities, torch.tensor([0, 0, 1, 2]), 3)
    assert torch.allclose(trust, torch.tensor([(0.7 + 0.5) / 2, 0.8, 0.4]))


def test_prepare_sets_the_trust_from_every_view_and_the_loss_adds_the_penalty(tiny):
    clap = build_method("clap", tiny, NAMES, ["a photo of a {}.", "a picture of {}."])
    views = torch.stack([_features(tiny, 6), _features(tiny, 7)[:6]])  # (views, N, dim), as the view bank caches them
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    clap.prepare(Inputs(labels=labels, features=views))
    probabilities = torch.cat([clap(views[0]), clap(views[1])]).softmax(-1)
    assert torch.allclose(clap.trust, class_trust(probabilities, labels.repeat(2), 3))
    with torch.no_grad():
        clap.weight.add_(0.3 * torch.randn(clap.weight.shape, generator=torch.Generator().manual_seed(1)))
    logits = clap(views[0])
    penalty = (clap.trust * (clap.weight - clap.prototypes).pow(2).sum(-1)).mean()
    assert float(penalty) > 0 and torch.allclose(clap.loss(logits, labels), F.cross_entropy(logits, labels) + penalty)
    plain = build_method("clap", tiny, NAMES, ["a photo of a {}."], {"constraint": "none"})
    plain.prepare(Inputs(labels=labels, features=views))
    assert torch.equal(plain.loss(logits, labels), F.cross_entropy(logits, labels))  # ZS-LP: no penalty
