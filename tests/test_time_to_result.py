"""Time to result: the decoded-image cache, validation cadence, DataLoader defaults, grad checkpointing, timings."""

import math
import random
import signal

import pytest
import torch
from PIL import Image

from cliptune.commands import api
from cliptune.data import imagecache
from cliptune.training import session as session_lib
from cliptune.config.run import build_config
from cliptune.data.folders import ImageDataset, labels_tensor, loader_settings
from cliptune.training.engine import Inputs, Trainer, eval_interval
from cliptune.core.errors import CliptuneError
from cliptune.data.imagecache import DecodedImages
from cliptune.methods import build_method

TEMPLATES = ["a photo of a {}.", "a {} thing."]


@pytest.fixture(scope="module")
def odd_sizes(tmp_path_factory):
    """Three classes of noisy non-square images larger than the tiny model's 32 px input, so resize and crop both work."""
    root = tmp_path_factory.mktemp("odd")
    rng = random.Random(0)
    for label, colour in enumerate([(200, 40, 40), (40, 200, 60), (50, 70, 220)]):
        for i in range(10):
            size = (rng.randint(36, 60), rng.randint(36, 60))
            image = Image.new("RGB", size)
            image.putdata([tuple(max(0, min(255, c + rng.randint(-70, 70))) for c in colour) for _ in range(size[0] * size[1])])
            path = root / f"class_{label}" / f"{i:02d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path)
    return root


def _session(data, tiny_config, cache_dir=None, **values):
    base = {"data": str(data), "model_config": tiny_config, "epochs": 2, "lr": 0.01, "batch_size": 4, "eval_batch_size": 5}
    config = build_config(None, {**base, **values})
    return session_lib.Session.open(config, session_lib.make_accelerator(), cache_dir=cache_dir)


@pytest.mark.parametrize("method_name,mode", [("full", "memory"), ("maple", "disk"), ("lora", "auto")])
def test_evaluation_through_the_image_cache_equals_decoding_each_file(tiny_config, odd_sizes, tmp_path, method_name, mode):
    session = _session(odd_sizes, tiny_config, cache_dir=tmp_path, image_cache=mode)
    method = build_method(method_name, session.model, session.data.classnames, TEMPLATES)
    trainer = Trainer(method, session.config, None, session.accelerator)
    split = session.data.split("test")
    from_files = Inputs(labels_tensor(split), images=ImageDataset(split, session.eval_transform))
    cached = session.inputs("test", use_features=False)
    assert isinstance(cached.images, DecodedImages) and not cached.images.random
    assert (mode == "disk") == any(tmp_path.glob("images-*.npy"))
    for index in range(len(split)):  # item by item: the same float tensor as ToTensor + Normalize of the file
        assert torch.equal(cached.images[index][0], from_files.images[index][0])
    assert torch.equal(trainer.predict(cached), trainer.predict(from_files))


def test_disk_cache_is_reused_and_matches_memory(tiny_config, odd_sizes, tmp_path, monkeypatch):
    on_disk = _session(odd_sizes, tiny_config, cache_dir=tmp_path, image_cache="disk").images("train")
    in_memory = _session(odd_sizes, tiny_config, image_cache="memory").images("train")
    assert torch.equal(on_disk.pixels, in_memory.pixels) and on_disk.pixels.dtype == torch.uint8
    monkeypatch.setattr(imagecache, "_decode_into", lambda *a, **k: pytest.fail("decoded again"))
    again = _session(odd_sizes, tiny_config, cache_dir=tmp_path, image_cache="disk").images("train")
    assert torch.equal(again.pixels, in_memory.pixels)


def test_auto_mode_goes_to_disk_when_memory_is_short(monkeypatch, tmp_path):
    monkeypatch.setattr(imagecache, "_available_memory", lambda: 1000)
    assert imagecache.choose_mode("auto", 200, tmp_path) == "memory"
    assert imagecache.choose_mode("auto", 300, tmp_path) == "disk"
    assert imagecache.choose_mode("auto", 300, None) == "off"
    assert imagecache.choose_mode("disk", 300, None) == "off"  # no run folder: no disk; too big for memory
    assert imagecache.choose_mode("memory", 10**12, None) == "memory"


def test_training_cache_keeps_room_for_crops_and_augments_on_tensors(tiny_config, odd_sizes):
    session = _session(odd_sizes, tiny_config, aug_crop_scale=[0.5, 1.0], aug_hflip=True)
    train = session.images("train", train=True)
    smallest = min(min(Image.open(path).size) for path in session.data.split("train").files)
    assert smallest >= 37 and train.random and tuple(train.pixels.shape[-2:]) == (math.ceil(1.15 * 32),) * 2
    # images no larger than the input are cached at the input size: cropping them needs no upsampling first
    assert imagecache.train_size((48, 48), session.data.split("train")) == (48, 48)
    assert imagecache.train_size((30, 30), session.data.split("train")) == (min(35, smallest),) * 2
    torch.manual_seed(0)
    first = train[0][0]
    assert first.shape == (3, 32, 32)
    assert not torch.equal(first, train[0][0])  # a new random crop every time
    torch.manual_seed(0)
    assert torch.equal(first, train[0][0])  # seeded by the engine's RNG


