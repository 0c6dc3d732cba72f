"""Every bundled recipe validates, lists, shows, and runs one training step on a tiny model of its architecture."""

import json

import pytest
from click.testing import CliRunner

from cliptune.cli import cli
from cliptune.config.run import RECIPE_DIR, build_config
from cliptune.core.errors import CliptuneError
from helpers import FIXTURES, TINY_CONFIG, make_imagefolder

RECIPES = sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))
BIOMEDCLIP = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"


def tiny_architecture(recipe: str) -> str:
    """The tiny random config with the same architecture family as the recipe's recommended model."""
    if build_config(recipe).model == BIOMEDCLIP:
        return str(FIXTURES / "tiny-biomedclip.json")
    return str(TINY_CONFIG)


def test_all_expected_recipes_exist():
    for name in ("demo", "coop", "cocoop", "maple", "lora", "flyp", "soft-target", "medical-xray",
                 "medical-dermatology", "medical-cxr14", "medical-pathology", "agri-leaf-disease", "agri-leaf-captions", "agri-pests"):
        assert name in RECIPES


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_runs_one_step_on_a_tiny_model(recipe, tmp_path):
    data = make_imagefolder(tmp_path / "data", classes=("healthy", "rust"), per_class=3, splits=True)
    args = ["finetune", "--recipe", recipe, "--data", str(data), "--model-config", tiny_architecture(recipe),
            "--set", "model=null", "--set", "pretrained=null", "--set", "epochs=1", "--set", "shots=2",
            "--set", "batch_size=8", "--set", "warmup_steps=0", "--out", str(tmp_path / "run")]
    if (build_config(recipe).methods.get("full", {}).get("unlock_last") or 0) > 2:
        args += ["--set", "full.unlock_last=1"]  # the tiny towers have 2 blocks
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["method"] == build_config(recipe).method
    # one step over 2 shots x 2 classes (a method fitted before training, e.g. the L-BFGS probe, takes none)
    assert metrics["train"]["images_seen"] == (4 if metrics["train"]["trainable_params"] else 0)


def test_recipes_list_and_show():
    runner = CliRunner()
    listed = runner.invoke(cli, ["recipes", "list"])
    assert listed.exit_code == 0, listed.output
    lines = listed.output.splitlines()
    assert lines[0].split()[:4] == ["NAME", "DOMAIN", "METHOD", "MODEL"]
    xray = next(line for line in lines if line.startswith("medical-xray"))
    assert "medical" in xray and "lora" in xray and BIOMEDCLIP in xray
    shown = runner.invoke(cli, ["recipes", "show", "agri-leaf-disease"])
    assert shown.exit_code == 0 and "a close-up photo of a {} leaf." in shown.output
    assert shown.output == (RECIPE_DIR / "agri-leaf-disease.yaml").read_text()


def test_extends_merges_parent_method_settings():
    config = build_config("medical-xray")
    assert config.method == "lora" and config.lr == 0.0002  # from lora.yaml
    assert config.aug_hflip is False and config.templates[0] == "a chest X-ray showing {}."


def test_user_recipe_path_and_bad_key_with_line(tmp_path):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("extends: agri-pests\nepochs: 3\ncoop:\n  n_ctx: 2\n  depth: 3\n")
    with pytest.raises(CliptuneError, match=rf"coop.depth' in {recipe}:5"):
        build_config(str(recipe))


def test_offline_recommended_model_names_the_override(tmp_path):
    data = make_imagefolder(tmp_path / "leaves", classes=("a", "b"), per_class=3)
    result = CliRunner().invoke(cli, ["finetune", "--recipe", "agri-leaf-disease", "--data", str(data),
                                      "--out", str(tmp_path / "run")])
    assert result.exit_code != 0
    assert "could not download the weights for ViT-B-16" in result.output and "--model NAME --pretrained" in result.output
    assert not (tmp_path / "run").exists()
