import logging

import pytest

from cliptune.data.folders import display_name, load_imagefolder
from cliptune.core.errors import CliptuneError
from helpers import make_imagefolder


def test_display_names_from_folders():
    assert display_name("Tomato___Late_blight") == "tomato late blight"
    assert display_name("Corn_(maize)___Common_rust") == "corn (maize) common rust"
    assert display_name("pneumonia") == "pneumonia"


def test_split_folders_are_used(split_data):
    data = load_imagefolder(split_data)
    assert data.classes == sorted(data.classes) and len(data.classes) == 4
    assert [len(data.splits[s]) for s in ("train", "val", "test")] == [32, 8, 16]
    assert all("/train/" in str(f) for f in data.splits["train"].files)


def test_stratified_seeded_split(colour_data):
    a = load_imagefolder(colour_data, val_fraction=0.25, test_fraction=0.25, seed=1)
    b = load_imagefolder(colour_data, val_fraction=0.25, test_fraction=0.25, seed=1)
    c = load_imagefolder(colour_data, val_fraction=0.25, test_fraction=0.25, seed=2)
    assert a.splits["test"].files == b.splits["test"].files
    assert a.splits["test"].files != c.splits["test"].files
    for split in ("train", "val", "test"):
        counts = [a.splits[split].labels.count(k) for k in range(3)]
        assert len(set(counts)) == 1, f"{split} not stratified: {counts}"
    every = [f for s in a.splits.values() for f in s.files]
    assert len(every) == len(set(every)) == 36


def test_shots_are_seeded_and_per_class(split_data):
    a = load_imagefolder(split_data, shots=3, seed=5)
    b = load_imagefolder(split_data, shots=3, seed=5)
    c = load_imagefolder(split_data, shots=3, seed=6)
    assert a.splits["train"].files == b.splits["train"].files != c.splits["train"].files
    assert [a.splits["train"].labels.count(k) for k in range(4)] == [3, 3, 3, 3]


def test_too_many_shots_warns_and_uses_all(split_data, caplog):
    with caplog.at_level(logging.WARNING, logger="cliptune"):
        data = load_imagefolder(split_data, shots=50)
    assert len(data.splits["train"]) == 32
    assert "only 8 training images" in caplog.text


def test_classnames_yaml_overrides_and_descriptions(tmp_path):
    root = make_imagefolder(tmp_path / "d", classes=("a_x", "b_y"), per_class=4)
    (root / "classnames.yaml").write_text("a_x: apple\nb_y: {name: banana, descriptions: [a yellow fruit]}\n")
    data = load_imagefolder(root)
    assert data.classnames == ["apple", "banana"]
    assert data.descriptions == {"b_y": ["a yellow fruit"]}
    assert data.named_descriptions == {"banana": ["a yellow fruit"]}


def test_corrupt_files_are_skipped_or_strict(tmp_path, caplog):
    root = make_imagefolder(tmp_path / "d", classes=("a", "b"), per_class=4)
    (root / "a" / "broken.png").write_bytes(b"not an image")
    (root / "b" / "notes.txt").write_text("hello")
    with caplog.at_level(logging.WARNING, logger="cliptune"):
        data = load_imagefolder(root)
    assert data.skipped_files == 2 and "skipped 2 file(s)" in caplog.text
    assert sum(len(s) for s in data.splits.values()) == 8
    with pytest.raises(CliptuneError, match="not a readable image"):
        load_imagefolder(root, strict=True)


@pytest.mark.parametrize(
    "layout, message",
    [
        ({"a": 3}, "need at least 2"),
        ({"a": 3, "b": 0}, "has no readable images"),
    ],
)
def test_bad_class_layouts(tmp_path, layout, message):
    for name, count in layout.items():
        (tmp_path / name).mkdir()
        if count:
            make_imagefolder(tmp_path, classes=(name,), per_class=count)
    with pytest.raises(CliptuneError, match=message):
        load_imagefolder(tmp_path)


def test_missing_data_dir(tmp_path):
    with pytest.raises(CliptuneError, match="data directory not found"):
        load_imagefolder(tmp_path / "nope")


def test_restrict_to_relabels(split_data):
    data = load_imagefolder(split_data)
    sub = data.restrict_to(data.classes[2:])
    assert sub.classes == data.classes[2:]
    assert set(sub.splits["test"].labels) == {0, 1}
    assert len(sub.splits["test"]) == 8


def test_every_image_walker_skips_hidden_files_and_folders_alike(tmp_path):
    """Class scanning, continual reference images and `predict` folders share one rule (`visible_files`)."""
    from PIL import Image

    from cliptune.continual.zscl import reference_images
    from cliptune.data.folders import image_files_under
    from cliptune.deploy.classifier import image_files

    for relative in ("a/1.png", "a/.2.png", "a/.ipynb_checkpoints/3.png", "b/4.png", "b/notes.txt"):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        if relative.endswith(".png"):
            Image.new("RGB", (4, 4)).save(tmp_path / relative)
        else:
            (tmp_path / relative).write_text("x")
    expected = [tmp_path / "a/1.png", tmp_path / "b/4.png"]
    assert image_files_under(tmp_path) == expected
    assert reference_images(str(tmp_path)) == expected and image_files([tmp_path]) == expected
    data = load_imagefolder(tmp_path, val_fraction=0, test_fraction=0)
    assert data.splits["train"].files == expected and data.skipped_files == 1  # notes.txt
