"""The method protocol and every method's training defaults: layering, budgets, selection, warm-up,
few-shot validation, rslora, the L-BFGS probe, Tip-Adapter / CLIP-Adapter, and the demo gains."""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from safetensors.torch import load_file

from cliptune.commands import api
from cliptune.cli import cli
from cliptune.config.run import RunConfig, build_config, load_config, save_config
from cliptune.training.optim import budget_lr_factor, cosine_with_warmup, training_length, with_budget_lr
from cliptune.core.errors import CliptuneError
from cliptune.methods import METHODS, _checked, build_method
from cliptune.methods.base import Method, MethodConfig
from cliptune.methods.linear_probe import logistic_regression
from cliptune.methods.tip_adapter import cache_logits
from cliptune.models.loading import load_model
from cliptune.core.options import option
from cliptune.training.session import Session, make_accelerator
from cliptune.models.zeroshot import zeroshot_weights

ROOT = Path(__file__).resolve().parent.parent
DEMO_RECIPE = "demo"


# ----- layering: engine < method defaults < recipe < CLI < --set -----
def test_method_defaults_sit_between_the_engine_and_a_recipe(tmp_path):
    config = build_config(None, {"method": "coop", "shots": 16})
    assert (config.optimizer, config.lr, config.epochs, config.warmup_epochs, config.select) == ("sgd", 0.002, 200, 1, "last")
    assert config.sources["lr"] == "method defaults" and config.batch_size == 32
    assert build_config(None, {"method": "coop", "shots": 1}).epochs == 50  # CoOp's budget follows the shots
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: coop\nlr: 0.01\nbatch_size: 8\n")
    config = build_config(str(recipe), {"batch_size": 4}, ["optimizer=adamw"])
    assert (config.lr, config.batch_size, config.optimizer, config.momentum) == (0.01, 4, "adamw", 0.9)
    assert config.sources == {**config.sources, "lr": "recipe r.yaml", "batch_size": "CLI flags", "optimizer": "--set"}
    # an epoch budget from a higher layer replaces a method's step budget (LoRA's 500 x shots)
    assert build_config(None, {"method": "lora", "shots": 4}).steps == 2000
    assert build_config(None, {"method": "lora", "shots": 4, "epochs": 3}).steps is None
    # linear-probe needs no optimiser: the engine's defaults stay for anything that does not train


def test_lr_is_raised_only_for_a_steps_budget_the_user_chose():
    config = build_config(None, {"method": "lora", "shots": 16, "steps": 100})
    assert config.scale_lr is True
    assert budget_lr_factor(config, updates_per_epoch=5) == pytest.approx(min(10, math.sqrt(8000 / 100)))
    assert build_config(None, {"method": "lora", "shots": 16, "steps": 100, "lr": 1e-3}).scale_lr is False
    assert build_config(None, {"method": "lora", "shots": 16}).scale_lr is False
    coop = build_config(None, {"method": "coop", "shots": 16, "steps": 250})
    assert budget_lr_factor(coop, updates_per_epoch=5) == pytest.approx(math.sqrt(200 * 5 / 250))


def test_the_budget_lr_is_resolved_once_into_the_saved_config(tmp_path):
    # 40 images, batch 8: 5 updates per epoch; CoOp's 16-shot default is 200 epochs = 1000 updates, cut to 250
    coop = build_config(None, {"method": "coop", "shots": 16, "steps": 250, "batch_size": 8})
    resolved = with_budget_lr(coop, 40)
    assert resolved.lr == pytest.approx(coop.lr * math.sqrt(1000 / 250)) and resolved.scale_lr is False
    assert "raised for the --steps budget" in resolved.sources["lr"]
    assert with_budget_lr(resolved, 40).lr == resolved.lr  # resolving again (a --resume) changes nothing
    save_config(resolved, tmp_path / "config.yaml")
    assert with_budget_lr(load_config(tmp_path / "config.yaml"), 40).lr == pytest.approx(resolved.lr)
    assert with_budget_lr(build_config(None, {"method": "coop", "shots": 16}), 40).lr == coop.lr  # no budget: untouched


