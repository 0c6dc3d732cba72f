"""Importing and calling cliptune leaves the process as it was (issue 18): no global logging switch, no
matplotlib backend or pyplot state, the caller's random generators untouched, and private APIs of other
packages used only where cliptune/core/private_api.py lists them."""

import importlib
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cliptune
from cliptune.commands import api
from cliptune.config.run import CONFIG_KEYS, build_config, load_config, save_config
from cliptune.core.figures import new_figure, save_figure
from cliptune.core.private_api import PRIVATE_APIS
from cliptune.data.folders import load_imagefolder, train_transform
from cliptune.methods import build_method
from cliptune.models import features as features_lib
from cliptune.models.features import image_features
from cliptune.models.loading import LIBRARY_LOGGERS, load_model

PACKAGE = Path(cliptune.__file__).parent
SOURCES = {path.relative_to(PACKAGE.parent).as_posix(): path.read_text() for path in sorted(PACKAGE.rglob("*.py"))}


@pytest.mark.parametrize("forbidden", ["logging.disable", "matplotlib.use", "pyplot", "_reset_state"])
def test_no_process_wide_switches_in_the_library(forbidden):
    assert [path for path, text in SOURCES.items() if forbidden in text] == []


def _resolve(dotted: str):
    parts = dotted.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            value = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            value = getattr(value, name)
        return value
    raise ImportError(dotted)


@pytest.mark.parametrize("dotted, user", PRIVATE_APIS)
def test_listed_private_apis_exist_and_are_used_only_where_listed(dotted, user):
    _resolve(dotted)  # AttributeError: the installed package no longer has it (see cliptune/core/private_api.py)
    name = re.compile(rf"\b{re.escape(dotted.rsplit('.', 1)[1])}\b")
    users = {path for path, text in SOURCES.items() if name.search(text) and not path.endswith("core/private_api.py")}
    assert users == {user}


def test_private_api_table_lists_every_entry():
    from cliptune.core import private_api

    for dotted, user in PRIVATE_APIS:
        assert f"`{dotted}`" in private_api.__doc__ and user.removeprefix("cliptune/") in private_api.__doc__


FIGURES = r"""
import sys
from pathlib import Path
import matplotlib
matplotlib.use("svg")  # the program's own choice, which cliptune must keep
import torch
from cliptune.deploy import report
from cliptune.continual.loop import _plot
from cliptune.commands.wise import plot_sweep
from cliptune.commands.compare import plot
out = Path(sys.argv[1])
logits, labels = torch.randn(12, 3), torch.arange(12) % 3
report.confusion_figure(logits, labels, ["a", "b", "c"], "confusion")
report.reliability_figure(logits, labels, "reliability")
report.per_class_figure({"zero-shot": {"a": 0.5, "b": 0.2}, "run": {"a": 0.7, "b": 0.9}}, ["a", "b", "c"], "per class")
report.curves_figure({"run": [{"epoch": 1, "loss": 1.0, "val_top1": 0.5}, {"epoch": 2, "loss": 0.5}]}, "curves")
_plot(out / "matrix.png", [[0.5, 0.2], [0.4, 0.9]], ["t1", "t2"], "matrix")
plot_sweep({"alphas": [0, 0.5, 1], "val_top1": [0.2, 0.5, 0.4], "test_top1": [0.3, 0.4, 0.45], "best_alpha": 0.5},
           out / "wise.png")
plot({"zeroshot": [{"shots": 1, "score_mean": 0.3, "score_std": 0.0}], "methods": ["coop"], "shots": [1, 2], "metric": "top1",
      "summary": [{"method": "coop", "shots": 1, "score_mean": 0.4, "score_std": 0.1}], "data": "d", "seeds": [1]},
     out / "compare.png")
print(matplotlib.get_backend(), "matplotlib.pyplot" in sys.modules)
"""


