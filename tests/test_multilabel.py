"""Multi-label manifests: label sets, splits and few-shot sampling, the softmax multi-label loss, mAP / F1 at
thresholds fitted on val, and the methods that train on them."""

import csv
import json
import random
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from cliptune.cli import cli
from cliptune.core.errors import CliptuneError
from cliptune.core.metrics import classification_metrics, fit_thresholds
from cliptune.data.manifest import ManifestColumns
from cliptune.data.sources import load_data
from helpers import COLOURS

NAMES = ["red", "green", "blue", "yellow"]


def _two_colour_image(path: Path, left: int, right: int, rng: random.Random) -> None:
    image = Image.new("RGB", (32, 32))
    pixels = image.load()
    for x in range(32):
        colour = COLOURS[left if x < 16 else right]
        for y in range(32):
            pixels[x, y] = tuple(max(0, min(255, c + rng.randint(-40, 40))) for c in colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


@pytest.fixture(scope="module")
def colour_pairs(tmp_path_factory) -> Path:
    """Images of two colour halves, labelled with the colours they show (one or two labels): a `labels` manifest."""
    root = tmp_path_factory.mktemp("pairs")
    rng = random.Random(0)
    with (root / "pairs.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "labels"])
        for i in range(72):
            left, right = rng.randrange(4), rng.randrange(4)
            _two_colour_image(root / "images" / f"{i:03d}.png", left, right, rng)
            writer.writerow([f"images/{i:03d}.png", "|".join(dict.fromkeys([NAMES[left], NAMES[right]]))])
    return root / "pairs.csv"


def test_a_labels_column_makes_a_multi_label_dataset(colour_pairs):
    data = load_data(colour_pairs, seed=3)
    assert data.multi_label and data.classes == sorted(NAMES)
    rows = {line.split(",")[0]: line.strip().split(",")[1] for line in colour_pairs.read_text().splitlines()[1:]}
    for split in data.splits.values():
        for file, target, first in zip(split.files, split.targets, split.labels):
            expected = rows[str(file.relative_to(colour_pairs.parent))].split("|")
            assert {data.classes[c] for c in target.nonzero().flatten().tolist()} == set(expected)
            assert torch.allclose(target.sum(), torch.tensor(1.0))  # the label set as a distribution
            assert target[first] > 0
    sizes = {name: len(split) for name, split in data.splits.items()}
    assert sizes == {"train": 52, "val": 6, "test": 14}  # test carved first (20 % of 72), then val (10 % of the 58 left)
    again = load_data(colour_pairs, seed=3)
    assert all(data.splits[n].files == again.splits[n].files for n in data.splits)  # seeded


def test_few_shot_keeps_up_to_k_images_of_every_class(colour_pairs):
    data = load_data(colour_pairs, shots=2, seed=1)
    train = data.splits["train"]
    carrying = (train.targets > 0).sum(dim=0)
    assert bool((carrying >= 2).all())  # every class has its shots (others may add more of it)
    assert len(train) <= 2 * len(NAMES)


def test_several_labels_in_a_label_column_need_the_multi_label_task(colour_pairs, tmp_path):
    single = tmp_path / "single.csv"
    single.write_text(colour_pairs.read_text().replace("path,labels", "path,label"))
    (tmp_path / "images").symlink_to(colour_pairs.parent / "images")
    with pytest.raises(CliptuneError, match=r"single\.csv:\d+: '.*\|.*' holds several labels: pass --task multi-label"):
        load_data(single)
    assert load_data(single, columns=ManifestColumns(multi_label=True)).multi_label
    semicolons = tmp_path / "semicolons.csv"
    semicolons.write_text(colour_pairs.read_text().replace("|", ";"))
    assert load_data(semicolons, columns=ManifestColumns(separator=";")).splits["train"].targets.gt(0).sum() > 52


def test_thresholds_are_fitted_for_the_best_f1_of_each_class():
    scores = torch.tensor([[0.9, 0.1], [0.6, 0.3], [0.4, 0.8], [0.2, 0.7]])
    truth = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 0]]).bool()
    thresholds = fit_thresholds(scores, truth)
    assert 0.4 < thresholds[0] <= 0.6  # between the lowest positive and the highest negative
    assert 0.7 < thresholds[1] <= 0.8