def test_method_options_are_validated_before_any_work():
    with pytest.raises(CliptuneError, match="'coop.n_ctx' must be at least 1"):
        build_config(None, {"method": "coop"}, ["coop.n_ctx=0"])
    with pytest.raises(CliptuneError, match="'lora.lora_scaling' must be one of rslora, standard"):
        build_config(None, {"method": "lora"}, ["lora.lora_scaling=other"])
    with pytest.raises(CliptuneError, match=r"unknown option 'coop.bogus' \(valid: n_ctx"):
        METHODS["coop"].config_class.from_options({"bogus": 1})


def test_registry_refuses_an_incomplete_method():
    @dataclass
    class EmptyConfig(MethodConfig):
        size: int = option(1, "a size", min=1)

    class Incomplete(Method):  # no forward(): abstract
        name = "incomplete"
        config_class = EmptyConfig
        trains, paper = "nothing", "none"

    class Unexportable(Incomplete):
        name = "unexportable"
        export_formats = ("merged",)

        def forward(self, inputs):
            return inputs

    with pytest.raises(TypeError, match="not a complete Method"):
        _checked(Incomplete)
    with pytest.raises(TypeError, match="lacks merged_state_dict"):
        _checked(Unexportable)


# ----- budget, schedule, selection, validation split -----
def test_steps_budget_ends_mid_epoch():
    config = RunConfig(batch_size=8, steps=7)
    assert training_length(config, 40) == (2, 2, 7)  # 5 updates per epoch: 5 + 2
    config = RunConfig(batch_size=8, steps=7, grad_accum=2)
    assert training_length(config, 40) == (3, 2, 7)  # 3 updates per epoch (5 batches): 3 + 3 + 1 (2 batches)
    assert training_length(RunConfig(batch_size=8, epochs=3), 40) == (3, 5, 15)


def test_constant_warmup_then_cosine_as_dassl():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=0.002)
    scheduler = cosine_with_warmup(optimizer, 0, total_steps=10, constant_steps=3, constant_factor=1e-5 / 0.002)
    seen = []
    for _ in range(10):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [1e-5] * 3 + [0.002 * 0.5 * (1 + math.cos(math.pi * k / 10)) for k in range(7)]
    assert seen == pytest.approx(expected, rel=1e-9)


def test_few_shot_validation_split(colour_data, tiny_config):
    def val_counts(**values):
        config = build_config(None, {"data": str(colour_data), "model_config": tiny_config, **values})
        labels = Session.open(config, make_accelerator()).data.splits["val"].labels
        return sorted(labels.count(k) for k in set(labels))

    assert val_counts() == [1, 1, 1]  # 12 per class x 0.1
    config = {"val_fraction": 0.5}
    assert val_counts(**config) == [5, 5, 5]
    assert val_counts(**config, shots=2) == [2, 2, 2]  # Dassl: min(K, 4)
    assert val_counts(**config, shots=8) == [4, 4, 4]
    assert val_counts(**config, shots=8, val_shots=3) == [3, 3, 3]


def test_select_last_keeps_the_last_epoch(colour_data, tiny_config, tmp_path):
    values = {"data": str(colour_data), "model_config": tiny_config, "epochs": 4, "lr": 0.5, "batch_size": 8}
    for select in ("last", "best-val"):
        run = tmp_path / select
        api.finetune(build_config(None, {**values, "select": select}, ["linear-probe.solver=sgd"]), run)
        best, last = load_file(str(run / "checkpoints/best/method.safetensors")), load_file(str(run / "checkpoints/last/trainable.safetensors"))
        history = json.loads((run / "metrics.json").read_text())["train"]
        if select == "last":
            assert history["best_epoch"] == 4 and all(torch.equal(best[k], last[k]) for k in best)
        else:
            vals = [h["val_top1"] for h in history["history"]]
            assert history["best_epoch"] == vals.index(max(vals)) + 1


# ----- method internals against their papers' formulas -----
@pytest.mark.parametrize("scaling, expected", [("rslora", 4 / math.sqrt(4)), ("standard", 4 / 4)])
def test_lora_scaling_is_alpha_over_sqrt_r_as_clip_lora(tiny_config, scaling, expected):
    from peft.tuners.lora import LoraLayer

    method = build_method("lora", load_model(model_config=tiny_config), ["a", "b"], ["{}"],
                          {"lora_r": 4, "lora_alpha": 4.0, "lora_scaling": scaling})
    layers = [m for m in method.clip.modules() if isinstance(m, LoraLayer)]
    assert layers and all(layer.scaling["default"] == pytest.approx(expected) for layer in layers)


