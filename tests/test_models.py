import json
import torch
import pytest
from safetensors.torch import save_file

from cliptune.core.errors import CliptuneError
from cliptune.models.loading import load_model


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


def _tiny_state(tiny_config):
    return {k: v.contiguous() for k, v in load_model(model_config=tiny_config).clip.state_dict().items()}


def test_checkpoint_of_another_architecture_names_file_key_and_shapes(tiny_config, tmp_path):
    wider = tmp_path / "wider-clip.json"
    config = json.loads(open(tiny_config).read())
    config["text_cfg"]["width"] = 48  # open_clip asserts "text pos_embed width changed!" on this one
    wider.write_text(json.dumps(config))
    path = tmp_path / "wider.safetensors"
    save_file({k: v.contiguous() for k, v in load_model(model_config=str(wider)).clip.state_dict().items()}, str(path))
    with pytest.raises(CliptuneError) as info:
        load_model(model_config=tiny_config, pretrained=str(path))
    assert str(info.value) == (
        f"checkpoint {path} does not match model tiny-clip (config {tiny_config}): positional_embedding has shape "
        "[24, 48] in the file but [24, 32] in the model (and 28 more)")


def test_checkpoint_with_missing_and_unexpected_keys(tiny_config, tmp_path):
    state = _tiny_state(tiny_config)
    del state["ln_final.weight"]
    state["extra.weight"] = torch.zeros(2)
    path = tmp_path / "keys.pt"
    torch.save(state, path)
    with pytest.raises(CliptuneError) as info:
        load_model(model_config=tiny_config, pretrained=str(path))
    assert str(info.value).endswith(": 1 model key(s) missing from the file (e.g. ln_final.weight); "
                                    "1 unexpected key(s) in the file (e.g. extra.weight)")


def test_unreadable_checkpoint_files_are_named(tiny_config, tmp_path):
    state = _tiny_state(tiny_config)
    good_st, good_pt = tmp_path / "good.safetensors", tmp_path / "good.pt"
    save_file(state, str(good_st))
    torch.save(state, good_pt)
    text_st, text_pt = tmp_path / "text.safetensors", tmp_path / "text.pt"
    text_st.write_text("not weights at all\n" * 10)
    text_pt.write_text("not weights at all\n" * 10)
    cut_st, cut_pt = tmp_path / "cut.safetensors", tmp_path / "cut.pt"
    cut_st.write_bytes(good_st.read_bytes()[:-1000])
    cut_pt.write_bytes(good_pt.read_bytes()[:-1000])
    expected = {
        text_st: f"checkpoint {text_st} is not a safetensors file (header too large)",
        text_pt: f"checkpoint {text_pt} is not a PyTorch checkpoint (torch.save zip file) or .safetensors file",
        cut_st: f"checkpoint {cut_st} is truncated (shorter than its safetensors header says)",
        cut_pt: f"checkpoint {cut_pt} is truncated (a zip archive without its end)",
    }
    for path, message in expected.items():
        with pytest.raises(CliptuneError) as info:
            load_model(model_config=tiny_config, pretrained=str(path))
        assert str(info.value) == message