def _fit_full(session, epochs=2):
    method = build_method("full", session.model, session.data.classnames, TEMPLATES)
    trainer = Trainer(method, session.config, None, session.accelerator)
    trainer.fit(session.inputs("train", use_features=False, train=True), None, session.data.classes)
    return method.trainable_state_dict()


def test_training_without_augmentation_gives_the_same_weights_with_and_without_the_cache(tiny_config, odd_sizes):
    off = {"aug_crop_scale": [1.0, 1.0], "aug_hflip": False}
    with_cache = _fit_full(_session(odd_sizes, tiny_config, image_cache="memory", **off))
    without = _fit_full(_session(odd_sizes, tiny_config, image_cache="off", **off))
    assert with_cache.keys() == without.keys()
    assert all(torch.equal(with_cache[k], without[k]) for k in with_cache)
    start = build_method("full", _session(odd_sizes, tiny_config).model, ["a", "b", "c"], TEMPLATES).trainable_state_dict()
    assert not all(torch.equal(with_cache[k], start[k]) for k in start)  # training did move the weights


def test_augmented_training_through_the_cache_equals_training_from_files(tiny_config, colour_data):
    """32 px images and a 32 px model: the cached square is the image itself, so crops, flips and weights match."""
    augmenting = {"aug_crop_scale": [0.5, 1.0], "aug_hflip": True, "aug_color_jitter": 0.2}
    session = _session(colour_data, tiny_config, image_cache="memory", **augmenting)
    assert session.images("train", train=True).random
    with_cache = _fit_full(session)
    without = _fit_full(_session(colour_data, tiny_config, image_cache="off", **augmenting))
    assert all(torch.equal(with_cache[k], without[k]) for k in with_cache)


def test_eval_interval_rule():
    config = build_config(None, {})
    train, val = Inputs(torch.zeros(160, dtype=torch.long)), Inputs(torch.zeros(1000, dtype=torch.long))
    assert eval_interval(config, train, val) == math.ceil(1000 / (3 * 0.2 * 160)) == 11
    assert eval_interval(config, train, Inputs(torch.zeros(10, dtype=torch.long))) == 1
    features = Inputs(torch.zeros(1000, dtype=torch.long), features=torch.zeros(1000, 4))
    assert eval_interval(config, train, features) == 1  # cached features: validation is a matrix product
    config.eval_every = 3
    assert eval_interval(config, train, val) == 3
    with pytest.raises(CliptuneError, match="eval_every"):
        build_config(None, {"eval_every": 0})


def test_eval_every_validates_those_epochs_and_the_last(tiny_config, colour_data, tmp_path):
    config = build_config(None, {"data": str(colour_data), "model_config": tiny_config, "method": "full", "epochs": 5,
                                 "lr": 0.001, "batch_size": 8, "eval_every": 2})
    metrics = api.finetune(config, tmp_path / "run")
    validated = [h["epoch"] for h in metrics["train"]["history"] if "val_top1" in h]
    assert validated == [2, 4, 5]
    assert metrics["train"]["best_epoch"] in validated
    # the final report reuses the best epoch's validation pass: the same as evaluating the saved best weights
    assert api.evaluate_run(tmp_path / "run", split="val")["val"] == metrics["val"]
    time = metrics["time"]
    phases = ("startup", "decode", "zeroshot", "inputs", "train", "eval", "final_eval", "other")
    assert all(time[p] >= 0 for p in phases if p != "other")
    assert sum(time[p] for p in phases) == pytest.approx(time["total"], abs=0.05)
    assert time["train"] == pytest.approx(metrics["train"]["seconds"], abs=1e-3) and time["peak_memory_mb"] > 0


# text-tower passes in (the first evaluation pass, both passes); a frozen text side is encoded at most once per run
@pytest.mark.parametrize("method_name,options,passes", [
    ("linear-probe", {}, (0, 0)), ("coop", {}, (1, 2)), ("maple", {}, (1, 2)), ("lora", {}, (1, 2)),
    ("lora", {"lora_towers": "vision"}, (1, 1)), ("full", {}, (1, 2)), ("full", {"train_towers": "vision"}, (0, 0)),
])
def test_evaluation_encodes_class_texts_once_per_pass(tiny_config, colour_data, method_name, options, passes):
    session = _session(colour_data, tiny_config, eval_batch_size=4)
    method = build_method(method_name, session.model, session.data.classnames, TEMPLATES, options)
    method.train()
    trainer = Trainer(method, session.config, None, session.accelerator)
    inputs = session.inputs("train", method.uses_image_features)  # 27 images: 7 batches
    calls = []
    handle = session.model.text.blocks[0].register_forward_hook(lambda *_: calls.append(1))
    try:
        trainer.predict(inputs)
        first = len(calls)
        method.train()  # an optimizer step between passes: the next pass must encode again
        with torch.no_grad():
            for parameter in method.trainable_parameters():
                parameter.add_(0.01)
        trainer.predict(inputs)
    finally:
        handle.remove()
    assert (first, len(calls)) == passes


