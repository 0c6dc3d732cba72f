"""Full/partial fine-tuning: the three losses, tower/block unlocking, calibration metrics, CLI flags."""

import json

import pytest
import torch
import torch.nn.functional as F
import yaml
from click.testing import CliRunner
from open_clip.loss import ClipLoss
from safetensors.torch import load_file

from cliptune.commands import api
from cliptune.training import session as session_lib
from cliptune.cli import cli
from cliptune.config.run import build_config
from cliptune.training.engine import Trainer
from cliptune.core.errors import CliptuneError
from cliptune.methods.losses import class_similarity, contrastive_loss, soft_contrastive_targets, soft_target_loss, soft_targets
from cliptune.methods import build_method
from cliptune.models.loading import load_model
from helpers import run_two_processes_and_one

TEMPLATES = ["a photo of a {}.", "a {} thing."]


def _unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


# ----- losses -----
def test_soft_target_with_epsilon_zero_is_cross_entropy():
    logits = torch.randn(7, 5, generator=torch.Generator().manual_seed(1)) * 4
    labels = torch.tensor([0, 4, 2, 2, 1, 3, 0])
    similarity = class_similarity(_unit(5, 16), tau=0.5)
    for smoothing in (0.0, 0.1):
        expected = F.cross_entropy(logits, labels, label_smoothing=smoothing)
        assert torch.equal(soft_target_loss(logits, labels, similarity, 0.0, smoothing), expected)
    # and epsilon > 0 really moves the target
    assert not torch.allclose(soft_target_loss(logits, labels, similarity, 0.3), F.cross_entropy(logits, labels))


def test_soft_targets_put_exactly_epsilon_on_the_other_classes():
    features = _unit(5, 16, seed=6)
    labels, epsilon, tau = torch.tensor([0, 3, 3, 4, 1]), 0.2, 0.3
    targets = soft_targets(labels, class_similarity(features, tau), epsilon)
    for row, y in zip(targets, labels.tolist()):
        others = [c for c in range(5) if c != y]
        assert row[y] == pytest.approx(1 - epsilon, abs=1e-6)
        assert float(row[others].sum()) == pytest.approx(epsilon, abs=1e-6)
        # in proportion to exp(cos / tau) over the other classes only (computed independently)
        weights = torch.tensor([float(torch.exp(features[y] @ features[c] / tau)) for c in others])
        assert torch.allclose(row[others], epsilon * weights / weights.sum(), atol=1e-6)


def test_identical_descriptions_get_equal_soft_mass(tiny_config):
    model = load_model(model_config=tiny_config)
    same = ["a small furry pet", "an animal that purrs"]
    # keyed by class name, as methods receive them (ImageFolderData.named_descriptions)
    descriptions = {"cat": same, "kitten": list(same), "car": ["a vehicle with four wheels"]}
    method = build_method("full", model, ["cat", "kitten", "car"], TEMPLATES,
                          {"loss": "soft-target", "soft_epsilon": 1.0, "soft_tau": 0.05}, descriptions)
    targets = soft_targets(torch.tensor([0, 1, 2]), method.similarity, 1.0)
    assert torch.allclose(targets.sum(dim=1), torch.ones(3))
    assert torch.equal(targets.diagonal(), torch.zeros(3))  # epsilon 1: nothing left on the true class
    assert targets[2, 0] == targets[2, 1]  # from the car, cat and kitten are alike
    assert targets[0, 1] > targets[0, 2] and targets[1, 0] > targets[1, 2]  # a cat's mass goes to the kitten
    logits = torch.randn(3, 3)
    expected = -(targets * logits.log_softmax(dim=1)).sum(dim=1).mean()
    assert torch.allclose(method.loss(logits, torch.tensor([0, 1, 2])), expected, atol=1e-6)


def test_contrastive_loss_is_flyps_clip_loss_even_with_repeated_classes():
    images, texts = _unit(6, 16, seed=2), _unit(6, 16, seed=3)
    scale = torch.tensor(20.0)
    for labels in (torch.tensor([4, 0, 5, 1, 3, 2]), torch.tensor([1, 1, 0, 1, 0, 2])):
        assert torch.allclose(contrastive_loss(images, texts, scale, labels), ClipLoss()(images, texts, scale), rtol=0, atol=1e-6)