def test_lbfgs_probe_reaches_the_optimum_of_the_convex_problem():
    generator = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(60, 8, generator=generator), dim=-1)
    y = torch.randint(3, (60,), generator=generator)
    c = 2.0
    weight, bias = logistic_regression(x, y, 3, c)
    w, b = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
    objective = c * F.cross_entropy(x.double() @ w.T + b, y, reduction="sum") + (w**2).sum() / 2
    grad_w, grad_b = torch.autograd.grad(objective, (w, b))
    assert float(grad_w.norm() + grad_b.norm()) < 1e-4  # optimality condition (gradient from zeros: ~10)
    # and nothing lower nearby: a long plain gradient descent from the solution does not improve it
    w2, b2 = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
    step = torch.optim.SGD([w2, b2], lr=1e-3)
    for _ in range(200):
        step.zero_grad()
        loss = c * F.cross_entropy(x.double() @ w2.T + b2, y, reduction="sum") + (w2**2).sum() / 2
        loss.backward()
        step.step()
    assert float(loss.detach()) >= float(objective.detach()) - 1e-9


def test_tip_adapter_with_alpha_zero_is_zero_shot_exactly_and_the_cache_is_the_papers(tiny_config, colour_data):
    model = load_model(model_config=tiny_config)
    config = build_config(None, {"data": str(colour_data), "model_config": tiny_config, "method": "tip-adapter"})
    session = Session.open(config, make_accelerator())
    templates = ["a photo of a {}."]
    train = session.inputs("train", True, train=True)
    test = session.features("test")
    weights = zeroshot_weights(model.text, session.data.classnames, templates)
    zeroshot = model.logit_scale * F.normalize(test, dim=-1) @ weights.T
    method = build_method("tip-adapter", model, session.data.classnames, templates, {"alpha": 0.0, "search": False})
    method.prepare(train)
    # alpha = 0 adds an exact 0: the logits are the zero-shot head's (to float noise between two encodings of
    # the class prompts) and so are the predictions
    assert torch.equal(method(test) - method.scale * F.normalize(test, dim=-1) @ method.class_features.T, torch.zeros(6, 3))
    assert torch.allclose(method(test), zeroshot, atol=1e-5) and torch.equal(method(test).argmax(1), zeroshot.argmax(1))
    method = build_method("tip-adapter", model, session.data.classnames, templates, {"alpha": 2.0, "beta": 3.0, "search": False})
    method.prepare(train)
    keys = F.normalize(train.features.mean(dim=0), dim=-1)  # the mean over the augmented views, as build_cache_model
    values = F.one_hot(train.labels, 3).float()
    f = F.normalize(test, dim=-1)
    affinity = f @ keys.T
    by_hand = zeroshot + 2.0 * ((-1) * (3.0 - 3.0 * affinity)).exp() @ values  # main.py's expression
    assert torch.allclose(method(test), by_hand, atol=1e-5)
    assert torch.allclose(cache_logits(f, keys, values, 3.0), ((-1) * (3.0 - 3.0 * affinity)).exp() @ values, atol=1e-6)


