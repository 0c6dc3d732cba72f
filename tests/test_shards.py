"""Webdataset shards as `--data`: the same dataset and results as the ImageFolder they were written from, only the
images a run uses copied out, and one line per bad shard."""

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cliptune.cli import cli
from cliptune.core.errors import CliptuneError
from cliptune.data.folders import load_imagefolder
from cliptune.data.sources import load_data
from cliptune.data.shards import is_shards


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def write_shards(folder: Path, out: Path, per_shard: int = 1000, captions: bool = False) -> Path:
    """An ImageFolder with split folders as clip-benchmark shards: `{split}-{n:06d}.tar` with `<key>.png` and `<key>.cls`
    (and `<key>.txt`) members, keys mirroring the image paths, and `classnames.txt`."""
    classes = sorted(p.name for p in (folder / "train").iterdir())
    out.mkdir(parents=True)
    (out / "classnames.txt").write_text("\n".join(classes) + "\n")
    for split in ("train", "val", "test"):
        images = sorted((folder / split).rglob("*.png"))
        for start in range(0, len(images), per_shard):
            with tarfile.open(out / f"{split}-{start // per_shard:06d}.tar", "w") as tar:
                for image in images[start : start + per_shard]:
                    key = str(image.relative_to(folder / split).with_suffix(""))
                    _add(tar, f"{key}.png", image.read_bytes())
                    _add(tar, f"{key}.cls", str(classes.index(image.parent.name)).encode())
                    if captions:
                        _add(tar, f"{key}.txt", f"a picture of {image.parent.name}".encode())
    return out


def _same_images(a, b):
    assert a.classes == b.classes
    for name in ("train", "val", "test"):
        assert [Path(p).read_bytes() for p in a.splits[name].files] == [Path(p).read_bytes() for p in b.splits[name].files]
        assert a.splits[name].labels == b.splits[name].labels


def test_shards_give_the_imagefolders_dataset(split_data, tmp_path):
    shards = write_shards(split_data, tmp_path / "shards", captions=True)
    assert is_shards(shards) and not is_shards(split_data)
    data = load_data(shards)
    _same_images(data, load_imagefolder(split_data))
    assert len(data.captions) == sum(len(s) for s in data.splits.values())
    assert set(data.captions.values()) == {f"a picture of {c}" for c in data.classes}


def test_only_the_images_a_run_uses_are_copied_out_once(split_data, tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPTUNE_CACHE", str(tmp_path / "cache"))
    shards = write_shards(split_data, tmp_path / "shards", per_shard=5)
    assert len(list(shards.glob("train-*.tar"))) == 7  # 32 training images, 5 per shard
    data = load_data(shards, shots=2, val_shots=1)
    copied = sorted((tmp_path / "cache" / "shards").rglob("*.png"))
    assert len(data.splits["train"]) == 8 and len(data.splits["val"]) == 4
    assert len(copied) == 8 + 4 + len(data.splits["test"])  # the shots and the evaluation splits, nothing else
    stamps = [p.stat().st_mtime_ns for p in copied]
    load_data(shards, shots=2, val_shots=1)
    assert [p.stat().st_mtime_ns for p in copied] == stamps  # a second run copies nothing


def test_a_brace_pattern_names_training_shards(split_data, tmp_path):
    shards = write_shards(split_data, tmp_path / "shards", per_shard=8)
    data = load_data(str(shards / "train-{000000..000003}.tar"), seed=1)
    assert sum(len(s) for s in data.splits.values()) == 32  # train carved into val and test, as an ImageFolder's
    assert data.classes == sorted(p.name for p in (split_data / "train").iterdir())


def test_zeroshot_and_linear_probe_results_equal_the_imagefolders(split_data, tiny_config, tmp_path):
    shards = write_shards(split_data, tmp_path / "shards", per_shard=10)
    runner = CliRunner()
    results = {}
    for name, data in (("folder", split_data), ("shards", shards)):
        result = runner.invoke(cli, ["finetune", "--data", str(data), "--model-config", tiny_config, "--method", "linear-probe",
                                     "--out", str(tmp_path / "runs" / name)])
        assert result.exit_code == 0, result.output
        metrics = json.loads((tmp_path / "runs" / name / "metrics.json").read_text())
        results[name] = (metrics["zeroshot"]["top1"], metrics["test"]["top1"])
    assert results["shards"] == pytest.approx(results["folder"], abs=1e-3)


def test_bad_shards_are_one_line_errors(split_data, tmp_path):
    shards = write_shards(split_data, tmp_path / "shards")
    (shards / "classnames.txt").write_text("only_one\n")
    with pytest.raises(CliptuneError, match=r"-000000\.tar: sample '.*' has class '\d', not an index into the 1 names"):
        load_data(shards)
    with tarfile.open(tmp_path / "nolabel.tar", "w") as tar:
        _add(tar, "a.png", next(split_data.rglob("*.png")).read_bytes())
    with pytest.raises(CliptuneError, match=r"nolabel\.tar: sample 'a' has no \.cls or \.label member"):
        load_data(tmp_path / "nolabel.tar")
    only_val = tmp_path / "only_val"
    only_val.mkdir()
    (shards / "val-000000.tar").rename(only_val / "val-000000.tar")
    with pytest.raises(CliptuneError, match="has shards for val but none for train"):
        load_data(only_val)
    with pytest.raises(CliptuneError, match=r"shard .*train-000009\.tar not found \(1 of 2 missing\)"):
        load_data(str(shards / "train-{000000,000009}.tar"))
    (tmp_path / "broken.tar").write_bytes(b"not a tar at all" * 64)
    with pytest.raises(CliptuneError, match=r"broken\.tar: not a readable tar shard"):
        load_data(tmp_path / "broken.tar")


@pytest.mark.distributed
def test_torchrun_on_shards_equals_one_process(split_data, tiny_config, tmp_path):
    """Both processes index the shards and copy out the same images (atomically, so the one that comes second finds
    them whole); the two-process run then equals the one-process run."""
    from safetensors.torch import load_file

    from helpers import run_two_processes_and_one

    shards = write_shards(split_data, tmp_path / "shards", per_shard=6)
    args = ["finetune", "--data", str(shards), "--model-config", tiny_config, "--method", "coop", "--n-ctx", "4", "--epochs", "2",
            "--batch-size", "8", "--lr", "0.01", "--shots", "4"]
    run_two_processes_and_one(args, tmp_path, quiet_two=True)
    w2 = load_file(str(tmp_path / "two/checkpoints/best/method.safetensors"))
    w1 = load_file(str(tmp_path / "one/checkpoints/best/method.safetensors"))
    assert all(torch.allclose(w2[k], w1[k], atol=1e-5) for k in w1)
