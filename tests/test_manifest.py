"""CSV/TSV/JSONL manifests as `--data`: the same dataset an ImageFolder gives, and one line per bad row."""

import csv
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from cliptune.cli import cli
from cliptune.core.errors import CliptuneError
from cliptune.data.folders import load_imagefolder
from cliptune.data.manifest import ManifestColumns, load_manifest
from cliptune.data.sources import load_data


def _rows(folder: Path, splits: bool):
    """(relative path, label, split) of every image of an ImageFolder, labels = class folder names."""
    rows = []
    for image in sorted(folder.rglob("*.png")):
        relative = image.relative_to(folder)
        split, label = (relative.parts[0], relative.parts[1]) if splits else ("", relative.parts[0])
        rows.append((str(relative), label, split))
    return rows


def _write_csv(path: Path, header, rows, delimiter=","):
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _same_dataset(a, b):
    assert a.classes == b.classes and a.classnames == b.classnames
    for name in ("train", "val", "test"):
        assert [p.resolve() for p in a.splits[name].files] == [p.resolve() for p in b.splits[name].files], name
        assert a.splits[name].labels == b.splits[name].labels, name


@pytest.mark.parametrize("shots", [None, 3])
def test_a_manifest_of_an_imagefolder_gives_the_same_seeded_splits(colour_data, shots):
    manifest = _write_csv(colour_data / "all.csv", ["path", "label", "note"],
                          [(path, label, "ignored") for path, label, _ in _rows(colour_data, splits=False)])
    try:
        _same_dataset(load_manifest(manifest, 0.2, 0.25, 7, shots), load_imagefolder(colour_data, 0.2, 0.25, 7, shots))
    finally:
        manifest.unlink()


def test_a_split_column_gives_the_imagefolders_split_folders(split_data, tmp_path):
    rows = [(str(split_data / path), label, split) for path, label, split in _rows(split_data, splits=True)]
    tsv = _write_csv(tmp_path / "data.tsv", ["file", "class", "part"], rows, delimiter="\t")
    columns = ManifestColumns(path="file", label="class", split="part")
    _same_dataset(load_manifest(tsv, columns=columns, val_shots=2), load_imagefolder(split_data, val_shots=2))
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("".join(json.dumps({"path": p, "label": label, "split": s}) + "\n" for p, label, s in rows))
    _same_dataset(load_data(jsonl), load_imagefolder(split_data))


def test_classnames_yaml_beside_the_manifest_names_its_labels(colour_data, tmp_path):
    rows = [(str(colour_data / path), label, "") for path, label, _ in _rows(colour_data, splits=False)]
    manifest = _write_csv(tmp_path / "m.csv", ["path", "label"], [r[:2] for r in rows])
    label = rows[0][1]
    (tmp_path / "classnames.yaml").write_text(f"{label}: a shade of {label}\n")
    data = load_data(manifest)
    assert data.classnames[data.classes.index(label)] == f"a shade of {label}"


@pytest.fixture
def small_manifest(colour_data, tmp_path):
    """A copy of the colour images and a writer of a manifest over them: (write(header, edit, name), rows, folder)."""
    images = tmp_path / "images"
    shutil.copytree(colour_data, images)
    rows = [(path, label) for path, label, _ in _rows(images, splits=False)]

    def write(header=("path", "label"), edit=lambda rows: rows, name="m.csv"):
        return _write_csv(images / name, list(header), edit([list(r) for r in rows]))

    return write, rows, images


@pytest.mark.parametrize("edit, message", [
    (lambda rows: rows[:2] + [[rows[2][0].replace(".png", "-gone.png"), rows[2][1]]] + rows[3:], r"m\.csv:4: image not found: .*-gone\.png$"),
    (lambda rows: rows[:4] + [[rows[4][0], ""]] + rows[5:], r"m\.csv:6: empty 'label' for "),
    (lambda rows: rows + [rows[1]], r"m\.csv:\d+: .* is already listed on line 3$"),
    (lambda rows: rows[:1] + [[rows[1][0], "red|green"]] + rows[2:], r"m\.csv:3: 'red\|green' holds several labels: pass --task multi-label"),
])
def test_a_bad_row_is_one_error_naming_the_file_and_line(small_manifest, edit, message):
    write = small_manifest[0]
    with pytest.raises(CliptuneError, match=message):
        load_data(write(edit=edit))


def test_missing_columns_unknown_labels_and_bad_splits_are_named(small_manifest):
    write, rows, images = small_manifest
    with pytest.raises(CliptuneError, match=r"has no 'label' column for the image label \(columns: file, path; --label-col"):
        load_data(write(header=("path", "file")))
    with_split = ("path", "label", "split")
    with pytest.raises(CliptuneError, match=rf"m\.csv:{len(rows) + 1}: split 'dev' is not one of train, val, test"):
        load_data(write(header=with_split, edit=lambda rows: [r + ["train"] for r in rows[:-1]] + [rows[-1] + ["dev"]]))
    shutil.copy(images / rows[0][0], images / "extra.png")
    with pytest.raises(CliptuneError, match="label 'purple' appears in test but has no training image"):
        load_data(write(header=with_split, edit=lambda rows: [r + ["train"] for r in rows] + [["extra.png", "purple", "test"]]))
    with pytest.raises(CliptuneError, match=r"is a file: give an ImageFolder root, or a manifest ending in \.csv"):
        load_data(write(name="m.txt"))
    with pytest.raises(CliptuneError, match="not a manifest"):
        load_data(write(name="m.txt"), data_format="manifest")


def test_finetune_zeroshot_and_eval_run_on_a_manifest(small_manifest, tiny_config, tmp_path):
    manifest = small_manifest[0]()
    runner = CliRunner()
    run = tmp_path / "run"
    result = runner.invoke(cli, ["finetune", "--data", str(manifest), "--model-config", tiny_config, "--method", "linear-probe",
                                 "--out", str(run)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((run / "metrics.json").read_text())
    folder_run = tmp_path / "folder-run"
    result = runner.invoke(cli, ["finetune", "--data", str(manifest.parent), "--model-config", tiny_config, "--method",
                                 "linear-probe", "--out", str(folder_run)])
    assert result.exit_code == 0, result.output
    assert metrics["test"] == json.loads((folder_run / "metrics.json").read_text())["test"]  # the same images, the same run
    result = runner.invoke(cli, ["eval", str(run), "--data", str(manifest), "--json"])
    report = json.loads(result.output[result.output.index("{"):])  # after the log line on stderr
    assert result.exit_code == 0 and report["test"]["top1"] == pytest.approx(metrics["test"]["top1"])
    result = runner.invoke(cli, ["zeroshot", "--data", str(manifest), "--model-config", tiny_config, "--out", str(tmp_path / "zs")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["finetune", "--data", str(tmp_path / "nothing.csv"), "--model-config", tiny_config,
                                 "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and result.output.strip() == f"error: --data {tmp_path / 'nothing.csv'}: no such folder or file"