@pytest.mark.parametrize("method, trains", [("tip-adapter", False), ("tip-adapter-f", True), ("clip-adapter", True)])
def test_new_methods_run_through_finetune_and_eval(tiny_config, split_data, tmp_path, method, trains):
    out = tmp_path / method
    flag = ["--adapter-ratio", "0.3"] if method == "clip-adapter" else ["--alpha", "0.5", "--beta", "2"]
    result = CliRunner().invoke(cli, ["finetune", "--data", str(split_data), "--model-config", tiny_config, "--method", method,
                                      "--shots", "4", "--steps", "3", *flag, "--out", str(out)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["train"]["trainable_params"] > 0) == trains
    assert (metrics["train"]["images_seen"] > 0) == trains
    saved = json.loads((out / "checkpoints/best/method.json").read_text())["config"]
    assert saved.get("ratio", saved.get("alpha")) in (0.3, 0.5)
    evaluated = CliRunner().invoke(cli, ["eval", str(out), "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    report = json.loads(evaluated.output[evaluated.output.index("{"):])
    assert report["test"]["top1"] == metrics["test"]["top1"]


def test_methods_command_lists_and_shows(tmp_path):
    listed = CliRunner().invoke(cli, ["methods"])
    assert listed.exit_code == 0
    assert [line.split()[0] for line in listed.output.splitlines()] == list(METHODS)
    shown = CliRunner().invoke(cli, ["methods", "show", "lora", "--shots", "4"])
    assert shown.exit_code == 0 and "steps: 2000" in shown.output and "--lora-scaling / lora.lora_scaling" in shown.output
    unknown = CliRunner().invoke(cli, ["methods", "show", "magic"])
    assert unknown.exit_code == 2 and "unknown method 'magic'" in unknown.output
    wrong = CliRunner().invoke(cli, ["continual", "--help"])
    assert "--lora-r" in wrong.output and "--n-ctx" not in wrong.output  # only mergeable methods' flags


# ----- the demo: each method, only --method X --shots 16 and a CPU-sized --steps, against zero-shot -----
DEMO_STEPS = {"linear-probe": 1, "coop": 60, "cocoop": 160, "maple": 60, "lora": 40, "full": 40,
              "tip-adapter-f": 40, "clip-adapter": 100}


# On the CLIP-like demo (logit scale 100) the prompt learners at their original defaults do not beat zero-shot in a
# CPU-sized budget: CoOp's random context, CoCoOp's single "a photo of a" prompt against the 3-template ensemble,
# MaPLe's 60 steps (issue 19: `cliptune sweep` is the remedy; the zero-shot guard says so). Strict: a change that
# makes them pass must update this list.
BELOW_ZEROSHOT_AT_CPU_BUDGET = ("coop", "cocoop", "maple")


@pytest.mark.parametrize("method", [pytest.param(m, marks=pytest.mark.xfail(strict=True, reason="ends below zero-shot"))
                                    if m in BELOW_ZEROSHOT_AT_CPU_BUDGET else m for m in DEMO_STEPS])
@pytest.mark.slow
def test_every_method_beats_zero_shot_on_the_demo_with_its_defaults(tmp_path, method):
    config = build_config(DEMO_RECIPE, {"method": method, "shots": 16, "steps": DEMO_STEPS[method]})
    metrics = api.finetune(config, tmp_path / method)
    assert metrics["test"]["top1"] > metrics["zeroshot"]["top1"] + 0.02, (method, metrics["test"]["top1"], metrics["zeroshot"]["top1"])


def test_engine_hooks_are_declared_on_method_and_continual_forwards_them(tiny_config):
    """Hooks the engine, continual and the classifier call are declared on Method (not looked up by attribute name),
    and the continual wrapper forwards the all-gather one (a FLYP task under torchrun would otherwise hang)."""
    import inspect
    import pathlib
    from types import SimpleNamespace

    import cliptune
    from cliptune.continual.loop import ContinualLearner
    from cliptune.methods.base import Method

    assert isinstance(inspect.getattr_static(Method, "gathers_across_processes"), property)
    model = load_model(model_config=tiny_config)
    coop = build_method("coop", model, ["red", "green"], ["a photo of a {}."], {"n_ctx": 2})
    images = torch.randn(2, 3, 32, 32)
    assert coop.gathers_across_processes is False
    assert torch.equal(coop.image_features(images), model.image.encode(images, normalize=False))
    flyp = build_method("full", model, ["red", "green"], ["a photo of a {}."], {"loss": "contrastive"}).train()
    assert flyp.gathers_across_processes is True
    assert ContinualLearner.gathers_across_processes.fget(SimpleNamespace(method=flyp)) is True
    package = pathlib.Path(cliptune.__file__).parent
    for path in package.rglob("*.py"):
        text = path.read_text()
        for hook in ("gathers_across_processes", "image_features", "uses_image_features"):
            assert f'"{hook}"' not in text, f"{path.relative_to(package)} looks up {hook} by name"
