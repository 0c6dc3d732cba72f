"""The README's main job: the demo recipe on the bundled model and data beats zero-shot."""

import json

import pytest
from click.testing import CliRunner

from cliptune.cli import cli


@pytest.mark.slow
def test_demo_recipe_beats_zeroshot(tmp_path):
    result = CliRunner().invoke(cli, ["finetune", "--recipe", "demo", "--out", str(tmp_path / "demo")])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert metrics["test"]["n"] == 401 and len(metrics["classes"]) == 10
    assert metrics["zeroshot"]["top1"] > 0.5  # the bundled model is clearly above chance (10 %)
    assert metrics["test"]["top1"] > metrics["zeroshot"]["top1"] + 0.05
