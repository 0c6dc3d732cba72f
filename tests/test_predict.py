"""`cliptune.load`, `predict` and the classifier export: every method classifies new images as its run did."""

import csv
import io
import json
import shutil

import pytest
import torch
import yaml
from click.testing import CliRunner

import cliptune
from cliptune.cli import cli
from cliptune.deploy.classifier import HEAD_WEIGHTS, METHOD_WEIGHTS, MODEL_WEIGHTS, SIDECAR
from cliptune.data.folders import load_imagefolder

# one short run per method (random tiny CLIP, high lr so learned state really moves)
METHOD_RUNS = {
    "linear-probe": ["--lr", 0.05],
    "coop": ["--n-ctx", 2, "--lr", 0.05],
    "cocoop": ["--n-ctx", 2, "--lr", 0.05],
    "maple": ["--n-ctx", 2, "--prompt-depth", 2, "--lr", 0.05],
    "promptsrc": ["--n-ctx", 2, "--vision-ctx", 2, "--prompt-depth", 2, "--lr", 0.05],
    "lora": ["--lora-dropout", 0, "--lr", 0.05],
    "full": ["--lr", 0.001],
    "tip-adapter": ["--alpha", 2, "--beta", 3],
    "tip-adapter-f": ["--lr", 0.05],
    "clip-adapter": ["--lr", 0.05],
    "kgcoop": ["--lr", 0.05],
    "clap": ["--lr", 0.5],
    "mocoop": ["--lr", 0.05],
    "biomedcoop": ["--lr", 0.05],
}


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def runs(tiny_config, split_data, tmp_path_factory):
    """Finished run folders: one per method plus a zero-shot run, on the same data."""
    root = tmp_path_factory.mktemp("runs")
    folders = {}
    for method, options in METHOD_RUNS.items():
        out = root / method
        result = run("finetune", "--data", split_data, "--model-config", tiny_config, "--method", method,
                     "--epochs", 2, "--batch-size", 8, *options, "--out", out)
        assert result.exit_code == 0, result.output
        folders[method] = out
    result = run("zeroshot", "--data", split_data, "--model-config", tiny_config, "--out", root / "zeroshot")
    assert result.exit_code == 0, result.output
    folders["zeroshot"] = root / "zeroshot"
    return folders


def split_of(run_dir):
    """The run's test split, rebuilt from its config: files and label indices."""
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    data = load_imagefolder(config["data"], config["val_fraction"], config["test_fraction"], config["seed"])
    return data.splits["test"].files, data.splits["test"].labels


def top1_of(classifier, run_dir):
    files, labels = split_of(run_dir)
    predicted = [top[0][0] for top in classifier.predict(files, topk=1, batch_size=5)]
    return sum(classifier.classes.index(p) == y for p, y in zip(predicted, labels)) / len(labels)


def same_top(a, b) -> bool:
    """Same classes in the same order, probabilities equal to 1e-6."""
    return [c for c, _ in a] == [c for c, _ in b] and all(abs(p - q) < 1e-6 for (_, p), (_, q) in zip(a, b))


ALL = [*METHOD_RUNS, "zeroshot"]


@pytest.mark.parametrize("name", ALL)
def test_load_predicts_the_runs_test_accuracy(runs, name):
    metrics = json.loads((runs[name] / "metrics.json").read_text())
    classifier = cliptune.load(runs[name])
    assert classifier.classes == metrics["classes"] and classifier.method == name
    assert top1_of(classifier, runs[name]) == pytest.approx(metrics["test"]["top1"], abs=1e-9)


@pytest.mark.parametrize("name", ALL)
def test_classifier_export_is_self_contained_and_reproduces_the_run(runs, name, tmp_path):
    # a copy of the run whose training data path no longer exists: the export must not need it
    copy = tmp_path / "run"
    shutil.copytree(runs[name], copy)
    config = yaml.safe_load((copy / "config.yaml").read_text())
    data = config["data"]
    config["data"] = str(tmp_path / "gone")
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "classifier"
    result = run("export", copy, "--format", "classifier", "--output", out)
    assert result.exit_code == 0, result.output
    shutil.rmtree(copy)  # nor the run folder

    sidecar = json.loads((out / SIDECAR).read_text())
    merges = name in ("lora", "full")
    assert sidecar["weights"] == ("merged" if merges else "base")
    assert (out / MODEL_WEIGHTS).is_file()  # the tiny test model is random: its weights travel with the export
    assert (out / HEAD_WEIGHTS).is_file() == (merges or name == "zeroshot")
    assert (out / METHOD_WEIGHTS).is_file() == (not merges and name != "zeroshot")
    assert sidecar["preprocessing"]["crop"] == [32, 32] and sidecar["classes"] == json.loads((runs[name] / "metrics.json").read_text())["classes"]

    exported, original = cliptune.load(out), cliptune.load(runs[name])
    images = torch.randn(4, 3, 32, 32)
    assert (exported.logits(images) - original.logits(images)).abs().max() < 1e-4
    config["data"] = data  # to rebuild the test split
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.yaml").write_text(yaml.safe_dump(config))
    metrics = json.loads((runs[name] / "metrics.json").read_text())
    assert top1_of(exported, tmp_path / "cfg") == pytest.approx(metrics["test"]["top1"], abs=1e-9)


