"""Continual learning: distillation and averaging maths, MTIL metrics, and the task loop end to end."""

import copy
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from safetensors.torch import load_file

from cliptune.cli import cli
from cliptune.config.run import build_config
from cliptune.continual import STRATEGIES, strategy_class
from cliptune.continual.base import distillation_kl, feature_distillation
from cliptune.continual.loop import ContinualLearner, continual, continual_defaults, load_task, mtil_metrics
from cliptune.continual.lwf_vr import virtual_vocabulary
from cliptune.continual.zscl import WeightAverage, reference_texts
from cliptune.config.run import RunConfig
from cliptune.core.options import choices_of
from cliptune.training.engine import Trainer
from cliptune.core.errors import CliptuneError, InterruptedRun
from cliptune.methods import build_method
from cliptune.models.loading import load_model
from cliptune.models.zeroshot import zeroshot_weights


def test_distillation_is_zero_iff_student_equals_teacher():
    logits = torch.randn(5, 7)
    assert distillation_kl(logits, logits.clone()).item() == 0.0
    assert distillation_kl(logits, logits + torch.randn(5, 7)).item() > 0
    images, texts = torch.randn(4, 8), torch.randn(6, 8)
    image_side, text_side = feature_distillation(images, images.clone(), texts, scale=10.0)
    assert image_side.item() == 0.0 and text_side.item() == 0.0
    image_side, text_side = feature_distillation(images + 0.5, images, texts, scale=10.0)
    assert image_side.item() > 0 and text_side.item() > 0


def _zscl_distillation(t, s, T=2.0):
    """ZSCL's `helpers.py::distillation`, verbatim: cross-entropy to the teacher's softened distribution."""
    p = F.softmax(t / T, dim=1)
    return F.cross_entropy(s / T, p, reduction="mean") * (T ** 2)


def test_zscl_loss_equals_the_reference_code_on_given_features():
    """ZSCL's finetune.py: both sides scored against the teacher's text features; KL = its CE - H(teacher)."""
    g = torch.Generator().manual_seed(3)
    student, teacher, texts = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g), torch.randn(7, 8, generator=g)
    scale, T = 30.0, 2.0
    unit = lambda x: x / x.norm(dim=-1, keepdim=True)  # noqa: E731
    logits_current = scale * unit(student) @ unit(texts).t()
    logits_ref = scale * unit(teacher) @ unit(texts).t()

    def entropy(t):
        p = F.softmax(t / T, dim=1)
        return -(p * p.log()).sum(1).mean() * T ** 2

    image_side, text_side = feature_distillation(student, teacher, texts, scale, T)
    assert image_side.item() == pytest.approx((_zscl_distillation(logits_ref, logits_current) - entropy(logits_ref)).item(), abs=1e-5)
    assert text_side.item() == pytest.approx((_zscl_distillation(logits_ref.t(), logits_current.t()) - entropy(logits_ref.t())).item(), abs=1e-5)


def test_weight_average_of_one_and_two_snapshots():
    a, b = {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 6.0])}
    average = WeightAverage()
    average.add(a)
    assert torch.equal(average.mean["w"], a["w"])
    average.add(b)
    assert torch.equal(average.mean["w"], torch.tensor([2.0, 4.0]))


def test_mtil_metrics_on_a_hand_made_matrix():
    acc = [[0.9, 0.2, 0.3],
           [0.8, 0.7, 0.4],
           [0.6, 0.5, 0.9]]
    metrics = mtil_metrics(acc)
    assert metrics["transfer"] == pytest.approx(((0.2) + (0.3 + 0.4) / 2) / 2)
    assert metrics["avg"] == pytest.approx(sum(map(sum, acc)) / 9)
    assert metrics["last"] == pytest.approx((0.6 + 0.5 + 0.9) / 3)


def test_bundled_reference_texts():
    texts = reference_texts(None)
    assert len(texts) >= 990 and "goldfish" in texts and len(set(texts)) == len(texts)


@pytest.mark.parametrize("strategy", ["lwf", "lwf-vr", "zscl", "modx"])
def test_regulariser_is_zero_before_training(tiny_config, split_data, strategy):
    learner, _ = _learner(tiny_config, split_data, strategy)
    extra = learner.strategy.regulariser(learner.method, torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 1]))
    assert extra is not None and extra.abs().item() < 1e-6


