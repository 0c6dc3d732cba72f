import torch
import pytest
from safetensors.torch import save_file

from cliptune.errors import CliptuneError
from cliptune.models import load_model


def test_random_init_is_seeded(tiny_config):
    a = load_model(model_config=tiny_config, seed=3)
    b = load_model(model_config=tiny_config, seed=3)
    for (name, p), (_, q) in zip(a.clip.state_dict().items(), b.clip.state_dict().items()):
        assert torch.equal(p, q), name


def test_text_tower_matches_open_clip(tiny_config):
    model = load_model(model_config=tiny_config)
    ids = model.text.tokenize(["a photo of a cat.", "a much longer sentence about a dog on grass."])
    expected = model.clip.encode_text(ids, normalize=True)
    assert torch.allclose(model.text.encode(ids), expected, atol=1e-6)


def test_local_checkpoint_roundtrip(tiny_config, tmp_path):
    source = load_model(model_config=tiny_config, seed=1)
    for suffix in (".safetensors", ".pt"):
        path = tmp_path / f"ckpt{suffix}"
        state = {k: v.contiguous() for k, v in source.clip.state_dict().items()}
        save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
        loaded = load_model(model_config=tiny_config, pretrained=str(path), seed=99)
        for key, value in source.clip.state_dict().items():
            assert torch.equal(loaded.clip.state_dict()[key], value), key


def test_model_name_must_match_config_or_is_registered_under_it(tiny_config):
    model = load_model(model="my-arch", model_config=tiny_config)
    assert model.spec.model == "my-arch"


def test_mismatched_checkpoint(tiny_config, tmp_path):
    state = load_model(model_config=tiny_config).clip.state_dict()
    state["text_projection"] = torch.zeros(3, 3)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CliptuneError, match="does not match model tiny-clip"):
        load_model(model_config=tiny_config, pretrained=str(tmp_path / "bad.safetensors"))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"model": "ViT-B-99"}, "unknown model 'ViT-B-99'"),
        ({"model": "ViT-B-32", "pretrained": "nonsense_tag"}, "unknown pretrained tag"),
        ({"model": "ViT-B-32", "pretrained": "/nowhere/weights.pt"}, "checkpoint file not found"),
        ({"model": "ViT-B-32", "pretrained": "openai"}, "could not download the weights"),
        ({"model": "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"}, "could not download the weights"),
        ({}, "no model given"),
        ({"model_config": "/nowhere/config.json"}, "model config file not found"),
    ],
)
def test_model_errors_are_one_sentence(kwargs, message):
    with pytest.raises(CliptuneError, match=message) as info:
        load_model(**kwargs)
    assert "\n" not in str(info.value)
