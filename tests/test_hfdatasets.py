"""Folders saved by Hugging Face `datasets` as `--data`: the same dataset and results an ImageFolder gives, images
written once to the cache, and one line per bad input."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from cliptune.cli import cli
from cliptune.core.errors import CliptuneError
from cliptune.data.folders import load_imagefolder
from cliptune.data.sources import load_data

datasets = pytest.importorskip("datasets")


def _save(folder: Path, out: Path, splits: bool, label_kind: str = "classlabel", split_names=None) -> Path:
    """An ImageFolder's images (sorted, as its listing) saved with `save_to_disk`, images embedded as bytes."""
    parts = {}
    for image in sorted(folder.rglob("*.png")):
        relative = image.relative_to(folder)
        split, label = (relative.parts[0], relative.parts[1]) if splits else ("train", relative.parts[0])
        parts.setdefault(split, {"image": [], "label": []})
        parts[split]["image"].append({"bytes": image.read_bytes(), "path": image.name})
        parts[split]["label"].append(label)
    names = sorted({label for part in parts.values() for label in part["label"]})
    label_feature = datasets.ClassLabel(names=names) if label_kind == "classlabel" else datasets.Value("string")
    features = datasets.Features({"image": datasets.Image(), "label": label_feature})
    built = {(split_names or {}).get(split, split): datasets.Dataset.from_dict(part, features=features)
             for split, part in parts.items()}
    saved = datasets.DatasetDict(built) if splits else built["train"]
    saved.save_to_disk(str(out))
    return out


def _same_dataset(a, b):
    assert a.classes == b.classes and a.classnames == b.classnames
    for name in ("train", "val", "test"):
        assert [Path(p).read_bytes() for p in a.splits[name].files] == [Path(p).read_bytes() for p in b.splits[name].files]
        assert a.splits[name].labels == b.splits[name].labels, name


def test_a_saved_dataset_with_splits_is_the_imagefolder(split_data, tmp_path):
    saved = _save(split_data, tmp_path / "saved", splits=True, split_names={"val": "validation"})
    loaded = load_data(saved, val_shots=2)
    _same_dataset(loaded, load_imagefolder(split_data, val_shots=2))
    files = loaded.splits["train"].files
    assert all(Path(f).parent.parent.parent.name == "datasets" for f in files)  # written under the cache
    again = load_data(saved, val_shots=2)
    assert again.splits["train"].files == files and [Path(f).stat().st_mtime_ns for f in files] == \
        [Path(f).stat().st_mtime_ns for f in again.splits["train"].files]  # written once


@pytest.mark.parametrize("shots", [None, 3])
def test_one_saved_split_is_carved_like_an_imagefolder_without_split_folders(colour_data, tmp_path, shots):
    saved = _save(colour_data, tmp_path / "one", splits=False, label_kind="string")
    _same_dataset(load_data(saved, 0.2, 0.25, 7, shots), load_imagefolder(colour_data, 0.2, 0.25, 7, shots))


def test_zeroshot_and_linear_probe_give_the_imagefolders_results(split_data, tiny_config, tmp_path):
    saved = _save(split_data, tmp_path / "saved", splits=True)
    results = {}
    for name, data in (("folder", split_data), ("saved", saved)):
        for method in ("zeroshot", "linear-probe"):
            args = ["zeroshot"] if method == "zeroshot" else ["finetune", "--method", method]
            out = tmp_path / f"{name}-{method}"
            result = CliRunner().invoke(cli, ["--quiet", *args, "--data", str(data), "--model-config", tiny_config,
                                              "--out", str(out)])
            assert result.exit_code == 0, result.output
            results[name, method] = json.loads((out / "metrics.json").read_text())["test"]["top1"]
    for method in ("zeroshot", "linear-probe"):
        assert results["saved", method] == pytest.approx(results["folder", method], abs=1e-3)


def test_bad_saved_datasets_are_one_line(split_data, tmp_path):
    odd = _save(split_data, tmp_path / "odd", splits=True, split_names={"val": "dev"})
    with pytest.raises(CliptuneError, match="split 'dev' is not one of train, val"):
        load_data(odd)
    saved = _save(split_data, tmp_path / "saved", splits=True)
    with pytest.raises(CliptuneError, match="no column 'class'.*--label-col"):
        from cliptune.data.manifest import ManifestColumns

        load_data(saved, columns=ManifestColumns(label="class"))
    result = CliRunner().invoke(cli, ["zeroshot", "--data", str(saved), "--data-format", "manifest", "--out",
                                      str(tmp_path / "o")])
    assert result.exit_code != 0 and "not a manifest" in result.output and "Traceback" not in result.output


def test_a_hub_dataset_is_loaded_by_name_and_fails_offline_in_one_line(split_data, tmp_path, monkeypatch):
    saved = datasets.load_from_disk(str(_save(split_data, tmp_path / "saved", splits=True)))
    asked = []
    monkeypatch.setattr(datasets, "load_dataset", lambda name: asked.append(name) or saved)  # what the Hub would return
    _same_dataset(load_data("hf:someorg/leaves"), load_imagefolder(split_data))
    assert asked == ["someorg/leaves"]
    monkeypatch.undo()  # the real loader, offline (conftest sets HF_HUB_OFFLINE=1)
    result = CliRunner().invoke(cli, ["zeroshot", "--data", "hf:someorg/leaves", "--model-config", str(Path(__file__).parent /
                                      "fixtures" / "tiny-clip.json"), "--out", str(tmp_path / "run")])
    assert result.exit_code != 0
    assert "could not load the Hugging Face dataset 'someorg/leaves' (Couldn't reach" in result.output
    assert len(result.output.strip().splitlines()[-1]) > 0 and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_a_label_list_column_makes_a_multi_label_dataset(split_data, tmp_path):
    images = sorted(split_data.rglob("*.png"))
    names = sorted({p.parent.name for p in images})
    labels = [[names.index(p.parent.name)] + ([0] if i % 3 == 0 and p.parent.name != names[0] else []) for i, p in enumerate(images)]
    features = datasets.Features({"image": datasets.Value("string"), "label": datasets.Sequence(datasets.ClassLabel(names=names))})
    datasets.Dataset.from_dict({"image": [str(p) for p in images], "label": labels}, features=features).save_to_disk(str(tmp_path / "ml"))
    data = load_data(tmp_path / "ml", seed=2)
    assert data.multi_label and data.classes == names
    sets = {str(p): {names[c] for c in row} for p, row in zip(images, labels)}
    for split in data.splits.values():
        for file, target in zip(split.files, split.targets):
            assert {data.classes[c] for c in target.nonzero().flatten().tolist()} == sets[str(file)]