def test_the_strategy_choices_are_the_registry():
    assert choices_of(RunConfig, "strategy") == tuple(STRATEGIES)
    assert all(cls.summary for cls in STRATEGIES.values())
    with pytest.raises(CliptuneError, match="unknown strategy 'magic'"):
        strategy_class("magic")


def _continual_config(split_data, colour_data, tiny_config, strategy, **extra):
    values = {"model_config": tiny_config, "method": "full", "strategy": strategy, "epochs": 1, "lr": 1e-3,
              "batch_size": 8, "tasks": [f"{split_data}:Corn_(maize)___Common_rust,Grape___Black_rot",
                                          f"{split_data}:Tomato___Late_blight,Tomato___healthy"],
              "controls": [str(colour_data)], "reference": str(split_data / "val"), "avg_every": 2}
    values.update(extra)
    return build_config(None, values)


def test_continual_run_writes_matrix_plot_and_metrics(tiny_config, split_data, colour_data, tmp_path):
    result = continual(_continual_config(split_data, colour_data, tiny_config, "zscl"), tmp_path / "zscl")
    saved = json.loads((tmp_path / "zscl" / "continual.json").read_text())
    assert saved == result
    assert len(saved["tasks"]) == 2 and len(saved["acc"]) == 2 and all(len(r) == 2 for r in saved["acc"])
    assert len(saved["control_acc"]) == 2 and len(saved["control_acc"][0]) == 1 and len(saved["zeroshot"]) == 2
    assert saved["transfer"] == pytest.approx(saved["acc"][0][1])
    assert (tmp_path / "zscl" / "continual.png").stat().st_size > 1000


def test_wise_strategy_with_alpha_zero_keeps_the_initial_model(tiny_config, split_data, colour_data, tmp_path):
    result = continual(_continual_config(split_data, colour_data, tiny_config, "wise", wise_alpha=0.0), tmp_path / "w")
    assert result["acc"][-1] == pytest.approx(result["zeroshot"], abs=1e-6)
    assert result["control_acc"][-1] == pytest.approx(result["zeroshot_control"], abs=1e-6)


@pytest.mark.parametrize("strategy", ["lwf-vr", "lwf", "wise", "modx"])
def test_lora_strategies_carry_merged_weights(tiny_config, split_data, colour_data, tmp_path, strategy):
    config = _continual_config(split_data, colour_data, tiny_config, strategy, method="lora")
    result = continual(config, tmp_path / strategy)
    assert len(result["acc"]) == 2 and all(0 <= a <= 1 for row in result["acc"] for a in row)


def test_resume_continues_after_the_last_finished_task(tiny_config, split_data, colour_data, tmp_path, monkeypatch):
    config = _continual_config(split_data, colour_data, tiny_config, "lwf")
    straight = continual(config, tmp_path / "straight")
    original = Trainer.fit
    calls = {"n": 0}

    def fit_then_interrupt(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise InterruptedRun("interrupted in task 2")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "fit", fit_then_interrupt)
    with pytest.raises(InterruptedRun):
        continual(config, tmp_path / "resumed")
    assert not (tmp_path / "resumed" / "continual.json").exists()
    monkeypatch.setattr(Trainer, "fit", original)
    resumed = continual(None, tmp_path / "resumed", resume=True)
    for row_resumed, row_straight in zip(resumed["acc"], straight["acc"]):
        assert row_resumed == pytest.approx(row_straight, abs=1e-6)
    assert len(resumed["acc"]) == 2


def test_continual_cli_errors_and_defaults(tiny_config, split_data, tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["continual", "--model-config", tiny_config, "--strategy", "zscl",
                                 "--task", str(split_data), "--out", str(tmp_path / "o")])
    assert result.exit_code != 0 and "zscl needs reference images" in result.output
    result = runner.invoke(cli, ["continual", "--model-config", tiny_config, "--out", str(tmp_path / "o")])
    assert result.exit_code != 0 and "no tasks given" in result.output
    result = runner.invoke(cli, ["continual", "--model-config", tiny_config, "--task", f"{split_data}:nope",
                                 "--out", str(tmp_path / "o")])
    assert result.exit_code != 0 and "no class 'nope'" in result.output
    result = runner.invoke(cli, ["continual", "--model-config", tiny_config, "--task", str(split_data),
                                 "--method", "linear-probe", "--out", str(tmp_path / "o")])
    assert result.exit_code != 0 and "use --method" in result.output