def test_same_class_positive_counts_same_class_pairs_as_positives():
    images, texts = _unit(4, 16, seed=4), _unit(4, 16, seed=5)
    scale, labels = torch.tensor(10.0), torch.tensor([1, 0, 1, 2])
    logits = scale * images @ texts.T
    targets = torch.tensor([[0.5, 0, 0.5, 0], [0, 1, 0, 0], [0.5, 0, 0.5, 0], [0, 0, 0, 1]])
    expected = (-(targets * logits.log_softmax(1)).sum(1).mean() - (targets * logits.T.log_softmax(1)).sum(1).mean()) / 2
    loss = contrastive_loss(images, texts, scale, labels, same_class="positive")
    assert torch.allclose(loss, expected, atol=1e-6)
    assert not torch.allclose(loss, ClipLoss()(images, texts, scale))  # ClipLoss treats them as negatives
    # with unique classes both choices are CLIP's loss
    unique = torch.tensor([3, 0, 1, 2])
    assert torch.allclose(contrastive_loss(images, texts, scale, unique, same_class="positive"), ClipLoss()(images, texts, scale), atol=1e-6)


def test_soft_contrastive_loss_by_hand():
    images, texts = _unit(4, 8, seed=8), _unit(4, 8, seed=9)
    classes = _unit(3, 8, seed=10)
    labels, scale, epsilon, tau = torch.tensor([2, 0, 2, 1]), torch.tensor(10.0), 0.3, 0.5
    targets = soft_contrastive_targets(labels, classes @ classes.T, epsilon, tau)
    expected_targets = torch.zeros(4, 4)
    for i in range(4):
        weights = {j: float(torch.exp(classes[labels[i]] @ classes[labels[j]] / tau)) for j in range(4) if j != i}
        for j, w in weights.items():
            expected_targets[i, j] = epsilon * w / sum(weights.values())
        expected_targets[i, i] = 1 - epsilon
    assert torch.allclose(targets, expected_targets, atol=1e-6)
    logits = scale * images @ texts.T
    expected = (-(expected_targets * logits.log_softmax(1)).sum(1).mean()
                - (expected_targets * logits.T.log_softmax(1)).sum(1).mean()) / 2
    assert torch.allclose(contrastive_loss(images, texts, scale, labels, targets=targets), expected, atol=1e-6)
    assert torch.equal(soft_contrastive_targets(labels, classes @ classes.T, 0.0, tau), torch.eye(4))


def test_contrastive_method_pairs_each_image_with_a_caption_of_its_class(tiny_config):
    model = load_model(model_config=tiny_config)
    classnames = ["red apple", "green leaf", "blue sky"]
    method = build_method("full", model, classnames, TEMPLATES, {"loss": "contrastive"}).train()
    images, labels = torch.rand(4, 3, 32, 32), torch.tensor([2, 0, 0, 1])
    features = method(images)
    assert features.shape == (4, 32)  # training: image features for the batch-wise loss
    torch.manual_seed(7)
    loss = method.loss(features, labels)
    torch.manual_seed(7)
    chosen = torch.randint(len(TEMPLATES), (4,))
    captions = [TEMPLATES[t].format(classnames[y]) for t, y in zip(chosen.tolist(), labels.tolist())]
    texts = model.text.encode(model.text.tokenize(captions))
    assert torch.allclose(loss, contrastive_loss(features, texts, model.logit_scale, labels), atol=1e-5)
    loss.backward()
    assert model.clip.visual.proj.grad is not None and model.clip.text_projection.grad is not None
    method.eval()
    with torch.no_grad():
        assert method(images).shape == (4, 3)  # evaluation: class logits


def test_class_head_is_the_zeroshot_classifier(tiny_config):
    from cliptune.models.zeroshot import zeroshot_weights

    model = load_model(model_config=tiny_config)
    method = build_method("full", model, ["a", "b", "c"], TEMPLATES).eval()
    images = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        expected = model.logit_scale * model.image.encode(images) @ zeroshot_weights(model.text, ["a", "b", "c"], TEMPLATES).T
        assert torch.allclose(method(images), expected, atol=1e-5)


