"""BiomedCLIP-architecture models (timm ViT image tower + Hugging Face BERT text tower), built offline.

tests/fixtures/tiny-biomedclip.json is BiomedCLIP's open_clip config in miniature: timm's `test_vit`
(same block design as vit_base_patch16_224: class token, fused qkv, token pooling, no pretrained
weights) and a 2-layer random BertModel from tests/fixtures/tiny-bert (CLS pooling, MLP projection).
"""

import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from cliptune.cli import cli
from cliptune.methods import build_method
from cliptune.methods.lora import SplitQKV
from cliptune.models.loading import load_model
from cliptune.models.towers import HFTextTower
from cliptune.models.zeroshot import zeroshot_weights
from helpers import maple_block_inputs
from helpers import FIXTURES

CONFIG = str(FIXTURES / "tiny-biomedclip.json")
NAMES = ["tomato late blight", "healthy leaf", "corn common rust", "grape black rot"]
TEMPLATES = ["a photo of a {}.", "an image of a {}."]
BERT_LINEARS = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value", "out": "attention.output.dense"}
TIMM_LINEARS = {"q": "attn.qkv.q_proj", "k": "attn.qkv.k_proj", "v": "attn.qkv.v_proj", "out": "attn.proj"}


@pytest.fixture
def biomed():
    return load_model(model_config=CONFIG, seed=0)


def images(n=3):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(n))


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def finetune(data, out, method, *extra):
    return run("finetune", "--model-config", CONFIG, "--data", data, "--method", method, "--epochs", 1,
               "--batch-size", 8, "--lr", 0.001, "--out", out, *extra)


def test_zeroshot_cli_from_another_working_directory(split_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the config's "./tiny-bert" paths resolve against the config file, not the cwd
    result = run("zeroshot", "--model-config", CONFIG, "--data", split_data, "--out", "zs")
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "zs" / "metrics.json").read_text())
    assert metrics["test"]["n"] == 16 and len(metrics["classes"]) == 4


def test_hf_text_tower_matches_open_clip_encode_text(biomed):
    text = biomed.text
    assert isinstance(text, HFTextTower) and text.context_length == 64 and text.pad_id == 0
    ids = text.tokenize(["a photo of a red apple.", "blue sky", "x"])
    vocab = biomed.tokenizer.tokenizer
    assert (ids[:, 0] == vocab.cls_token_id).all() and ids[2, 2] == vocab.sep_token_id and ids[2, 3:].eq(0).all()
    seen = []
    with torch.no_grad():
        expected = biomed.clip.encode_text(ids, normalize=True)
        assert (text.encode(ids) - expected).abs().max() < 1e-6
        hooked = text.encode_embeddings(text.embed_tokens(ids), ids, lambda i, x: seen.append(i) or x)
    assert seen == [0, 1] and (F.normalize(hooked, dim=-1) - expected).abs().max() < 1e-6


def test_coop_with_ctx_init_reproduces_the_zeroshot_prompt(biomed):
    method = build_method("coop", biomed, NAMES, TEMPLATES, {"ctx_init": "a photo of a"}).eval()
    token_ids = method.prompts.token_ids
    assert method.config.n_ctx == 4 and token_ids[:, 0].eq(biomed.tokenizer.tokenizer.cls_token_id).all()
    assert token_ids.shape[1] < 64  # only up to the last real token is encoded: padding is masked anyway
    with torch.no_grad():
        expected = zeroshot_weights(biomed.text, NAMES, ["a photo of a {}."])
        assert (method.text_features() - expected).abs().max() < 1e-5