@pytest.mark.slow
def test_demo_zscl_keeps_more_control_accuracy_than_naive(tmp_path):
    """The README's continual demo (as the CLI builds it): ZSCL preserves zero-shot ability on never-trained classes better."""
    results = {strategy: continual(build_config("continual-demo", {"strategy": strategy}, protocol=continual_defaults),
                                   tmp_path / strategy)
               for strategy in ("naive", "zscl")}
    control = {s: sum(row[0] for row in r["control_acc"]) / len(r["control_acc"]) for s, r in results.items()}
    assert control["zscl"] > control["naive"]
    assert results["zscl"]["transfer"] > results["naive"]["transfer"]


def test_continual_defaults_are_zscls_protocol_and_every_layer_above_overrides_them(tiny_config, split_data):
    values = {"model_config": tiny_config, "tasks": [str(split_data)], "reference": str(split_data)}
    zscl = build_config(None, {**values, "strategy": "zscl"}, default_method="full", protocol=continual_defaults)
    # Thunderbeee/ZSCL mtil/scripts/ZSCL.sh:9-26 (lr, --ls 0.2, --iterations 1000, --l2 1), mtil/src/args.py:11-16
    expected = {"lr": 1e-5, "batch_size": 64, "weight_decay": 0.0, "label_smoothing": 0.2, "warmup_steps": 100,
                "steps": 1000, "max_grad_norm": None, "select": "last", "l2": 1.0}
    assert {key: getattr(zscl, key) for key in expected} == expected
    assert zscl.sources["lr"] == "protocol defaults" and zscl.scale_lr is False
    naive = build_config(None, values, default_method="full", protocol=continual_defaults)
    assert naive.l2 == 0.0 and naive.select == "last"  # only ZSCL.sh adds --l2 1
    lora = build_config(None, {**values, "method": "lora"}, protocol=continual_defaults)
    assert lora.select == "last" and lora.lr == build_config(None, {"method": "lora"}).lr
    demo = build_config("continual-demo", {"strategy": "zscl"}, protocol=continual_defaults)
    assert demo.epochs == 5 and demo.steps is None and demo.lr == 1e-4  # the recipe's budget replaces the protocol's
    result = CliRunner().invoke(cli, ["continual", "--model-config", tiny_config, "--task", str(split_data),
                                      "--steps", "0", "--out", str(split_data.parent / "o")])
    assert result.output.strip() == "error: 'steps' must be at least 1 (or unset to train --epochs), got 0"


def test_virtual_vocabulary_is_1000_seeded_sequences_of_10_random_tokens(tiny_config):
    text = load_model(model_config=tiny_config).text
    vocabulary = virtual_vocabulary(text, seed=3)
    layout = text.tokenize([""])[0]
    start, end = int(layout[0]), int(layout[1])
    assert vocabulary.shape == (1000, text.context_length)
    assert (vocabulary[:, 0] == start).all() and (vocabulary[:, 11] == end).all() and (vocabulary[:, 12:] == text.pad_id).all()
    words = vocabulary[:, 1:11]
    assert not torch.isin(words, torch.tensor([start, end, text.pad_id])).any()
    assert len(words.unique()) > 5000  # drawn from the whole vocabulary
    assert torch.equal(vocabulary, virtual_vocabulary(text, seed=3))
    assert not torch.equal(vocabulary, virtual_vocabulary(text, seed=4))
    assert virtual_vocabulary(text, size=7, length=3, seed=0).shape == (7, text.context_length)


def _learner(tiny_config, split_data, strategy, **values):
    """A task's learner for `strategy` on two of split_data's classes: zscl's references are its val images and the
    phrases cat/dog/leaf/car; lwf-vr's vocabulary is 20 sequences; the teacher is a copy of the model."""
    model = load_model(model_config=tiny_config)
    teacher = dataclasses.replace(model, clip=copy.deepcopy(model.clip))
    phrases = split_data.parent / "phrases.txt"
    phrases.write_text("cat\ndog\nleaf\ncar\n")
    config = build_config(None, {"data": str(split_data), "model_config": tiny_config, "method": "full", "batch_size": 4,
                                 "reference": str(split_data / "val"), "reference_texts": str(phrases),
                                 "vocab_size": 20, **values})
    name, data = load_task(f"{split_data}:Tomato___Late_blight,Corn_(maize)___Common_rust", config, None)
    method = build_method("full", model, data.classnames, ["a photo of a {}."])
    chosen = strategy_class(strategy)(config)
    chosen.start_task(method, teacher, data, ["a photo of a {}."])
    return ContinualLearner(method, chosen, config).train(), teacher


