import logging
import os
import sys
import tempfile
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
# the shared feature cache of this test session (never the user's ~/.cache), inherited by subprocesses
os.environ["CLIPTUNE_CACHE"] = tempfile.mkdtemp(prefix="cliptune-test-cache-")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # one torch thread per pytest-xdist worker (and per process it starts): two workers on two cores, not four threads
    os.environ["OMP_NUM_THREADS"] = "1"
sys.path.insert(0, str(Path(__file__).parent))

from helpers import TINY_CONFIG, make_imagefolder  # noqa: E402


@pytest.fixture(scope="session")
def tiny_config() -> str:
    return str(TINY_CONFIG)


@pytest.fixture(scope="session")
def colour_data(tmp_path_factory) -> Path:
    """Three colour classes, no split folders: exercises the seeded stratified split."""
    return make_imagefolder(tmp_path_factory.mktemp("colours"), per_class=12)


@pytest.fixture(scope="session")
def split_data(tmp_path_factory) -> Path:
    """Four classes with train/val/test folders."""
    classes = ("Tomato___Late_blight", "Tomato___healthy", "Corn_(maize)___Common_rust", "Grape___Black_rot")
    return make_imagefolder(tmp_path_factory.mktemp("leaves"), classes=classes, per_class=8, splits=True)


@pytest.fixture(autouse=True)
def _seeded_torch():
    """Every test draws its random inputs from the same seed, whatever ran before it (the library never
    reseeds the global generator)."""
    import torch

    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _cliptune_logs_reach_caplog():
    """The CLI stops propagation (to avoid double printing); tests read records through the root logger."""
    logging.getLogger("cliptune").propagate = True
    yield
