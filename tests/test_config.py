import pytest

from cliptune.config.run import build_config, load_config, save_config
from cliptune.core.errors import CliptuneError


def test_precedence_defaults_recipe_cli_set(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("epochs: 7\nlr: 0.5\nbatch_size: 4\nlinear-probe:\n  init: random\n")
    config = build_config(str(recipe), {"lr": 0.25, "batch_size": 8}, ["batch_size=16"])
    assert config.optimizer == "adamw"  # default
    assert config.epochs == 7  # recipe
    assert config.lr == 0.25  # CLI beats recipe
    assert config.batch_size == 16  # --set beats CLI
    assert config.method_options() == {"init": "random"}


def test_set_method_option_and_method_flag():
    config = build_config(None, {}, ["linear-probe.init=random"])
    assert config.method_options() == {"init": "random"}
    config = build_config(None, {}, [], {"init": "random"})
    assert config.methods["linear-probe"]["init"] == "random"


def test_unknown_recipe_key_names_file_line_and_valid_keys(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("epochs: 3\nlearning_rate: 0.1\n")
    with pytest.raises(CliptuneError) as info:
        build_config(str(recipe))
    message = str(info.value)
    assert "learning_rate" in message and f"{recipe}:2" in message and "valid keys:" in message and "lr" in message


def test_unknown_set_key_lists_valid_keys():
    with pytest.raises(CliptuneError, match="unknown config key 'epoch'.*valid keys: .*epochs"):
        build_config(None, {}, ["epoch=3"])
    with pytest.raises(CliptuneError, match="linear-probe.bogus"):
        build_config(None, {}, ["linear-probe.bogus=1"])


def test_type_and_choice_errors():
    with pytest.raises(CliptuneError, match="'epochs' must be int"):
        build_config(None, {}, ["epochs=many"])
    with pytest.raises(CliptuneError, match="'optimizer' must be one of adamw, sgd, lion"):
        build_config(None, {"optimizer": "adam"})
    with pytest.raises(CliptuneError, match="unknown method 'magic'"):
        build_config(None, {"method": "magic"})


def test_malformed_yaml_and_missing_recipe(tmp_path):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("epochs: [1, 2\nlr: 3\n")
    with pytest.raises(CliptuneError, match="malformed YAML"):
        build_config(str(recipe))
    with pytest.raises(CliptuneError, match="recipe 'nope' not found"):
        build_config("nope")


def test_extends_and_relative_paths(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "base.yaml").write_text("data: data\nepochs: 2\nlr: 0.1\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nlr: 0.2\nname: child\nsummary: test recipe\n")
    config = build_config(str(tmp_path / "child.yaml"))
    assert (config.epochs, config.lr) == (2, 0.2)
    assert config.data == str((tmp_path / "data").resolve())


def test_config_roundtrip(tmp_path):
    config = build_config(None, {"epochs": 3, "shots": 4}, ["linear-probe.init=random"])
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


def test_demo_recipe_resolves_by_name():
    config = build_config("demo")
    assert config.model_config.endswith("demo-clip.json") and config.data.endswith("sample_data")