def _perturb(method, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in method.trainable_parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))


def test_zscl_ensemble_holds_the_task_start_and_every_avg_every_th_step_from_the_first(tiny_config, split_data):
    learner, _ = _learner(tiny_config, split_data, "zscl", avg_every=2)
    snapshots = [learner.trainable_state_dict()]  # ZSCL's we_model starts as a copy of the task-start model
    for step in range(1, 5):
        _perturb(learner.method, seed=step)
        learner.after_optimizer_step()
        if step in (1, 3):  # ZSCL's iterations 0 and 2 (a snapshot after each one's update)
            snapshots.append(learner.trainable_state_dict())
    assert learner.strategy.average.count == 3
    for name, value in learner.strategy.average.mean.items():
        assert torch.allclose(value, sum(s[name] for s in snapshots) / 3, atol=1e-6)


def test_l2_pull_toward_the_task_start_weights(tiny_config, split_data):
    learner, _ = _learner(tiny_config, split_data, "naive", l2=0.5)
    start = learner.trainable_state_dict()
    _perturb(learner.method)
    logits, labels = torch.randn(3, 2), torch.tensor([0, 1, 1])
    now = learner.trainable_state_dict()
    expected = F.cross_entropy(logits, labels) + 0.5 * sum(((now[k] - start[k]) ** 2).sum() for k in start)
    assert torch.allclose(learner.loss(logits, labels), expected, rtol=1e-5)


def _distilled_on_the_stream(learner):
    """The regulariser on a training batch, and the stream batch it distilled (not the training batch)."""
    drawn = []
    next_images = learner.strategy.next_images
    learner.strategy.next_images = lambda device: drawn.append(next_images(device)) or drawn[-1]
    extra = learner.strategy.regulariser(learner.method, torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))
    (images,) = drawn
    return extra, images


def test_lwf_distils_the_previous_models_class_prompts_on_the_tasks_own_image_stream(tiny_config, split_data):
    """ZSCL's LwF (lwf.sh): the ZSCL code path with the current task's training images (eval transform) and the
    previous model's features of its class prompts, image->text and text->image."""
    learner, teacher = _learner(tiny_config, split_data, "lwf", distill_image=0.3, distill_text=0.7)
    strategy = learner.strategy
    name, data = load_task(f"{split_data}:Tomato___Late_blight,Corn_(maize)___Common_rust", strategy.config, None)
    assert strategy.stream.dataset.files == data.split("train").files
    _perturb(learner.method)
    extra, images = _distilled_on_the_stream(learner)
    with torch.no_grad():
        texts = zeroshot_weights(teacher.text, data.classnames, ["a photo of a {}."])
        student, reference = learner.method.model.image.encode(images), teacher.image.encode(images)
    image_side, text_side = feature_distillation(student, reference, texts, teacher.logit_scale)
    assert torch.allclose(extra, 0.3 * image_side + 0.7 * text_side, atol=1e-5)
    assert image_side > 0 and text_side > 0


def test_lwf_vr_scores_the_whole_vocabulary_on_its_own_image_stream(tiny_config, split_data):
    learner, teacher = _learner(tiny_config, split_data, "lwf-vr")
    assert learner.strategy.texts.shape[0] == 20  # every sequence, every step
    _perturb(learner.method)
    extra, images = _distilled_on_the_stream(learner)
    assert images.shape[0] == 4
    with torch.no_grad():
        texts = teacher.text.encode(virtual_vocabulary(teacher.text, 20, 10))
        student = learner.method.model.image.encode(images)
        reference = teacher.image.encode(images)
    image_side, text_side = feature_distillation(student, reference, texts, teacher.logit_scale)
    assert torch.allclose(extra, image_side + text_side, atol=1e-5)