def test_multilabel_metrics_match_scikit_learn():
    from sklearn.metrics import average_precision_score, f1_score

    logits = torch.randn(20, 4, generator=torch.Generator().manual_seed(2))
    truth = torch.rand(20, 4, generator=torch.Generator().manual_seed(3)) < 0.4
    truth[0] = True
    targets = truth.float() / truth.float().sum(dim=1, keepdim=True).clamp(min=1)
    thresholds = [0.2, 0.25, 0.3, 0.35]
    result = classification_metrics(logits, targets, NAMES, thresholds=thresholds)
    scores = logits.softmax(dim=1).numpy()
    present = [c for c in range(4) if truth[:, c].any()]
    expected_map = sum(average_precision_score(truth[:, c].numpy(), scores[:, c]) for c in present) / len(present)
    assert result["map"] == pytest.approx(expected_map)
    predicted = scores >= torch.tensor(thresholds).numpy()
    assert result["micro_f1"] == pytest.approx(f1_score(truth.numpy(), predicted, average="micro"))
    assert result["thresholds_from"] == "val" and "top1" not in result


def _finetune(data, tiny_config, out, method, *extra):
    args = ["finetune", "--data", str(data), "--model-config", tiny_config, "--method", method, "--out", str(out), *extra]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return json.loads((out / "metrics.json").read_text()), result.output


@pytest.mark.parametrize("method, extra", [
    ("linear-probe", []),
    ("coop", ["--steps", "30", "--lr", "0.02"]),
    ("lora", ["--steps", "30"]),
    ("full", ["--steps", "30", "--lr", "1e-4"]),
])
def test_methods_train_on_a_multi_label_manifest_above_zero_shot(colour_pairs, tiny_config, tmp_path, method, extra):
    metrics, output = _finetune(colour_pairs, tiny_config, tmp_path / method, method, *extra)
    test, zeroshot = metrics["test"], metrics["zeroshot"]
    assert test["thresholds_from"] == "val" and zeroshot["thresholds_from"] == "val"
    assert test["thresholds"] == metrics["val"]["thresholds"]
    assert test["map"] > zeroshot["map"] + 0.05, (test["map"], zeroshot["map"])
    assert f"{method} test: mAP" in output
    assert method == "linear-probe" or "val_map" in metrics["train"]["history"][-1]  # L-BFGS fits before any epoch
    assert "zero-shot mAP" in (tmp_path / method / "report.html").read_text()


def test_single_label_methods_and_losses_are_refused_in_one_line(colour_pairs, tiny_config, tmp_path):
    runner = CliRunner()
    for args, message in ((["--method", "tip-adapter"], "tip-adapter trains on one label per image; methods for multi-label data: "),
                          (["--method", "full", "--loss", "contrastive"], "full.loss contrastive trains on one label per image"),
                          (["--method", "coop", "--base-novel"], "base-to-novel and continual tasks split single-label data")):
        result = runner.invoke(cli, ["finetune", "--data", str(colour_pairs), "--model-config", tiny_config, *args,
                                     "--out", str(tmp_path / "refused")])
        assert result.exit_code != 0 and message in result.output, result.output
        assert not (tmp_path / "refused").exists()


def test_zeroshot_and_eval_use_thresholds_fitted_on_val(colour_pairs, tiny_config, tmp_path):
    result = CliRunner().invoke(cli, ["zeroshot", "--data", str(colour_pairs), "--model-config", tiny_config,
                                      "--out", str(tmp_path / "zs")])
    assert result.exit_code == 0, result.output
    zeroshot = json.loads((tmp_path / "zs" / "metrics.json").read_text())["test"]
    assert zeroshot["thresholds_from"] == "val"
    metrics, _ = _finetune(colour_pairs, tiny_config, tmp_path / "lp", "linear-probe")
    evaluated = CliRunner().invoke(cli, ["eval", str(tmp_path / "lp")])
    assert evaluated.exit_code == 0, evaluated.output
    report = json.loads(next((tmp_path / "lp" / "eval").glob("*-test.json")).read_text())["test"]
    assert report["map"] == pytest.approx(metrics["test"]["map"]) and report["thresholds"] == metrics["test"]["thresholds"]


