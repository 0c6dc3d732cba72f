"""LoRA: exact at init, only adapter weights train, merge is lossless, options are validated."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cliptune.core.errors import CliptuneError
from cliptune.methods import build_method
from cliptune.methods.lora import SplitAttention, parse_layers
from cliptune.models.loading import load_model
from cliptune.models.zeroshot import zeroshot_weights

CLASSES = ["red apple", "green leaf", "blue sky"]
TEMPLATES = ["a photo of a {}.", "{}."]


def tiny(tiny_config):
    return load_model(model_config=tiny_config, seed=0)


def base_logits(model, images):
    with torch.no_grad():
        weights = zeroshot_weights(model.text, CLASSES, TEMPLATES)
        return model.logit_scale * F.normalize(model.clip.encode_image(images), dim=-1) @ weights.T


def train_a_little(method, images, labels, steps=3, lr=0.05):
    optimizer = torch.optim.AdamW(method.trainable_parameters(), lr=lr)
    method.train()
    for _ in range(steps):
        inputs = method.model.clip.encode_image(images) if method.uses_image_features else images
        F.cross_entropy(method(inputs), labels).backward()
        optimizer.step()
        optimizer.zero_grad()
    return method.eval()


@pytest.mark.parametrize("options", [{}, {"lora_targets": "q,k,v,out", "lora_layers": "1"}, {"lora_towers": "text"}])
def test_logits_equal_base_model_before_training(tiny_config, options):
    images = torch.randn(5, 3, 32, 32)
    expected = base_logits(tiny(tiny_config), images)
    model = tiny(tiny_config)
    method = build_method("lora", model, CLASSES, TEMPLATES, options).eval()
    inputs = model.clip.encode_image(images) if method.uses_image_features else images
    with torch.no_grad():
        assert (method(inputs) - expected).abs().max() < 1e-5


def test_split_attention_matches_multihead_attention_with_causal_mask():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    split = SplitAttention(mha).eval()
    x = torch.randn(3, 7, 16)
    mask = torch.full((7, 7), float("-inf")).triu(1)
    with torch.no_grad():
        expected = mha(x, x, x, need_weights=False, attn_mask=mask)[0]
        assert (split(x, x, x, need_weights=False, attn_mask=mask)[0] - expected).abs().max() < 1e-6
        assert (split(x, x, x, attn_mask=mask.isinf())[0] - expected).abs().max() < 1e-6  # bool mask convention
        assert (split.to_multihead()(x, x, x, need_weights=False, attn_mask=mask)[0] - expected).abs().max() < 1e-6


def test_only_lora_weights_change_and_merge_is_lossless(tiny_config):
    torch.manual_seed(0)
    images, labels = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2])
    reference = tiny(tiny_config).clip.state_dict()
    model = tiny(tiny_config)
    method = build_method("lora", model, CLASSES, TEMPLATES, {"lora_dropout": 0.0})
    lora_names = [name for name, p in method.named_parameters() if p.requires_grad]
    assert lora_names and all(".lora_A." in n or ".lora_B." in n for n in lora_names)
    # q, k, v targets x (A: r·d + B: d·r, r=2) over 2 vision blocks (d=64) and 2 text blocks (d=32)
    assert sum(p.numel() for p in method.trainable_parameters()) == 3 * (2 * 2) * (2 * 64 + 2 * 32)
    train_a_little(method, images, labels)
    assert any(p.abs().sum() > 0 for n, p in method.named_parameters() if ".lora_B." in n)

    merged = method.merged_clip()
    merged_state = merged.state_dict()
    assert set(merged_state) == set(reference)
    changed = {k for k in reference if not torch.equal(reference[k], merged_state[k])}
    assert changed and all(k.endswith("attn.in_proj_weight") for k in changed)  # q/k/v only, no biases, no MLPs
    # frozen weights inside the unmerged model are untouched too
    for name, tensor in method.clip.state_dict().items():
        if "lora_" not in name and name in reference:
            assert torch.equal(tensor, reference[name]), name

    with torch.no_grad():
        unmerged = method(images)
        fresh = tiny(tiny_config)
        fresh.clip.load_state_dict(merged_state)
        assert (base_logits(fresh, images) - unmerged).abs().max() < 1e-4
        assert (base_logits(fresh, images) - base_logits(tiny(tiny_config), images)).abs().max() > 1e-3


def test_text_only_uses_cached_features_and_keeps_vision_untouched(tiny_config):
    model = tiny(tiny_config)
    method = build_method("lora", model, CLASSES, TEMPLATES, {"lora_towers": "text", "lora_targets": "v,out"})
    assert method.uses_image_features
    assert all(isinstance(b.attn, nn.MultiheadAttention) for b in model.image.blocks)
    assert all(isinstance(b.attn, SplitAttention) for b in model.text.blocks)
    trainable = [n for n, p in method.named_parameters() if p.requires_grad]
    assert trainable and not any("visual" in n for n in trainable)
    assert all(".v_proj.lora_" in n or ".out_proj.lora_" in n for n in trainable)


def test_dropout_follows_train_mode_and_text_side_is_cached_in_eval(tiny_config):
    method = build_method("lora", tiny(tiny_config), CLASSES, TEMPLATES, {})
    method.train()
    dropouts = [m for n, m in method.clip.named_modules() if n.endswith("lora_dropout.default")]
    assert dropouts and all(d.training for d in dropouts) and not method.clip.training
    method.eval()
    assert not any(d.training for d in dropouts)
    with torch.no_grad():
        first = method.class_features()
        assert method.class_features() is first  # evaluation encodes the prompts once
    assert method.class_features().requires_grad  # with gradients on, the trained text side is encoded anew


def test_layer_ranges_and_bad_options(tiny_config):
    assert parse_layers("all", 12, "vision") == list(range(12))
    assert parse_layers("6-11", 12, "vision") == [6, 7, 8, 9, 10, 11]
    assert parse_layers("0,2-3", 12, "text") == [0, 2, 3]
    assert parse_layers(3, 12, "text") == [3]
    with pytest.raises(CliptuneError, match="out of range for the text tower"):
        parse_layers("6-11", 3, "text")
    with pytest.raises(CliptuneError, match="indices/ranges"):
        parse_layers("six", 12, "text")
    for options, message in [({"lora_towers": "audio"}, "lora_towers"), ({"lora_targets": "q,mlp"}, "lora_targets"),
                             ({"lora_r": 0}, "'lora.lora_r' must be at least 1"), ({"lora_layers": "5"}, "out of range")]:
        with pytest.raises(CliptuneError, match=message):
            build_method("lora", tiny(tiny_config), CLASSES, TEMPLATES, options)


def test_16_shot_lora_beats_zero_shot_on_the_demo(tmp_path):
    """Both towers adapted, one short epoch (digits: no flips, mild crops); well under a minute on CPU."""
    from pathlib import Path

    from cliptune.commands import api
    from cliptune.config.run import build_config

    root = Path(__file__).resolve().parent.parent
    demo = root / "cliptune" / "assets" / "demo"
    config = build_config(None, {
        "model_config": str(demo / "demo-clip.json"), "pretrained": str(demo / "demo-clip.safetensors"),
        "data": str(root / "sample_data"), "method": "lora", "shots": 16, "epochs": 1, "lr": 1e-2, "batch_size": 16,
        "aug_hflip": False, "aug_crop_scale": [0.9, 1.0],
    })
    metrics = api.finetune(config, tmp_path / "run")
    assert metrics["test"]["n"] == metrics["zeroshot"]["n"] == 401
    assert metrics["test"]["top1"] > metrics["zeroshot"]["top1"] + 0.03
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    # q, k, v targets x 2r x (4 vision blocks of width 128 + 3 text blocks of width 64)
    assert saved["train"]["trainable_params"] == 3 * (2 * 2) * (4 * 128 + 3 * 64)