def test_zscl_distils_the_reference_images_against_every_reference_phrase(tiny_config, split_data):
    learner, teacher = _learner(tiny_config, split_data, "zscl")
    assert learner.strategy.stream.dataset.files == sorted((split_data / "val").rglob("*.png"))
    _perturb(learner.method)
    extra, images = _distilled_on_the_stream(learner)
    with torch.no_grad():
        texts = teacher.text.encode(teacher.text.tokenize(["cat", "dog", "leaf", "car"]))
        student, reference = learner.method.model.image.encode(images), teacher.image.encode(images)
    assert torch.allclose(extra, sum(feature_distillation(student, reference, texts, teacher.logit_scale)), atol=1e-5)


def test_wise_strategy_interpolates_with_the_task_start_weights(tiny_config, split_data, colour_data, tmp_path, monkeypatch):
    import cliptune.continual.wise as continual_module

    anchors = []
    original = continual_module.interpolate

    def recording(zeroshot, finetuned, alpha):
        anchors.append({k: v.clone() for k, v in zeroshot.items()})
        mixed = original(zeroshot, finetuned, alpha)
        anchors.append(mixed)
        return mixed

    monkeypatch.setattr(continual_module, "interpolate", recording)
    continual(_continual_config(split_data, colour_data, tiny_config, "wise"), tmp_path / "w")
    first_anchor, after_task_one, second_anchor, _ = anchors
    assert all(torch.equal(second_anchor[k], after_task_one[k]) for k in after_task_one)
    assert not all(torch.equal(first_anchor[k], second_anchor[k]) for k in first_anchor)
    anchors.clear()
    continual(_continual_config(split_data, colour_data, tiny_config, "wise", wise_anchor="initial"), tmp_path / "i")
    assert all(torch.equal(anchors[0][k], anchors[2][k]) for k in anchors[0])


def test_l2_flag_reaches_the_config_and_is_checked_before_the_run_folder(tiny_config, split_data, tmp_path):
    result = CliRunner().invoke(cli, ["continual", "--model-config", tiny_config, "--task", str(split_data),
                                      "--l2", "-1", "--out", str(tmp_path / "o")])
    assert result.exit_code != 0 and "'l2' must be at least 0" in result.output and not (tmp_path / "o").exists()
    config = build_config(None, {"l2": 0.5, "wise_anchor": "initial"})
    assert config.l2 == 0.5 and config.wise_anchor == "initial" and config.vocab_per_step is None
    with pytest.raises(CliptuneError, match="wise_anchor"):
        build_config(None, {"wise_anchor": "middle"})
    result = CliRunner().invoke(cli, ["continual", "--model-config", tiny_config, "--task", str(split_data),
                                      "--set", "full.head=linear", "--set", "full.train_towers=vision", "--out", str(tmp_path / "o")])
    assert result.exit_code != 0 and "full.head=zeroshot" in result.output


# ----- Mod-X -----
def _modx_reference(image, text, old_image, old_text):
    """ZixuanNi/Mod-X continue_train_model.py:225-233, 309-330 with unique captions (pair i is image i, text i)."""
    per_image, per_text = image @ text.t(), text @ image.t()
    old_image_text, old_text_image = old_image @ old_text.t(), old_text @ old_image.t()

    def cognition_align(new, old):
        old = old.clone()
        for i in range(len(old)):
            if old[i].argmax() != i:
                old[i] = new[i]
        return old

    old_image_text, old_text_image = cognition_align(per_image, old_image_text), cognition_align(per_text, old_text_image)
    loss_image = F.kl_div(per_image.softmax(dim=-1).log(), old_image_text.softmax(dim=-1), reduction="sum")
    loss_text = F.kl_div(per_text.softmax(dim=-1).log(), old_text_image.softmax(dim=-1), reduction="sum")
    return (loss_image + loss_text) / 2


def test_modx_term_equals_the_original_code_with_unique_pairs_and_screens_wrong_rows():
    from cliptune.continual.modx import offdiagonal_distillation

    g = torch.Generator().manual_seed(5)
    unit = lambda x: F.normalize(x, dim=-1)  # noqa: E731
    image, text = unit(torch.randn(6, 8, generator=g)), unit(torch.randn(6, 8, generator=g))
    old_image = unit(image + 0.3 * torch.randn(6, 8, generator=g))
    old_text = unit(image + 0.8 * torch.randn(6, 8, generator=g))  # the old model matches most pairs, not all
    labels = torch.arange(6)
    screened = int(((old_image @ old_text.T).argmax(1) != labels).sum() + ((old_text @ old_image.T).argmax(1) != labels).sum())
    assert 0 < screened < 12
    term = offdiagonal_distillation(image, text, old_image, old_text, labels)
    assert torch.allclose(term, _modx_reference(image, text, old_image, old_text), atol=1e-6) and term > 0
    assert offdiagonal_distillation(image, text, image, text, labels).abs() < 1e-6