def test_merged_head_equals_the_zero_shot_head_of_the_merged_weights(runs, tmp_path, tiny_config):
    """Independent check of the LoRA export: open_clip on model.safetensors + averaged template features."""
    import open_clip
    import torch.nn.functional as F

    from cliptune.models.loading import load_model
    from cliptune.models.zeroshot import zeroshot_weights

    out = tmp_path / "lora-classifier"
    assert run("export", runs["lora"], "--format", "classifier", "--output", out).exit_code == 0
    open_clip.add_model_config(tiny_config)
    clip, _, _ = open_clip.create_model_and_transforms("tiny-clip", pretrained=str(out / MODEL_WEIGHTS))
    model = load_model(model_config=tiny_config)
    model.clip = clip.eval()
    sidecar = json.loads((out / SIDECAR).read_text())
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        weights = zeroshot_weights(model.text, sidecar["classnames"], sidecar["templates"])
        expected = clip.logit_scale.exp() * F.normalize(clip.encode_image(images), dim=-1) @ weights.T
    assert (cliptune.load(out).logits(images) - expected).abs().max() < 1e-4


def test_classifier_api(runs):
    classifier = cliptune.load(runs["coop"]).to("cpu")
    files, _ = split_of(runs["coop"])
    from PIL import Image

    image = Image.open(files[0])
    tensor = classifier.preprocess(image)
    assert tensor.shape == (3, 32, 32)
    logits = classifier.logits(tensor[None])
    top = classifier.predict([image], topk=3)[0]
    assert [c for c, _ in top] == [classifier.classes[i] for i in logits[0].topk(3).indices]
    assert [p for _, p in top] == pytest.approx(logits.softmax(1)[0].topk(3).values.tolist(), abs=1e-6)
    assert same_top(classifier.predict(str(files[0]), topk=3)[0], top)  # a path works like the PIL image
    features = classifier.encode_image(tensor[None])
    assert features.shape == (1, 32) and features.norm(dim=-1).item() == pytest.approx(1.0, abs=1e-5)
    # coop's logits are the scaled cosine of these features with its prompts' text features
    method = classifier.network.method
    with torch.no_grad():
        expected = method.scale * features @ method.text_features().T
    assert (expected - logits).abs().max() < 1e-4


def test_predict_command_formats_unreadable_files_and_folders(runs, split_data, tmp_path):
    folder = tmp_path / "images"
    shutil.copytree(split_data / "test", folder)  # class folders: walked recursively
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "notes.txt").write_text("not an image, not listed")
    classifier = cliptune.load(runs["linear-probe"])
    files = sorted(p for p in folder.rglob("*.png") if p.name != "broken.png")

    result = run("predict", runs["linear-probe"], folder, "--format", "json", "--topk", 2, "--batch-size", 3,
                 "--output", tmp_path / "out.json")
    assert result.exit_code == 0, result.output
    assert "skipped 1 unreadable file(s)" in result.output and "broken.png" in result.output
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["unreadable"] == [str(folder / "broken.png")]
    assert sorted(item["file"] for item in report["predictions"]) == sorted(map(str, files))
    expected = dict(zip(map(str, files), classifier.predict(files, topk=2)))
    for item in report["predictions"]:
        assert len(item["top"]) == 2
        assert same_top([(t["class"], t["probability"]) for t in item["top"]], expected[item["file"]])

    result = run("predict", runs["linear-probe"], files[0], files[1], "--format", "csv", "--topk", 3)
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [r["rank"] for r in rows] == ["1", "2", "3"] * 2
    assert rows[0]["class"] == expected[str(files[0])][0][0]

    result = run("predict", runs["linear-probe"], files[0])
    assert result.exit_code == 0, result.output
    header, line = result.stdout.strip().splitlines()
    assert header.split()[:2] == ["FILE", "TOP-1"] and line.startswith(str(files[0]))
    assert f"{expected[str(files[0])][0][0]} (" in line


def test_predict_reads_the_images_a_manifest_lists(runs, split_data, tmp_path):
    files = sorted((split_data / "test").rglob("*.png"))[:3]
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\n" + "".join(f"{f},{f.parent.name}\n" for f in files))
    result = run("predict", runs["linear-probe"], manifest, "--format", "json", "--output", tmp_path / "out.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out.json").read_text())
    expected = cliptune.load(runs["linear-probe"]).predict(files, topk=5)
    assert [item["file"] for item in report["predictions"]] == list(map(str, files))  # the manifest's row order
    assert all(same_top([(t["class"], t["probability"]) for t in item["top"]], top)
               for item, top in zip(report["predictions"], expected))


def test_predict_refuses_bad_sources_in_one_line(runs, tmp_path):
    (tmp_path / "bad.png").write_bytes(b"x")
    result = run("predict", runs["coop"], tmp_path / "bad.png")
    assert result.exit_code != 0 and "none of the 1 file(s) is a readable image" in result.output
    result = run("predict", tmp_path, tmp_path / "bad.png")
    assert result.exit_code != 0 and "neither a cliptune run folder" in result.output
    assert "Traceback" not in result.output


def test_onnx_export_without_the_extra_says_how_to_get_it(runs, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    result = run("export", runs["coop"], "--format", "onnx", "--output", tmp_path / "m.onnx")
    assert result.exit_code != 0 and 'pip install "cliptune[onnx]"' in result.output
    assert not (tmp_path / "m.onnx").exists()
