"""CoOp, CoCoOp and MaPLe: equivalences with hand-written prompts, MaPLe's prompt structure, frozen towers,
the base-to-novel protocol, evaluation on other class lists, and (on the demo model) beating zero-shot."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from cliptune.commands import api
from cliptune.cli import cli
from cliptune.config.run import build_config
from cliptune.core.errors import CliptuneError
from cliptune.methods import build_method
from cliptune.models.loading import load_model
from cliptune.models.zeroshot import zeroshot_weights
from helpers import block_inputs, maple_block_inputs, make_imagefolder

NAMES = ["red apple", "green leaf", "blue sky", "a rather long name for one class"]
ROOT = Path(__file__).resolve().parent.parent
DEMO = dict(model_config=str(ROOT / "cliptune/assets/demo/demo-clip.json"),
            pretrained=str(ROOT / "cliptune/assets/demo/demo-clip.safetensors"))


@pytest.fixture(scope="module")
def tiny(tiny_config):
    return load_model(model_config=tiny_config, seed=0)


def images(n=3, size=32):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


# ----- CoOp -----
@pytest.mark.parametrize("position, template", [("end", "a photo of a {}."), ("front", "{} a photo of a."),
                                                ("middle", "a photo {} of a.")])
def test_coop_ctx_init_reproduces_the_template(tiny, position, template):
    method = build_method("coop", tiny, NAMES, [], {"ctx_init": "a photo of a", "class_token_position": position})
    assert method.config.n_ctx == 4 and method.ctx.shape == (4, tiny.text.width)
    method.eval()
    with torch.no_grad():
        learned = method.text_features()
    expected = zeroshot_weights(tiny.text, NAMES, [template])
    assert (learned - expected).abs().max() < 1e-5
    # only the prefix up to the last end token is encoded (causal mask): same features, less work
    assert method.prompts.token_ids.shape[1] == 1 + 4 + 7 + 1 + 1 < tiny.text.context_length


def test_coop_pools_at_the_real_end_token_for_any_context_length(tiny):
    """Random context of 7 tokens in a 24-token context: set to the "X" embeddings it must equal that text."""
    method = build_method("coop", tiny, NAMES, [], {"n_ctx": 7})
    with torch.no_grad():
        method.ctx.copy_(tiny.text.embed_tokens(tiny.text.tokenize(["X X X X X X X"]))[0, 1:8])
        assert (F.normalize(method.prompts.encode(method.ctx), dim=-1)
                - zeroshot_weights(tiny.text, NAMES, ["X X X X X X X {}."])).abs().max() < 1e-5
    assert method(torch.randn(5, 32)).shape == (5, len(NAMES))


def test_coop_rejects_prompts_that_do_not_fit(tiny):
    with pytest.raises(CliptuneError, match="does not fit the text context"):
        build_method("coop", tiny, NAMES, [], {"n_ctx": 20})


def test_class_specific_coop_has_one_context_per_class_and_refuses_other_classes(tiny):
    method = build_method("coop", tiny, NAMES, [], {"n_ctx": 3, "class_specific": True})
    assert method.ctx.shape == (len(NAMES), 3, tiny.text.width) and method.class_specific
    assert method(torch.randn(2, 32)).shape == (2, len(NAMES))
    with pytest.raises(CliptuneError, match="cannot be used on other classes"):
        method.set_classes(["cat", "dog"])


def test_eval_cache_follows_parameter_updates(tiny):
    method = build_method("coop", tiny, NAMES, [], {"n_ctx": 2}).eval()
    features = torch.randn(4, 32)
    with torch.no_grad():
        before = method(features)
        assert torch.equal(before, method(features))
        method.ctx.add_(torch.randn(method.ctx.shape))
        after = method(features)
    assert not torch.allclose(before, after)
    method.set_classes(["cat", "dog"])
    with torch.no_grad():
        assert method(features).shape == (4, 2)


# ----- CoCoOp -----
def test_cocoop_with_a_silent_meta_net_is_coop_and_chunking_changes_nothing(tiny):
    cocoop = build_method("cocoop", tiny, NAMES, [], {"text_chunk": 1})
    hidden = cocoop.meta_net[0].out_features
    assert hidden == max(1, tiny.text.output_dim // 16) and cocoop.meta_net[2].out_features == tiny.text.width
    features = torch.randn(5, tiny.text.output_dim)
    with torch.no_grad():
        chunked = cocoop(features)
        cocoop.config.text_chunk = 10_000
        assert (chunked - cocoop(features)).abs().max() < 1e-5
        cocoop.meta_net[2].weight.zero_()
        cocoop.meta_net[2].bias.zero_()
        coop = build_method("coop", tiny, NAMES, [], {"ctx_init": "a photo of a"})
        assert (cocoop(features) - coop(features)).abs().max() < 1e-4


def test_cocoop_forward_gives_each_image_its_own_prompts(tiny):
    """CoCoOp's logits for image i are CoOp's with context ctx + meta_net(image i), not a shared context."""
    cocoop = build_method("cocoop", tiny, NAMES, [], {})
    coop = build_method("coop", tiny, NAMES, [], {"ctx_init": "a photo of a"})
    with torch.no_grad():
        cocoop.meta_net[2].bias.normal_(generator=torch.Generator().manual_seed(0))
        features = torch.randn(3, tiny.text.output_dim, generator=torch.Generator().manual_seed(1))
        logits = cocoop(features)
        shifts = cocoop.meta_net(F.normalize(features, dim=-1))
        for i in range(len(features)):
            coop.ctx.copy_(cocoop.ctx + shifts[i])
            assert (logits[i] - coop(features[i : i + 1])[0]).abs().max() < 1e-4
        coop.ctx.copy_(cocoop.ctx)  # one shared context: other logits
        assert (logits - coop(features)).abs().max() > 1e-2


# ----- MaPLe -----
def test_maple_depth_is_capped_and_every_prompted_layer_reaches_both_towers(tiny):
    method = build_method("maple", tiny, NAMES, [], {"prompt_depth": 9}).eval()
    depth = method.depth
    assert depth == len(tiny.text.blocks) == 2 and len(method.language_prompts()) == len(method.couplings) == depth
    x = images()
    with torch.no_grad():
        text, image = method.text_features().clone(), method.image_features(x)
        for k in range(1, depth + 1):  # perturb the layer-k language prompt
            prompt = method.language_prompts()[k - 1]
            delta = torch.randn(prompt.shape, generator=torch.Generator().manual_seed(k))
            prompt.add_(delta)
            assert not torch.allclose(method.text_features(), text, atol=1e-4), k
            assert not torch.allclose(method.image_features(x), image, atol=1e-4), k
            prompt.sub_(delta)
        coupling = method.couplings[1]
        coupling.bias.add_(torch.randn(coupling.bias.shape))  # layer 2's vision prompt comes from its coupling only
        assert torch.allclose(method.text_features(), text, atol=1e-6)
        assert not torch.allclose(method.image_features(x), image, atol=1e-6)


def test_maple_deeper_prompts_replace_the_previous_layers_tokens(tiny):
    method = build_method("maple", tiny, NAMES, [], {"prompt_depth": 2, "n_ctx": 2}).eval()
    text_seen, image_seen, vision = maple_block_inputs(method, tiny, images())
    deep = method.language_prompts()[1]
    assert torch.equal(text_seen[1][:, 1:3], deep.expand(len(NAMES), -1, -1))
    assert torch.equal(image_seen[1][:, -2:], vision[1].expand(3, -1, -1))
    pre_norm = tiny.clip.visual.ln_pre
    assert torch.allclose(image_seen[0][:, -2:], pre_norm(vision[0]).expand(3, -1, -1), atol=1e-6)


def test_maple_with_depth_one_prompts_only_the_input_layers(tiny):
    method = build_method("maple", tiny, NAMES, [], {"prompt_depth": 1}).eval()
    assert len(method.language_prompts()) == 1 and len(method.deep_text) == 0 and len(method.couplings) == 1
    with block_inputs(tiny.image.blocks) as (image_seen,), torch.no_grad():
        method.image_features(images())
        vision = method.vision_prompts()
    n = method.config.n_ctx
    assert image_seen[0].shape[1] == image_seen[1].shape[1] == 17 + n  # 16 patches + class token + prompts
    assert not torch.allclose(image_seen[1][:, -n:], vision[0].expand(3, -1, -1))  # carried over, not re-inserted
    # k > depth: there is no prompt for layer 2 to perturb
    assert {name for name, _ in method.named_parameters() if "deep_text" in name} == set()


def test_maple_without_prompts_matches_the_plain_towers(tiny):
    """At depth 1 with the init phrase as context, the text side is exactly the hand-written prompt."""
    method = build_method("maple", tiny, NAMES, [], {"prompt_depth": 1, "n_ctx": 4}).eval()
    with torch.no_grad():
        assert (method.text_features() - zeroshot_weights(tiny.text, NAMES, ["a photo of a {}."])).abs().max() < 1e-5


# ----- frozen towers -----
@pytest.mark.parametrize("name, options, expected", [
    ("coop", {"n_ctx": 4}, {"ctx"}),
    ("cocoop", {}, {"ctx", "meta_net.0.weight", "meta_net.0.bias", "meta_net.2.weight", "meta_net.2.bias"}),
    ("maple", {}, {"ctx", "deep_text.0", "couplings.0.weight", "couplings.0.bias", "couplings.1.weight", "couplings.1.bias"}),
])
def test_only_prompt_parameters_train_and_the_backbone_is_unchanged(tiny_config, name, options, expected):
    model = load_model(model_config=tiny_config, seed=0)
    method = build_method(name, model, NAMES, [], options)
    assert {n for n, p in method.named_parameters() if p.requires_grad} == expected
    before = {k: v.clone() for k, v in model.clip.state_dict().items()}
    optimizer = torch.optim.SGD(method.trainable_parameters(), lr=0.5)
    method.train()
    inputs = images(4) if name == "maple" else torch.randn(4, 32)
    labels = torch.tensor([0, 1, 2, 3])
    for _ in range(2):
        optimizer.zero_grad()
        method.loss(method(inputs), labels).backward()
        optimizer.step()
    assert all(p.grad is None for p in model.clip.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.trainable_parameters())
    after = model.clip.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# ----- runs: base-to-novel, saved prompts, evaluation on other classes -----
@pytest.fixture(scope="module")
def colour_splits(tmp_path_factory):
    root = tmp_path_factory.mktemp("prompt-colours")
    classes = ("blue_sky", "green_leaf", "red_apple", "yellow_sun", "purple_plum")
    return make_imagefolder(root, classes=classes, per_class=4, splits=True)


@pytest.fixture(scope="module")
def other_classes(tmp_path_factory):
    root = tmp_path_factory.mktemp("other-colours")
    return make_imagefolder(root, classes=("cyan_sea", "magenta_dye"), per_class=4, splits=True)


def run_config(tiny_config, data, method, **extra):
    cli_values = dict(model_config=tiny_config, data=str(data), method=method, epochs=1, batch_size=4, lr=0.01,
                      optimizer="sgd", num_workers=0, **extra)
    return build_config(None, cli_values)


@pytest.mark.parametrize("method, options", [("coop", {"n_ctx": 4}), ("cocoop", {}), ("maple", {"prompt_depth": 2})])
def test_base_to_novel_run_saves_prompts_and_evaluates_on_other_classes(tiny_config, colour_splits, other_classes,
                                                                          tmp_path, method, options):
    config = run_config(tiny_config, colour_splits, method, base_novel=True)
    config.methods[method] = options
    metrics = api.finetune(config, tmp_path / "run")
    assert metrics["classes"] == ["blue_sky", "green_leaf", "purple_plum"]  # sorted, first ceil(5/2)
    assert metrics["novel_classes"] == ["red_apple", "yellow_sun"]
    assert metrics["base"]["n"] == 6 and metrics["novel"]["n"] == 4
    for prefix in ("", "zeroshot_"):
        base, novel = metrics[f"{prefix}base"]["top1"], metrics[f"{prefix}novel"]["top1"]
        assert metrics[f"{prefix}hm"] == pytest.approx(2 * base * novel / (base + novel) if base + novel else 0.0)
    assert json.loads((tmp_path / "run/metrics.json").read_text())["hm"] == metrics["hm"]
    sidecar = json.loads((tmp_path / "run/checkpoints/best/method.json").read_text())
    assert sidecar["method"] == method and sidecar["model_config"] == tiny_config
    assert "n_ctx" in sidecar["config"] and (method != "maple" or sidecar["config"]["prompt_depth"] == 2)
    report = api.evaluate_run(tmp_path / "run", str(other_classes))
    assert report["classes"] == ["cyan_sea", "magenta_dye"] and report["test"]["n"] == 4


def test_base_to_novel_refuses_class_specific_methods(tiny_config, colour_splits, tmp_path):
    config = run_config(tiny_config, colour_splits, "coop", base_novel=True)
    config.methods["coop"] = {"n_ctx": 2, "class_specific": True}
    with pytest.raises(CliptuneError, match="base-novel"):
        api.finetune(config, tmp_path / "run")


def test_class_specific_coop_run_cannot_be_evaluated_on_other_classes(tiny_config, colour_splits, other_classes, tmp_path):
    config = run_config(tiny_config, colour_splits, "coop")
    config.methods["coop"] = {"n_ctx": 2, "class_specific": True}
    api.finetune(config, tmp_path / "run")
    with pytest.raises(CliptuneError, match="different classes"):
        api.evaluate_run(tmp_path / "run", str(other_classes))


def test_cli_flags_and_base_novel(tiny_config, colour_splits, tmp_path):
    out = tmp_path / "cli"
    result = CliRunner().invoke(cli, [
        "finetune", "--model-config", tiny_config, "--data", str(colour_splits), "--method", "coop",
        "--ctx-init", "a photo of a", "--class-token-position", "middle", "--base-novel", "--epochs", "1",
        "--batch-size", "4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "coop novel: top-1" in result.output and "harmonic mean" in result.output
    sidecar = json.loads((out / "checkpoints/best/method.json").read_text())
    assert sidecar["config"] == {"n_ctx": 4, "ctx_init": "a photo of a", "class_specific": False,
                                 "class_token_position": "middle", "text_chunk": 0}
    wrong = CliRunner().invoke(cli, ["finetune", "--model-config", tiny_config, "--data", str(colour_splits),
                                     "--method", "coop", "--prompt-depth", "3", "--out", str(tmp_path / "x")])
    assert wrong.exit_code == 2 and "--prompt-depth does not apply to method 'coop'" in wrong.output


def test_recipes_load(tmp_path):
    for name, method in (("coop", "coop"), ("cocoop", "cocoop"), ("maple", "maple")):
        config = build_config(name)
        assert config.method == method and config.methods[method]["n_ctx"] >= 1


@pytest.mark.parametrize("name, options", [
    ("coop", {"n_ctx": 3}), ("coop", {"ctx_init": "a photo of a", "class_token_position": "middle"}),
    ("coop", {"n_ctx": 2, "class_specific": True}), ("cocoop", {}), ("maple", {"prompt_depth": 2}),
    ("promptsrc", {"prompt_depth": 2}),
    ("lora", {"lora_towers": "text", "lora_dropout": 0.0}), ("full", {"train_towers": "text"})])
def test_chunked_text_encoding_gives_the_same_logits_and_gradients(tiny, tiny_config, name, options):
    """`text_chunk`: prompts encoded a few at a time with activation checkpointing, exactly as in one call."""
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    features = torch.randn(6, tiny.text.output_dim, generator=torch.Generator().manual_seed(2))
    results = []
    for chunk in (10_000, 1, 3):  # one call, then 1 and 3 prompts per call (CoCoOp: 6 images x 4 classes)
        model = load_model(model_config=tiny_config, seed=0) if name in ("lora", "full") else tiny  # these change it
        method = build_method(name, model, NAMES, ["a photo of a {}.", "art of a {}."], {**options, "text_chunk": chunk},
                              seed=3).train()
        logits = method(features if method.uses_image_features else images(6))
        F.cross_entropy(logits, labels).backward()
        results.append((logits.detach(), [p.grad.clone() for p in method.trainable_parameters()]))
    for logits, grads in results[1:]:
        assert torch.allclose(logits, results[0][0], atol=1e-5)
        assert len(grads) == len(results[0][1]) and any(g.abs().sum() > 0 for g in grads)
        for grad, reference in zip(grads, results[0][1]):  # summed per chunk: float order differs
            assert torch.allclose(grad, reference, rtol=1e-4, atol=1e-5)