# ----- what trains -----
def test_tower_and_logit_scale_selection(tiny_config):
    model = load_model(model_config=tiny_config)
    vision = build_method("full", model, ["a", "b"], TEMPLATES, {"train_towers": "vision"})
    names = set(vision.trainable_state_dict())
    assert names and all(n.startswith("clip.visual.") for n in names)
    assert not vision.uses_image_features
    text = build_method("full", load_model(model_config=tiny_config), ["a", "b"], TEMPLATES,
                        {"train_towers": "text", "lock_logit_scale": False})
    names = set(text.trainable_state_dict())
    assert "clip.logit_scale" in names and not any(n.startswith("clip.visual.") for n in names)
    assert "clip.token_embedding.weight" in names and text.uses_image_features  # frozen image tower: cached features


def test_unlock_last_one_leaves_every_other_block_bit_identical(tiny_config, split_data):
    config = build_config(None, {"data": str(split_data), "model_config": tiny_config, "method": "full", "epochs": 1,
                                 "lr": 0.01, "batch_size": 8}, method_values={"unlock_last": 1})
    accelerator = session_lib.make_accelerator()
    session = session_lib.Session.open(config, accelerator)
    method = build_method("full", session.model, session.data.classnames, session.templates, config.method_options())
    before = {k: v.clone() for k, v in method.clip.state_dict().items()}
    Trainer(method, config, None, accelerator).fit(session.inputs("train", False, train=True), None, session.data.classes)
    after = method.clip.state_dict()
    unlocked = ("visual.transformer.resblocks.1.", "visual.ln_post.", "visual.proj",
                "transformer.resblocks.1.", "ln_final.", "text_projection")
    assert {k[len("clip."):] for k in method.trainable_state_dict()} == {k for k in before if k.startswith(unlocked)}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(unlocked) for k in changed)
    assert any(k.startswith("visual.transformer.resblocks.1.") for k in changed)
    assert any(k.startswith("transformer.resblocks.1.") for k in changed)


# ----- runs and CLI -----
def _finetune_args(data, tiny_config, out, *extra):
    return ["finetune", "--model-config", tiny_config, "--data", str(data), "--method", "full", "--epochs", "1",
            "--batch-size", "8", "--lr", "0.001", "--out", str(out), *extra]


def test_cli_soft_target_run_records_calibration(tiny_config, split_data, tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, _finetune_args(split_data, tiny_config, tmp_path / "run", "--loss", "soft-target",
                                               "--soft-epsilon", "0.2", "--label-smoothing", "0.1", "--unlock-last", "1"))
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for block in ("test", "zeroshot", "val"):
        assert 0 <= metrics[block]["ece"] <= 1 and metrics[block]["nll"] > 0
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert config["label_smoothing"] == 0.1
    assert config["full"]["loss"] == "soft-target" and config["full"]["soft_epsilon"] == 0.2
    assert config["full"]["unlock_last"] == 1
    zeroshot = runner.invoke(cli, ["zeroshot", "--model-config", tiny_config, "--data", str(split_data),
                                   "--out", str(tmp_path / "zs")])
    assert zeroshot.exit_code == 0, zeroshot.output
    zs = json.loads((tmp_path / "zs" / "metrics.json").read_text())["test"]
    assert zs["ece"] == metrics["zeroshot"]["ece"] and zs["nll"] == metrics["zeroshot"]["nll"]


def test_contrastive_text_only_run_evaluates(tiny_config, split_data, tmp_path):
    result = CliRunner().invoke(cli, _finetune_args(split_data, tiny_config, tmp_path / "run", "--loss", "contrastive",
                                                    "--train-towers", "text", "--no-lock-logit-scale"))
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["method"] == "full" and metrics["test"]["n"] == 16
    report = api.evaluate_run(tmp_path / "run")
    assert report["test"]["top1"] == metrics["test"]["top1"]


@pytest.mark.parametrize("options, message", [
    ({"loss": "focal"}, "'full.loss' must be one of"),
    ({"train_towers": "vision,audio"}, "'full.train_towers' must be a comma list of vision, text"),
    ({"unlock_last": 5}, "exceeds the 2 blocks"),
    ({"soft_epsilon": 1.5}, "soft_epsilon"),
])
def test_bad_options_are_one_line_errors(tiny_config, options, message):
    with pytest.raises(CliptuneError, match=message):
        build_method("full", load_model(model_config=tiny_config), ["a", "b"], TEMPLATES, options)


