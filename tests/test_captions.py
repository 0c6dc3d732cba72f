"""Captions: read from a manifest column, `.txt` sidecars and a `datasets` column; the contrastive losses pair each
image with its own caption (`--caption-prob` of the time) and evaluation stays class-based."""

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from cliptune.cli import cli
from cliptune.core.errors import CliptuneError
from cliptune.data.manifest import ManifestColumns
from cliptune.data.sources import load_data
from cliptune.methods import build_method
from cliptune.methods.losses import contrastive_loss
from cliptune.models.loading import load_model
from cliptune.training.engine import Inputs
from helpers import run_two_processes_and_one

TEMPLATES = ["a photo of a {}.", "a {} thing."]
CLASSNAMES = ["red apple", "green leaf", "blue sky"]


def _caption(image: Path) -> str:
    """A caption that only this image has (its class and number), or none for every third image."""
    number = int(image.stem)
    return "" if number % 3 == 2 else f"a {image.parent.name.replace('_', ' ')} picture, number {number}"


@pytest.fixture
def captioned(colour_data, tmp_path):
    """The colour ImageFolder with `.txt` sidecars, and a CSV manifest of the same images and captions."""
    root = shutil.copytree(colour_data, tmp_path / "captioned")
    images = sorted(root.rglob("*.png"))
    with (root / "all.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "caption"])
        for image in images:
            writer.writerow([str(image.relative_to(root)), image.parent.name, _caption(image)])
            if _caption(image):
                image.with_suffix(".txt").write_text(_caption(image) + "\n")
    return root


def test_manifest_sidecars_and_datasets_give_the_same_captions(captioned, tmp_path):
    from_folder = load_data(captioned, strict=True)  # a caption sidecar is neither an image nor a file to refuse
    assert from_folder.skipped_files == 0
    from_manifest = load_data(captioned / "all.csv")
    expected = {image.resolve(): _caption(image) for image in captioned.rglob("*.png") if _caption(image)}
    assert {p.resolve(): c for p, c in from_folder.captions.items()} == expected
    assert {p.resolve(): c for p, c in from_manifest.captions.items()} == expected
    datasets = pytest.importorskip("datasets")
    images = sorted(captioned.rglob("*.png"))
    table = {"image": [str(p) for p in images], "label": [p.parent.name for p in images],
             "text": [_caption(p) for p in images]}
    datasets.Dataset.from_dict(table).save_to_disk(str(tmp_path / "saved"))
    from_datasets = load_data(tmp_path / "saved", columns=ManifestColumns(caption="text"))
    assert {p.resolve(): c for p, c in from_datasets.captions.items()} == expected
    assert not load_data(tmp_path / "saved").captions  # no 'caption' column: no captions, no error


def test_a_named_caption_column_that_is_missing_is_one_line(captioned):
    with pytest.raises(CliptuneError, match=r"all.csv has no 'symptoms' column for the captions .*--caption-col"):
        load_data(captioned / "all.csv", columns=ManifestColumns(caption="symptoms"))


def _captions_in_loss(method, features, labels, ids, captions, seed):
    """The loss `method` computes for the batch `ids`, and the captions it must have paired the images with (drawn
    by hand with the same seed: a template per image, then the `caption_prob` draw)."""
    torch.manual_seed(seed)
    loss = method.loss(features, labels, sample_ids=ids)
    torch.manual_seed(seed)
    chosen = torch.randint(len(TEMPLATES), (len(ids),)).tolist()
    keep = (torch.rand(len(ids)) < method.config.caption_prob).tolist() if method.config.caption_prob < 1 else [True] * len(ids)
    texts = [captions[i] if captions[i] and k else TEMPLATES[t].format(CLASSNAMES[y])
             for i, t, y, k in zip(ids.tolist(), chosen, labels.tolist(), keep)]
    return loss, texts


@pytest.mark.parametrize("towers, caption_prob", [("vision", 1.0), ("vision,text", 1.0), ("text", 0.5)])
def test_contrastive_loss_pairs_each_image_with_its_own_caption(tiny_config, towers, caption_prob):
    model = load_model(model_config=tiny_config)
    method = build_method("full", model, CLASSNAMES, TEMPLATES,
                          {"loss": "contrastive", "train_towers": towers, "caption_prob": caption_prob}).train()
    captions = ["a red apple on a plate", None, "sky without clouds", "a leaf in autumn", None, "another sky"]
    labels_all = torch.tensor([0, 0, 2, 1, 1, 2])
    method.prepare(Inputs(labels=labels_all, features=torch.randn(6, 32), captions=captions))
    assert method.reads_sample_ids
    ids = torch.tensor([3, 1, 0, 5, 2])
    features = method(torch.rand(5, 3, 32, 32) if "vision" in towers else torch.randn(5, 32))  # cached features
    loss, texts = _captions_in_loss(method, features, labels_all[ids], ids, captions, seed=11)
    with torch.no_grad():
        encoded = model.text.encode(model.text.tokenize(texts))
    assert torch.allclose(loss, contrastive_loss(features, encoded, model.logit_scale, labels_all[ids]), atol=1e-5)
    if caption_prob == 1.0:  # the images with a caption were paired with it, the others with a template
        assert texts[0] == "a leaf in autumn" and texts[1] in ("a photo of a red apple.", "a red apple thing.")
    loss.backward()


def test_caption_prob_zero_and_data_without_captions_train_alike(tiny_config):
    model = load_model(model_config=tiny_config)
    labels = torch.tensor([0, 1, 2, 1])
    losses = []
    for caption_prob, captions in ((0.0, ["one", "two", "three", "four"]), (1.0, None)):
        method = build_method("full", model, CLASSNAMES, TEMPLATES,
                              {"loss": "contrastive", "train_towers": "text", "caption_prob": caption_prob}).train()
        method.prepare(Inputs(labels=labels, features=torch.randn(4, 32), captions=captions))
        assert not method.reads_sample_ids
        features = method(torch.randn(4, 32, generator=torch.Generator().manual_seed(1)))  # cached image features
        torch.manual_seed(3)
        losses.append(method.loss(features, labels))
    assert torch.equal(losses[0], losses[1])


def _finetune(data, tiny_config, out, *extra):
    args = ["finetune", "--data", str(data), "--model-config", tiny_config, "--method", "full", "--loss", "contrastive",
            "--train-towers", "text", "--epochs", "2", "--lr", "0.01", "--batch-size", "8", "--out", str(out), *extra]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return load_file(str(out / "checkpoints/best/method.safetensors")), json.loads((out / "metrics.json").read_text()), result.output


def test_finetune_trains_on_a_caption_manifest_and_evaluates_by_class(captioned, colour_data, tiny_config, tmp_path):
    own, metrics, output = _finetune(captioned / "all.csv", tiny_config, tmp_path / "own")
    assert "17 of 27 training images have a caption (17 distinct)" in output
    assert set(metrics["test"]["per_class"]) == {"red_apple", "green_leaf", "blue_sky"}  # class-based evaluation
    templates, _, _ = _finetune(captioned / "all.csv", tiny_config, tmp_path / "templates", "--caption-prob", "0")
    plain, _, _ = _finetune(colour_data, tiny_config, tmp_path / "plain")
    assert all(torch.equal(templates[k], plain[k]) for k in plain)  # --caption-prob 0: the template-only run
    assert not all(torch.equal(own[k], plain[k]) for k in plain)  # captions changed what was learned


@pytest.mark.distributed
def test_torchrun_caption_pairs_two_processes_match_one(captioned, tiny_config, tmp_path):
    """Each process looks up the captions of its own slice of the batch: 2 processes equal 1."""
    args = ["finetune", "--data", str(captioned), "--model-config", tiny_config, "--method", "full", "--loss", "contrastive",
            "--train-towers", "text", "--caption-prob", "0.5", "--epochs", "2", "--lr", "0.05", "--batch-size", "13",
            "--optimizer", "sgd"]
    run_two_processes_and_one(args, tmp_path, quiet_two=True)
    w2 = load_file(str(tmp_path / "two/checkpoints/best/method.safetensors"))
    w1 = load_file(str(tmp_path / "one/checkpoints/best/method.safetensors"))
    assert all(torch.allclose(w2[k], w1[k], atol=1e-5) for k in w1)
