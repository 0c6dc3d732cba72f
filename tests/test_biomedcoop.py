"""BiomedCoOp: CoOp plus SCCM (squared distance to the mean description features) and KDSP (KL to a teacher of the
descriptions that are not outliers on the batch), against independent computations (HealthX-Lab/BiomedCoOp
trainers/BiomedCoOp/biomedcoop_biomedclip.py:206-243)."""

import math

import pytest
import torch
import torch.nn.functional as F

from cliptune.methods import build_method
from cliptune.methods.biomedcoop import BiomedCoOpConfig, kdsp_loss, selected_descriptions
from cliptune.models.loading import load_model

NAMES = ["effusion", "nodule", "normal lung"]
TEMPLATES = ["a chest x-ray showing {}.", "an x-ray of {}."]
DESCRIPTIONS = {"effusion": ["blunting of the costophrenic angle", "fluid in the pleural space", "a meniscus sign"],
                "nodule": ["a small round opacity", "a well-defined spot in the lung", "a coin lesion", "a fourth one"]}


@pytest.fixture(scope="module")
def tiny(tiny_config):
    return load_model(model_config=tiny_config)


def test_descriptions_fall_back_to_templates_and_every_class_uses_the_same_count(tiny):
    method = build_method("biomedcoop", tiny, NAMES, TEMPLATES, descriptions=DESCRIPTIONS)
    assert method.description_features.shape[:2] == (3, 2)  # "normal lung" has the 2 templates: 2 of each
    text = tiny.text
    expected = text.encode(text.tokenize(["fluid in the pleural space", "an x-ray of normal lung."]))
    assert torch.allclose(method.description_features[0, 1], expected[0], atol=1e-5)
    assert torch.allclose(method.description_features[2, 1], expected[1], atol=1e-5)


def test_at_initialisation_the_logits_are_coop_from_a_photo_of_a(tiny):
    biomed = build_method("biomedcoop", tiny, NAMES, TEMPLATES, descriptions=DESCRIPTIONS).eval()
    coop = build_method("coop", tiny, NAMES, TEMPLATES, {"ctx_init": "a photo of a"}).eval()
    features = torch.randn(5, tiny.text.output_dim)
    with torch.no_grad():
        assert biomed.config.n_ctx == 4 and torch.allclose(biomed(features), coop(features), atol=1e-5)


def test_the_teacher_drops_descriptions_whose_batch_score_is_an_outlier():
    generator = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(4, 8, generator=generator), dim=-1)
    descriptions = F.normalize(torch.randn(3, 6, 8, generator=generator), dim=-1)
    descriptions[:, 5] = 2 * image.sum(dim=0)  # description 5 matches every image: far above the others
    scale = torch.tensor(10.0)
    scores = []
    for i in range(6):
        best = [max(float(scale * image[b] @ descriptions[c, i]) for c in range(3)) for b in range(4)]
        scores.append(sum(best) / 4)
    mean = sum(scores) / 6
    std = math.sqrt(sum((s - mean) ** 2 for s in scores) / 5)
    kept = [i for i in range(6) if abs(scores[i] - mean) / std <= 1.5]
    assert 5 not in kept and len(kept) >= 3
    expected = F.normalize(descriptions[:, kept].mean(dim=1), dim=-1)
    assert torch.allclose(selected_descriptions(image, descriptions, scale, 1.5), expected, atol=1e-6)


def test_kdsp_is_kl_from_the_teacher_summed_over_batch_and_classes():
    student, teacher = torch.randn(2, 3), torch.randn(2, 3)
    p, q = teacher.softmax(dim=1), student.softmax(dim=1)
    expected = sum(float(p[b, c] * (p[b, c].log() - q[b, c].log())) for b in range(2) for c in range(3)) / 6
    assert abs(float(kdsp_loss(student, teacher)) - expected) < 1e-6


def test_the_loss_adds_both_terms_and_only_the_context_learns(tiny):
    method = build_method("biomedcoop", tiny, NAMES, TEMPLATES, {"sccm_weight": 2.0, "kdsp_weight": 3.0},
                          descriptions=DESCRIPTIONS).train()
    features, labels = torch.randn(4, tiny.text.output_dim), torch.tensor([0, 1, 2, 0])
    logits = method(features)
    learned = method.text_features()
    descriptions = method.description_features
    image = F.normalize(features, dim=-1)
    teacher = method.scale * image @ selected_descriptions(image, descriptions, method.scale, 1.5).T
    expected = (F.cross_entropy(logits, labels) + 2.0 * ((learned - F.normalize(descriptions.mean(1), dim=-1)) ** 2).mean()
                + 3.0 * kdsp_loss(logits, teacher))
    loss = method.loss(logits, labels)
    assert torch.allclose(loss, expected, atol=1e-5)
    loss.backward()
    assert [name for name, p in method.named_parameters() if p.requires_grad] == ["ctx"] and method.ctx.grad.abs().sum() > 0


def test_option_defaults_are_the_original_trainer_defaults():
    """train.py:121-129: N_CTX 4, CTX_INIT "a photo of a", SCCM_LAMBDA 1.0, KDSP_LAMBDA 1.0, TAU 1.5, N_PROMPTS 50."""
    config = BiomedCoOpConfig()
    assert (config.n_ctx, config.ctx_init, config.sccm_weight, config.kdsp_weight, config.tau, config.max_descriptions) == (
        4, "a photo of a", 1.0, 1.0, 1.5, 50)
