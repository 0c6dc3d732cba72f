"""KgCoOp: CoOp plus 8 * (1 - mean cosine to the hand-crafted class text features), as htyao89/KgCoOp computes it."""

import pytest
import torch
import torch.nn.functional as F

from cliptune.methods import build_method
from cliptune.models.loading import load_model
from cliptune.models.zeroshot import zeroshot_weights

NAMES = ["red apple", "green leaf", "blue sky"]
TEMPLATE = ["a photo of a {}."]


@pytest.fixture(scope="module")
def tiny(tiny_config):
    return load_model(model_config=tiny_config)


def test_at_initialisation_it_is_coop_from_a_photo_of_a_and_the_regulariser_is_zero(tiny):
    kgcoop = build_method("kgcoop", tiny, NAMES, TEMPLATE).train()
    coop = build_method("coop", tiny, NAMES, TEMPLATE, {"ctx_init": "a photo of a"}).train()
    features = torch.randn(5, tiny.clip.text_projection.shape[1])
    assert kgcoop.config.n_ctx == 4 and torch.allclose(kgcoop(features), coop(features), atol=1e-5)
    assert abs(float(kgcoop._distance.detach())) < 1e-5  # the learned prompts start as the hand-crafted ones
    labels = torch.tensor([0, 1, 2, 0, 1])
    assert torch.allclose(kgcoop.loss(kgcoop(features), labels), F.cross_entropy(coop(features), labels), atol=1e-4)


def test_the_loss_adds_weight_times_one_minus_the_mean_cosine(tiny):
    kgcoop = build_method("kgcoop", tiny, NAMES, ["a photo of a {}.", "a picture of {}."], {"weight": 3.0}).train()
    with torch.no_grad():
        kgcoop.ctx.add_(0.05 * torch.randn(kgcoop.ctx.shape, generator=torch.Generator().manual_seed(0)))
    features, labels = torch.randn(4, tiny.clip.text_projection.shape[1]), torch.tensor([0, 1, 2, 2])
    logits = kgcoop(features)
    learned = kgcoop.text_features().detach()
    handcrafted = zeroshot_weights(tiny.text, NAMES, ["a photo of a {}.", "a picture of {}."])  # the run's templates, averaged
    distance = 1 - (F.normalize(learned, dim=-1) * F.normalize(handcrafted, dim=-1)).sum(-1).mean()
    assert float(distance) > 1e-4
    loss = kgcoop.loss(logits, labels)
    assert torch.allclose(loss, F.cross_entropy(logits, labels) + 3.0 * distance, atol=1e-5)
    loss.backward()
    assert kgcoop.ctx.grad is not None and kgcoop.ctx.grad.abs().sum() > 0
    kgcoop.eval()
    kgcoop(features)
    assert torch.equal(kgcoop.loss(logits, labels), F.cross_entropy(logits, labels))  # evaluation: no regulariser


def test_other_classes_get_their_own_handcrafted_features(tiny):
    kgcoop = build_method("kgcoop", tiny, NAMES, TEMPLATE)
    kgcoop.set_classes(["cat", "dog"])
    assert torch.allclose(kgcoop.handcrafted, zeroshot_weights(tiny.text, ["cat", "dog"], TEMPLATE))