@pytest.mark.parametrize("options", [{}, {"lora_targets": "q,k,v,out", "lora_layers": "1"}])
def test_lora_is_exact_at_init_and_merges_back_into_the_plain_layout(options):
    base = load_model(model_config=CONFIG, seed=0)
    model = load_model(model_config=CONFIG, seed=0)
    method = build_method("lora", model, NAMES, TEMPLATES, options).eval()
    x = images()
    with torch.no_grad():
        weights = zeroshot_weights(base.text, NAMES, TEMPLATES)
        expected = base.logit_scale * F.normalize(base.clip.encode_image(x), dim=-1) @ weights.T
        assert (method(x) - expected).abs().max() < 1e-5
    adapted = {n.split(".lora_A")[0] for n, _ in method.named_parameters() if ".lora_A" in n}
    targets, text_layers, vision_layers = (("q", "k", "v", "out"), [1], [1]) if options else (("q", "k", "v"), range(2), range(6))
    assert adapted == {f"clip.text.transformer.encoder.layer.{i}.{BERT_LINEARS[t]}" for i in text_layers for t in targets} | {
        f"clip.visual.trunk.blocks.{i}.{TIMM_LINEARS[t]}" for i in vision_layers for t in targets}
    with torch.no_grad():
        for parameter in method.trainable_parameters():
            parameter.normal_(std=0.05)
        merged = method.merged_clip()
        assert set(merged.state_dict()) == set(base.clip.state_dict())
        assert not any(isinstance(m, SplitQKV) for m in merged.modules())
        assert (merged.encode_image(x) - model.clip.encode_image(x)).abs().max() < 1e-5
        ids = base.text.tokenize(["a photo of a corn."])
        assert (merged.encode_text(ids) - model.clip.encode_text(ids)).abs().max() < 1e-5


@pytest.mark.parametrize("method", ["full", "lora"])
def test_one_epoch_finetune_finishes(split_data, tmp_path, method):
    result = finetune(split_data, tmp_path / method, method)
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / method / "metrics.json").read_text())
    assert metrics["test"]["n"] == 16


def test_full_unlock_last_trains_the_last_blocks_and_heads(biomed):
    method = build_method("full", biomed, NAMES, TEMPLATES, {"unlock_last": 1})
    trainable = {n for n, p in method.named_parameters() if p.requires_grad}
    assert any(".encoder.layer.1." in n for n in trainable) and not any(".encoder.layer.0." in n for n in trainable)
    assert any(".trunk.blocks.5." in n for n in trainable) and not any(".trunk.blocks.4." in n for n in trainable)
    assert {"clip.text.proj.0.weight", "clip.visual.head.proj.weight", "clip.visual.trunk.norm.weight"} <= trainable


def test_maple_prompts_both_towers(biomed):
    method = build_method("maple", biomed, NAMES, [], {"prompt_depth": 2, "n_ctx": 2}).eval()
    text_seen, image_seen, vision = maple_block_inputs(method, biomed, images())
    assert torch.equal(text_seen[1][:, 1:3], method.language_prompts()[1].expand(len(NAMES), -1, -1))
    assert torch.equal(image_seen[1][:, -2:], vision[1].expand(3, -1, -1))
    assert torch.equal(image_seen[0][:, -2:], vision[0].expand(3, -1, -1))  # test_vit's pre-norm is the identity
    assert image_seen[0].shape[1] == 1 + 4 + 2  # class token + 2x2 patches + prompts
    with torch.no_grad():  # no prompt tokens: the cut-up forward is the timm tower's own
        x = images()
        no_prompts = [torch.zeros(0, biomed.image.width)]
        assert (biomed.image.encode_prompted(x, no_prompts) - biomed.image.encode(x)).abs().max() < 1e-6
        depth_one = build_method("maple", biomed, NAMES, [], {"prompt_depth": 1, "n_ctx": 4}).eval()
        assert (depth_one.text_features() - zeroshot_weights(biomed.text, NAMES, ["a photo of a {}."])).abs().max() < 1e-5


def test_one_epoch_maple_finishes(split_data, tmp_path):
    result = finetune(split_data, tmp_path / "maple", "maple", "--set", "maple.prompt_depth=2")
    assert result.exit_code == 0, result.output


def test_two_task_continual_run_finishes(split_data, tmp_path):
    result = run("continual", "--model-config", CONFIG, "--method", "full", "--strategy", "naive", "--epochs", 1,
                 "--batch-size", 8, "--lr", 0.001, "--out", tmp_path / "cl",
                 "--task", f"{split_data}:Corn_(maize)___Common_rust,Grape___Black_rot",
                 "--task", f"{split_data}:Tomato___Late_blight,Tomato___healthy")
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "cl" / "continual.json").read_text())
    assert len(saved["acc"]) == 2 and all(len(row) == 2 for row in saved["acc"])