def test_predict_and_the_classifier_export_return_thresholded_label_sets(colour_pairs, tiny_config, tmp_path):
    from cliptune.deploy.classifier import load

    metrics, _ = _finetune(colour_pairs, tiny_config, tmp_path / "lp", "linear-probe")
    thresholds = metrics["test"]["thresholds"]
    images = sorted((colour_pairs.parent / "images").glob("*.png"))[:6]
    run = load(tmp_path / "lp")
    probabilities = run.logits(torch.stack([run.preprocess(Image.open(p)) for p in images])).softmax(dim=1)
    expected = [{c for c, p in zip(run.classes, row.tolist()) if p >= thresholds[c]} for row in probabilities]
    predicted = run.predict(images)
    assert [{c for c, _ in labels} for labels in predicted] == expected
    assert any(len(labels) == 2 for labels in predicted)  # several labels per image
    assert all([p for _, p in labels] == sorted((p for _, p in labels), reverse=True) for labels in predicted)
    exported = CliRunner().invoke(cli, ["export", str(tmp_path / "lp"), "--format", "classifier", "--output", str(tmp_path / "clf")])
    assert exported.exit_code == 0, exported.output
    assert load(tmp_path / "clf").predict(images) == predicted
    shown = CliRunner().invoke(cli, ["predict", str(tmp_path / "clf"), *map(str, images), "--format", "json"])
    assert shown.exit_code == 0, shown.output
    listed = json.loads(shown.output[shown.output.index("{"):])["predictions"]
    assert [{entry["class"] for entry in p["labels"]} for p in listed] == expected


def test_the_chest_xray_recipe_reads_the_nih_chestxray14_layout(colour_pairs, tmp_path):
    from cliptune.config.run import build_config
    from cliptune.training.session import data_source

    nih = tmp_path / "Data_Entry_2017.csv"
    rows = [line.split(",") for line in colour_pairs.read_text().splitlines()[1:]]
    with nih.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Image Index", "Finding Labels", "Follow-up #", "Patient ID"])
        writer.writerows([[path, labels, 0, i] for i, (path, labels) in enumerate(rows)])
    (tmp_path / "images").symlink_to(colour_pairs.parent / "images")
    config = build_config("medical-cxr14", {"data": str(nih)})
    data = load_data(config.data, seed=config.seed, **data_source(config))
    assert data.multi_label and data.classes == sorted(NAMES) and config.metric == "map"


def test_zeroshot_prompt_pairs_score_each_class_by_a_sigmoid_of_with_minus_without(colour_pairs, colour_data, tiny_config,
                                                                                   tmp_path):
    from cliptune.deploy.classifier import load
    from cliptune.models.loading import load_model

    result = CliRunner().invoke(cli, ["zeroshot", "--data", str(colour_pairs), "--model-config", tiny_config, "--zeroshot-pairs",
                                      "--out", str(tmp_path / "zs")])
    assert result.exit_code == 0, result.output
    test = json.loads((tmp_path / "zs" / "metrics.json").read_text())["test"]
    assert test["scores"] == "sigmoid" and test["thresholds_from"] == "val"
    classifier = load(tmp_path / "zs")
    images = sorted((colour_pairs.parent / "images").glob("*.png"))[:5]
    batch = torch.stack([classifier.preprocess(Image.open(p)) for p in images])
    model = load_model(model_config=tiny_config)
    with torch.no_grad():  # by hand: the scaled cosine to "a photo with X." minus that to "a photo without X."
        image = model.image.encode(batch, normalize=True)
        texts = {kind: model.text.encode(model.text.tokenize([f"a photo {kind} {c}." for c in classifier.classes]))
                 for kind in ("with", "without")}
        expected = model.logit_scale * (image @ texts["with"].T - image @ texts["without"].T)
    assert torch.allclose(classifier.logits(batch), expected, atol=1e-4)
    chosen = [{c for c, p in zip(classifier.classes, row.tolist()) if p >= test["thresholds"][c]} for row in expected.sigmoid()]
    assert [{c for c, _ in labels} for labels in classifier.predict(images)] == chosen
    exported = CliRunner().invoke(cli, ["export", str(tmp_path / "zs"), "--format", "classifier", "--output", str(tmp_path / "clf")])
    assert exported.exit_code == 0, exported.output
    assert load(tmp_path / "clf").predict(images) == classifier.predict(images)
    single = CliRunner().invoke(cli, ["zeroshot", "--data", str(colour_data), "--model-config", tiny_config, "--zeroshot-pairs",
                                      "--out", str(tmp_path / "single")])
    assert single.exit_code != 0 and "--zeroshot-pairs scores multi-label data" in single.output
    assert not (tmp_path / "single").exists()
