"""The shared feature cache: a second run on the same data and model encodes nothing, images or zero-shot text; it
stays within its limit."""

import os
import time

import pytest

from cliptune.commands import api
from cliptune.config.run import build_config
from cliptune.core.cachedir import feature_cache, prune, user_cache_dir
from cliptune.models import features as features_lib


def _config(colour_data, tiny_config, **extra):
    return build_config(None, {"data": str(colour_data), "model_config": tiny_config, "method": "coop", "epochs": 1,
                               "lr": 0.01, "seed": 7, **extra})


def test_a_second_run_reads_every_feature_from_the_shared_cache(colour_data, tiny_config, tmp_path, monkeypatch):
    cache = tmp_path / "shared"
    first = api.finetune(_config(colour_data, tiny_config, cache_dir=str(cache)), tmp_path / "one")
    assert len(list(cache.glob("features-[0-9a-f]*.safetensors"))) == 3  # train, val, test
    assert len(list(cache.glob("features-text-*.safetensors"))) == 1  # the zero-shot head
    encoded = []
    original, original_text = features_lib._compute, features_lib.zeroshot_weights
    monkeypatch.setattr(features_lib, "_compute", lambda *a, **k: encoded.append("images") or original(*a, **k))
    monkeypatch.setattr(features_lib, "zeroshot_weights", lambda *a, **k: encoded.append("text") or original_text(*a, **k))
    second = api.finetune(_config(colour_data, tiny_config, cache_dir=str(cache)), tmp_path / "two")
    assert encoded == [] and second["test"] == first["test"] and second["zeroshot"] == first["zeroshot"]
    assert not (tmp_path / "two" / "cache").exists() or not list((tmp_path / "two" / "cache").glob("features-*"))
    other_seed = api.finetune(_config(colour_data, tiny_config, cache_dir=str(cache), seed=8), tmp_path / "three")
    assert "images" in encoded and "text" in encoded  # another random initialisation is another model, with its own features
    assert other_seed["zeroshot"] != first["zeroshot"]


def test_where_features_go():
    assert feature_cache(None, "RUN") == user_cache_dir() / "features"
    assert feature_cache("run", "RUN") == "RUN" and str(feature_cache("/x", "RUN")) == "/x"
    assert str(user_cache_dir()) == os.environ["CLIPTUNE_CACHE"]  # the tests' own (tests/conftest.py)


def test_the_least_recently_used_files_go_first_when_the_cache_passes_its_limit(tmp_path):
    now = time.time()
    for age, name in enumerate(["new", "middle", "old"]):
        path = tmp_path / f"features-{name}.safetensors"
        path.write_bytes(b"x" * 100)
        os.utime(path, (now - 100 * age, now - 100 * age))
    (tmp_path / "other.txt").write_bytes(b"x" * 1000)  # not a cache file: never counted or removed
    assert [p.name for p in prune(tmp_path, limit=150)] == ["features-old.safetensors", "features-middle.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["features-new.safetensors", "other.txt"]
    assert prune(tmp_path, limit=150) == []


@pytest.mark.parametrize("setting", ["run"])
def test_cache_dir_run_keeps_features_in_the_run(colour_data, tiny_config, tmp_path, setting):
    api.finetune(_config(colour_data, tiny_config, cache_dir=setting), tmp_path / "run")
    assert len(list((tmp_path / "run" / "cache").glob("features-[0-9a-f]*.safetensors"))) == 3  # + the zero-shot text