def test_full_flags_only_apply_to_full(tiny_config, split_data, tmp_path):
    result = CliRunner().invoke(cli, ["finetune", "--model-config", tiny_config, "--data", str(split_data),
                                      "--loss", "contrastive", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "--loss does not apply to method 'linear-probe'" in result.output


@pytest.mark.parametrize("recipe, loss", [("flyp", "contrastive"), ("soft-target", "soft-target")])
def test_recipes_select_the_full_method_and_loss(recipe, loss):
    config = build_config(recipe, {"data": "sample_data"})
    assert config.method == "full" and config.method_options()["loss"] == loss
    assert config.weight_decay == 0.1 and config.warmup_steps == 500 and config.lr <= 3e-5


# ----- WiSE-FT's linear head -----
def test_linear_head_starts_as_wise_fts_zeroshot_head(tiny_config):
    from cliptune.models.zeroshot import zeroshot_weights

    model = load_model(model_config=tiny_config)
    method = build_method("full", model, ["a", "b", "c"], TEMPLATES, {"head": "linear", "train_towers": "vision"})
    weights = zeroshot_weights(model.text, ["a", "b", "c"], TEMPLATES)
    assert torch.allclose(method.head.weight, weights * model.clip.logit_scale.exp()) and not method.head.bias.any()
    images = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        expected = model.logit_scale * model.image.encode(images) @ weights.T  # the zero-shot logits
        assert torch.allclose(method.eval()(images), expected, atol=1e-4)
    names = set(method.trainable_state_dict())
    assert {"head.weight", "head.bias"} <= names and all(n.startswith(("clip.visual.", "head.")) for n in names)
    assert method.class_specific and not method.uses_image_features


@pytest.mark.parametrize("options, message", [
    ({"same_class": "maybe"}, "'full.same_class' must be one of negative, positive"),
    ({"head": "mlp"}, "'full.head' must be one of zeroshot, linear"),
    ({"head": "linear"}, "set full.train_towers=vision"),
    ({"head": "linear", "train_towers": "vision", "loss": "contrastive"}, "full.loss to ce or soft-target"),
])
def test_bad_head_and_pairing_options(tiny_config, options, message):
    with pytest.raises(CliptuneError, match=message):
        build_method("full", load_model(model_config=tiny_config), ["a", "b"], TEMPLATES, options)


# ----- several processes -----
@pytest.mark.distributed
def test_torchrun_contrastive_two_processes_match_one(tiny_config, colour_data, tmp_path):
    """Features all-gathered with their gradient: 2 processes compute the 1-process loss and update.

    The soft-contrastive loss: it gathers the labels beside the features and builds its targets across the whole
    gathered batch, so it covers the plain contrastive loss's gather path and more (both go through `_caption_loss`).

    27 training images in batches of 13: the last batch has one image, so one process gets an empty slice.
    SGD, because Adam turns float noise in gradients that are zero in exact arithmetic (attention key
    biases) into full-size steps, which would hide what this compares.
    """
    args = ["finetune", "--data", str(colour_data), "--model-config", tiny_config, "--method", "full", "--loss", "soft-contrastive",
            "--train-towers", "text", "--no-lock-logit-scale", "--epochs", "2", "--lr", "0.05", "--batch-size", "13",
            "--optimizer", "sgd"]
    run_two_processes_and_one(args, tmp_path, quiet_two=True)
    m2 = json.loads((tmp_path / "two/metrics.json").read_text())
    m1 = json.loads((tmp_path / "one/metrics.json").read_text())
    assert (m2["processes"], m1["processes"]) == (2, 1)
    for h2, h1 in zip(m2["train"]["history"], m1["train"]["history"]):
        assert h2["loss"] == pytest.approx(h1["loss"], abs=1e-5)
    w2 = load_file(str(tmp_path / "two/checkpoints/best/method.safetensors"))
    w1 = load_file(str(tmp_path / "one/checkpoints/best/method.safetensors"))
    assert "clip.logit_scale" in w1  # the logit scale trains, as in FLYP
    assert all(torch.allclose(w2[k], w1[k], atol=1e-5) for k in w1)


def test_flyp_recipe_follows_the_original_code():
    options = build_config("flyp", {"data": "sample_data"}).method_options()
    assert options["same_class"] == "negative" and options["lock_logit_scale"] is False