def test_modx_with_class_prompts_counts_a_match_of_the_same_class_as_right():
    from cliptune.continual.modx import screened_kl

    labels = torch.tensor([0, 0, 1])
    previous = torch.tensor([[0.1, 0.9, 0.0], [0.9, 0.1, 0.0], [0.0, 0.9, 0.1]])  # rows 0, 1: best match is their class
    current = torch.zeros(3, 3)
    kept = F.kl_div(F.log_softmax(current[:2], -1), F.softmax(previous[:2], -1), reduction="sum")  # row 2 is screened
    assert torch.allclose(screened_kl(current, previous, labels), kept)


def test_modx_regulariser_is_alpha_times_the_term_on_the_batch(tiny_config, split_data):
    from cliptune.continual.modx import offdiagonal_distillation

    learner, teacher = _learner(tiny_config, split_data, "modx", modx_alpha=3.0)
    _perturb(learner.method)
    images, labels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2)), torch.tensor([0, 1, 1, 0])
    extra = learner.strategy.regulariser(learner.method, images, labels)
    method = learner.method
    with torch.no_grad():
        texts = method.class_features()[labels]
        old_texts = zeroshot_weights(teacher.text, method.classnames, ["a photo of a {}."])[labels]
        expected = offdiagonal_distillation(method.model.image.encode(images), texts, teacher.image.encode(images),
                                            old_texts, labels)
    assert expected > 0 and torch.allclose(extra, 3.0 * expected, atol=1e-6)
    extra.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.trainable_parameters())


def test_modx_pairs_images_with_their_own_captions_where_they_have_one(tiny_config, split_data, tmp_path):
    """Mod-X trains on image-caption pairs: a captioned image's text is its caption (current and previous model), and
    its own pair in the screening is that caption; an image without one keeps its class prompt."""
    import shutil

    from cliptune.continual.modx import offdiagonal_distillation

    data_dir = shutil.copytree(split_data, tmp_path / "captioned")
    for i, image in enumerate(sorted((data_dir / "train").rglob("*.png"))):
        if i % 2 == 0:
            image.with_suffix(".txt").write_text(f"leaf number {i} with {image.parent.name.lower().replace('_', ' ')}")
    learner, teacher = _learner(tiny_config, data_dir, "modx", modx_alpha=2.0)
    assert learner.reads_sample_ids  # the engine hands the batch's rows to the learner
    _perturb(learner.method)
    _, data = load_task(f"{data_dir}:Tomato___Late_blight,Corn_(maize)___Common_rust", learner.settings, None)
    train = data.split("train")
    ids = torch.tensor([0, 1, 9, 12])
    labels = torch.tensor([train.labels[i] for i in ids.tolist()])
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    learner.method.train()
    learner(images)
    total = learner.loss(learner.method(images), labels, sample_ids=ids)
    extra = learner.strategy.regulariser(learner.method, images, labels, ids)
    method = learner.method
    captions = [data.captions.get(train.files[i]) for i in ids.tolist()]
    assert sum(c is not None for c in captions) in (1, 2, 3)  # a mix of captioned and uncaptioned images
    with torch.no_grad():
        prompts = method.class_features()[labels]
        old_prompts = zeroshot_weights(teacher.text, method.classnames, ["a photo of a {}."])[labels]
        texts = torch.stack([method.model.text.encode(method.model.text.tokenize([c]))[0] if c else p
                             for c, p in zip(captions, prompts)])
        old_texts = torch.stack([teacher.text.encode(teacher.text.tokenize([c]))[0] if c else p
                                 for c, p in zip(captions, old_prompts)])
        rows = sorted({c for c in captions if c})
        pairs = torch.tensor([rows.index(c) + 100 if c else -1 - int(y) for c, y in zip(captions, labels)])
        expected = offdiagonal_distillation(method.model.image.encode(images), texts, teacher.image.encode(images),
                                            old_texts, pairs)
    assert torch.allclose(extra, 2.0 * expected, atol=1e-5) and expected > 0
    assert torch.isfinite(total)