def test_figures_keep_the_matplotlib_backend_and_never_import_pyplot(tmp_path):
    done = subprocess.run([sys.executable, "-c", FIGURES, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["svg", "False"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compare.png", "matrix.png", "wise.png"]  # no temporary files
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in tmp_path.iterdir())


def test_save_figure_is_atomic(tmp_path):
    path = tmp_path / "plot.png"
    figure, axes = new_figure(figsize=(2, 2))
    axes.plot([0, 1], [1, 0])
    save_figure(figure, path, dpi=50)
    before = path.read_bytes()

    class FailsHalfway:
        def savefig(self, target, **options):
            Path(target).write_bytes(b"\x89PNG partial")
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        save_figure(FailsHalfway(), path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["plot.png"]


# ----- random generators -----
def test_augmented_views_leave_the_global_generator_and_match_the_seeded_views(tiny_config, colour_data):
    model = load_model(model_config=tiny_config)
    split = load_imagefolder(colour_data).splits["train"]
    transform = train_transform(model.image_size, model.mean, model.std)
    before = torch.get_rng_state()
    views = image_features(model, split, transform, views=2, seed=3)
    assert torch.equal(torch.get_rng_state(), before)
    expected = []  # what the views were before the fix: each seeded on the global generator
    for view in range(2):
        torch.manual_seed(3 * 1000 + view + 1)
        expected.append(features_lib._encode(model, features_lib.ImageDataset(split, transform), 128, 0, None, "x"))
    assert torch.equal(views, torch.stack(expected))


def test_model_and_method_initialisation_leave_the_global_generator(tiny_config):
    before = torch.get_rng_state()
    model = load_model(model_config=tiny_config, seed=5)
    method = build_method("coop", model, ["red", "blue"], ["a photo of a {}."], seed=5)
    assert torch.equal(torch.get_rng_state(), before)
    again = build_method("coop", load_model(model_config=tiny_config, seed=5), ["red", "blue"], ["a photo of a {}."], seed=5)
    assert all(torch.equal(a, b) for a, b in zip(method.state_dict().values(), again.state_dict().values()))


def test_training_leaves_the_global_generator(tiny_config, colour_data, tmp_path):
    config = build_config(None, {"data": str(colour_data), "model_config": tiny_config, "method": "coop", "epochs": 2,
                                 "batch_size": 8, "aug_views": 2})
    before = torch.get_rng_state()
    first = api.finetune(config, tmp_path / "a")
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(123)  # another caller state: the same run
    second = api.finetune(config, tmp_path / "b")
    assert first["test"]["top1"] == second["test"]["top1"] and first["train"]["history"] == second["train"]["history"]


# ----- logging -----
def test_model_loading_is_quiet_without_touching_logging(tiny_config):
    root = logging.getLogger()
    seen = []

    class Record(logging.Handler):
        def emit(self, record):
            seen.append(record)

    handlers, filters = list(root.handlers), list(root.filters)
    levels = {name: logging.getLogger(name).level for name in LIBRARY_LOGGERS}
    recorder = Record(level=logging.DEBUG)
    root.addHandler(recorder)
    old_level = root.level
    root.setLevel(logging.DEBUG)
    try:
        load_model(model_config=tiny_config)
        logging.getLogger("elsewhere").warning("another library's message")  # not swallowed
    finally:
        root.removeHandler(recorder)
        root.setLevel(old_level)
    assert [r.getMessage() for r in seen if r.name != "cliptune"] == ["another library's message"]
    assert root.handlers == handlers and root.filters == filters and logging.root.manager.disable == logging.NOTSET
    assert {name: logging.getLogger(name).level for name in LIBRARY_LOGGERS} == levels


def test_model_loading_adds_no_root_handler(tiny_config):
    script = (f"import logging; from cliptune.models.loading import load_model; load_model(model_config={tiny_config!r}); "
              "print(len(logging.getLogger().handlers))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "0"  # open_clip's logging.info() would have run logging.basicConfig()


# ----- config -----
def test_sources_is_a_declared_field_kept_out_of_config_yaml(tmp_path, tiny_config):
    config = build_config(None, {"model_config": tiny_config, "lr": 0.1})
    assert config.sources["lr"] == "CLI flags" and "sources" not in CONFIG_KEYS
    assert "sources" not in config.to_dict() and "sources" not in repr(config)
    save_config(config, tmp_path / "config.yaml")
    assert "sources" not in (tmp_path / "config.yaml").read_text()
    loaded = load_config(tmp_path / "config.yaml")
    assert loaded.sources == {} and loaded == config  # sources is not compared
    assert json.dumps(loaded.to_dict())  # still plain data


def test_feature_memory_belongs_to_the_session(tiny_config, colour_data, tmp_path):
    """No module-level cache: a session's in-memory features live and die with it (and its reused sessions)."""
    from collections import OrderedDict

    from cliptune.training import session as session_lib

    assert not [name for name, value in vars(features_lib).items() if isinstance(value, (dict, OrderedDict)) and name != "__builtins__"]
    model, data = load_model(model_config=tiny_config), load_imagefolder(colour_data)
    config = build_config(None, {"data": str(colour_data), "model_config": tiny_config})
    first = session_lib.Session(config, model, data, ["a {}."], session_lib.make_accelerator(), None)
    first.features("val")
    assert len(first.memory) == 1 and first.reused(config, first.accelerator).memory is first.memory
    other = session_lib.Session(config, model, data, ["a {}."], session_lib.make_accelerator(), None)
    assert len(other.memory) == 0