def test_loader_defaults_per_device():
    assert loader_settings(None, torch.device("cpu")) == {"num_workers": 0, "persistent_workers": False, "pin_memory": False}
    gpu = loader_settings(None, torch.device("cuda"))
    assert 1 <= gpu["num_workers"] <= 8 and gpu["persistent_workers"] and gpu["pin_memory"]
    assert loader_settings(2, torch.device("cpu"))["num_workers"] == 2


def test_workers_keep_one_loader_and_training_reproducible(tiny_config, odd_sizes):
    def run():
        session = _session(odd_sizes, tiny_config, num_workers=1, image_cache="memory")
        return _fit_full(session)

    a, b = run(), run()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method_name", ["full", "lora", "maple"])
def test_grad_checkpointing_gives_the_same_weights(tiny_config, odd_sizes, monkeypatch, method_name):
    import torch.utils.checkpoint as checkpoint_module

    def fit(checkpointing):
        session = _session(odd_sizes, tiny_config, epochs=1, image_cache="memory", grad_checkpointing=checkpointing)
        assert session.model.clip.visual.transformer.grad_checkpointing == checkpointing
        method = build_method(method_name, session.model, session.data.classnames, TEMPLATES)
        Trainer(method, session.config, None, session.accelerator).fit(
            session.inputs("train", use_features=False, train=True), None, session.data.classes)
        return method.trainable_state_dict()

    plain = fit(False)
    calls = []
    original = checkpoint_module.checkpoint
    monkeypatch.setattr(checkpoint_module, "checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k))
    checkpointed = fit(True)
    assert calls  # the towers' blocks did run under checkpointing
    assert all(torch.allclose(plain[k], checkpointed[k], atol=1e-6) for k in plain)


def test_cli_options_and_bad_values(tiny_config, colour_data, tmp_path):
    from click.testing import CliRunner

    from cliptune.cli import cli

    base = ["finetune", "--data", str(colour_data), "--model-config", tiny_config, "--method", "full", "--epochs", "1"]
    bad = CliRunner().invoke(cli, [*base, "--eval-every", "0", "--out", str(tmp_path / "bad")])
    assert bad.exit_code != 0 and "'eval_every' must be at least 1" in bad.output and not (tmp_path / "bad").exists()
    good = CliRunner().invoke(cli, [*base, "--eval-every", "1", "--image-cache", "disk", "--grad-checkpointing", "--out", str(tmp_path / "ok")])
    assert good.exit_code == 0, good.output
    assert list((tmp_path / "ok" / "cache").glob("images-*.npy"))  # train, val and test decoded to the run's cache
    saved = (tmp_path / "ok" / "config.yaml").read_text()
    assert "image_cache: disk" in saved and "grad_checkpointing: true" in saved and "eval_every: 1" in saved


def test_resume_on_augmented_cached_images_gives_the_same_weights(tiny_config, odd_sizes, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from cliptune.core.errors import InterruptedRun

    config = build_config(None, {"data": str(odd_sizes), "model_config": tiny_config, "method": "lora", "epochs": 2,
                                 "lr": 0.01, "batch_size": 4, "image_cache": "memory"})
    reference = api.finetune(config, tmp_path / "straight")
    original = Trainer._local_batches
    count = {"steps": 0}

    def interrupting(self, *args):
        for item in original(self, *args):
            count["steps"] += 1
            if count["steps"] == 8:  # Ctrl-C in the second epoch (6 steps per epoch): the run stops after this step
                signal.raise_signal(signal.SIGINT)  # delivered to this thread, handled before it returns
            yield item

    monkeypatch.setattr(Trainer, "_local_batches", interrupting)
    with pytest.raises(InterruptedRun):
        api.finetune(config, tmp_path / "interrupted")
    monkeypatch.setattr(Trainer, "_local_batches", original)
    resumed = api.finetune(None, tmp_path / "interrupted", resume=True)
    assert [h["loss"] for h in resumed["train"]["history"]] == [h["loss"] for h in reference["train"]["history"]]
    a = load_file(str(tmp_path / "straight/checkpoints/best/method.safetensors"))
    b = load_file(str(tmp_path / "interrupted/checkpoints/best/method.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["time"]["train"] < resumed["train"]["seconds"]  # this process's share only