def test_tasks_with_captions_report_retrieval_recall_after_every_task(tiny_config, split_data, colour_data, tmp_path):
    import shutil

    from PIL import Image

    from cliptune.core.metrics import retrieval_recall
    from cliptune.data.folders import eval_transform

    data_dir = shutil.copytree(split_data, tmp_path / "captioned")
    for i, image in enumerate(sorted(data_dir.rglob("*.png"))):
        image.with_suffix(".txt").write_text(f"picture {i} of {image.parent.name.lower().replace('_', ' ')}")
    config = _continual_config(data_dir, colour_data, tiny_config, "naive")
    result = continual(config, tmp_path / "run")
    assert len(result["retrieval"]) == 2 and len(result["zeroshot_retrieval"]) == 2
    first = result["zeroshot_retrieval"][0]
    _, task = load_task(config.tasks[0], config, config.shots)
    test = task.split("test")
    model = load_model(model_config=tiny_config)  # the zero-shot model, recomputed by hand
    preprocess = eval_transform(model.image_size, model.mean, model.std, model.interpolation)
    with torch.no_grad():
        images = model.image.encode(torch.stack([preprocess(Image.open(f).convert("RGB")) for f in test.files]))
        texts = model.text.encode(model.text.tokenize([task.captions[f] for f in test.files]))
    assert first == {**retrieval_recall(images, texts), "n": len(test)}
    assert task.skipped_files == 0  # the .txt captions beside the images are not unreadable images


def test_modx_is_naive_at_alpha_zero_and_moves_the_weights_otherwise(tiny_config, split_data, colour_data, tmp_path):
    assert "modx" in CliRunner().invoke(cli, ["continual", "--help"]).output
    naive = continual(_continual_config(split_data, colour_data, tiny_config, "naive"), tmp_path / "naive")
    idle = continual(_continual_config(split_data, colour_data, tiny_config, "modx", modx_alpha=0.0), tmp_path / "idle")
    assert idle["acc"] == naive["acc"] and idle["control_acc"] == naive["control_acc"]
    weights = {name: load_file(str(tmp_path / name / "checkpoints" / "last" / "model.safetensors")) for name in ("naive", "idle")}
    assert all(torch.equal(weights["naive"][k], weights["idle"][k]) for k in weights["naive"])
    continual(_continual_config(split_data, colour_data, tiny_config, "modx", modx_alpha=50.0), tmp_path / "pulled")
    result = CliRunner().invoke(cli, ["continual", "--model-config", tiny_config, "--strategy", "modx", "--modx-alpha", "-1",
                                      "--task", str(split_data), "--out", str(tmp_path / "bad")])
    assert result.exit_code != 0 and "'modx_alpha' must be at least 0" in result.output
    pulled = load_file(str(tmp_path / "pulled" / "checkpoints" / "last" / "model.safetensors"))
    assert not all(torch.equal(pulled[k], weights["naive"][k]) for k in pulled)


def test_modx_on_cached_features_gives_them_to_both_models(tiny_config, split_data):
    """A frozen image tower (full fine-tuning of the text tower): the inputs are image features, the same for the
    current and the previous model; only the text side differs."""
    from cliptune.continual.modx import offdiagonal_distillation

    model = load_model(model_config=tiny_config)
    teacher = dataclasses.replace(model, clip=copy.deepcopy(model.clip))
    config = build_config(None, {"data": str(split_data), "model_config": tiny_config, "method": "full", "modx_alpha": 2.0})
    name, data = load_task(f"{split_data}:Tomato___Late_blight,Corn_(maize)___Common_rust", config, None)
    method = build_method("full", model, data.classnames, ["a photo of a {}."], {"train_towers": "text"}).train()
    assert method.uses_image_features
    strategy = strategy_class("modx")(config)
    strategy.start_task(method, teacher, data, ["a photo of a {}."])
    _perturb(method)
    features = torch.randn(4, model.text.output_dim, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([0, 1, 1, 0])
    extra = strategy.regulariser(method, features, labels)
    with torch.no_grad():
        images = F.normalize(features, dim=-1)
        old_texts = zeroshot_weights(teacher.text, data.classnames, ["a photo of a {}."])[labels]
        expected = offdiagonal_distillation(images, method.class_features()[labels], images, old_texts, labels)
    assert expected > 0 and torch.allclose(extra, 2.0 * expected, atol=1e-6)
