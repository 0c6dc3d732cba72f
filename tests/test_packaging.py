"""A plain wheel install carries the embedded default: recipes, the sample data and the demo model, from any folder."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_wheel_install_runs_the_demo_recipe_from_any_folder(tmp_path):
    wheels, target, elsewhere = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-w", str(wheels)], check=True,
                   capture_output=True)
    (wheel,) = wheels.glob("cliptune-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--no-compile", "--target", str(target), str(wheel)], check=True,
                   capture_output=True)
    program = (
        "import cliptune, sys\n"
        "from click.testing import CliRunner\n"
        "from cliptune.cli import cli\n"
        "from cliptune.config.run import build_config, check_config\n"
        "config = build_config('demo')\n"
        "check_config(config)  # the model, its config and the data are files of the installed package\n"
        "listed = CliRunner().invoke(cli, ['recipes', 'list'])\n"
        "print(cliptune.__file__, config.data, config.pretrained, listed.exit_code, 'continual-demo' in listed.output, sep='\\n')\n"
    )
    result = subprocess.run([sys.executable, "-c", program], cwd=elsewhere, capture_output=True, text=True,
                            env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    module, data, pretrained, code, listed = result.stdout.split("\n")[:5]
    installed = target / "cliptune"
    assert Path(module).parent == installed and Path(data) == installed / "sample_data"
    assert Path(pretrained).parent == installed / "assets" / "demo"
    assert code == "0" and listed == "True"
    assert len(list((installed / "sample_data").rglob("*.png"))) == len(list((ROOT / "cliptune" / "sample_data").rglob("*.png")))
    assert (installed / "sample_data" / "README.md").is_file()  # its licence and attribution travel with it
