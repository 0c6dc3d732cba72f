"""Each method's training defaults equal its original code's config (values and files cited), and the engine runs
them as the original does (Dassl: the lr held for an epoch, the last partial batch dropped).

Original repositories read (HEAD): KaiyangZhou/CoOp ff61507c, KaiyangZhou/Dassl.pytorch c61a1b57,
muzairkhattak/multimodal-prompt-learning 69bce21a, htyao89/KgCoOp c43ccc3, muzairkhattak/PromptSRC bb95c77, dyabel/mocoop f58667d, HealthX-Lab/BiomedCoOp 7ceb5a8, jusiro/CLAP dbdf409, gaopengcuhk/Tip-Adapter d0e2d6f8, MaxZanella/CLIP-LoRA
358f0d73, mlfoundations/wise-ft 58b7a4b3, locuslab/FLYP 215d5bb6.
"""

import math

import pytest
import torch
from click.testing import CliRunner

from cliptune.cli import cli
from cliptune.config.run import RunConfig
from cliptune.methods import method_class
from cliptune.training.optim import batches_per_epoch, cosine_with_warmup, training_length, updates_per_epoch, warmup_length

# Dassl (dassl/config/defaults.py:153-156, 176-185, 216; configs/trainers/CoOp/vit_b16.yaml:13, 20-22;
# data_manager.py:43; trainers/coop.py:281-282)
DASSL = {"optimizer": "sgd", "momentum": 0.9, "weight_decay": 5e-4, "warmup_epochs": 1, "warmup_lr": 1e-5,
         "lr_per_epoch": True, "drop_last": True, "aug_crop_scale": [0.08, 1.0], "aug_hflip": True, "select": "last"}

ORIGINAL = {
    # CoOp configs/trainers/CoOp/vit_b16.yaml:3,17 and COOP.md:18-22 (1 shot: ep50, 2 and 4: ep100, 8 and 16: 200)
    ("coop", 1): {**DASSL, "lr": 0.002, "batch_size": 32, "epochs": 50},
    ("coop", 2): {**DASSL, "lr": 0.002, "batch_size": 32, "epochs": 100},
    ("coop", 4): {**DASSL, "lr": 0.002, "batch_size": 32, "epochs": 100},
    ("coop", 8): {**DASSL, "lr": 0.002, "batch_size": 32, "epochs": 200},
    ("coop", 16): {**DASSL, "lr": 0.002, "batch_size": 32, "epochs": 200},
    # KgCoOp configs/trainers/KgCoOp/vit_b16_ep100_ctxv1.yaml:3,16-22 (the same for every shot count)
    ("kgcoop", 1): {**DASSL, "lr": 0.002, "batch_size": 128, "epochs": 100},
    ("kgcoop", 16): {**DASSL, "lr": 0.002, "batch_size": 128, "epochs": 100},
    # CLAP configs/trainers/SGD_lr1e-1_B256_ep300.yaml (Dassl's momentum, per-epoch cosine), adapters.py:143 (20 views)
    ("clap", 1): {**DASSL, "lr": 0.1, "weight_decay": 0.0, "batch_size": 256, "epochs": 300, "aug_views": 20},
    ("clap", 16): {**DASSL, "lr": 0.1, "weight_decay": 0.0, "batch_size": 256, "epochs": 300, "aug_views": 20},
    # BiomedCoOp configs/trainers/BiomedCoOp/few_shot/*.yaml:1-29 (lr 0.0025, batch 4, 100 epochs, crop without flip)
    ("biomedcoop", 16): {**DASSL, "lr": 0.0025, "batch_size": 4, "epochs": 100, "aug_hflip": False},
    # MoCoOp configs/MoCoOp/vit_b16_c4_ep25_batch32_cls_t2t_5_wcl_25_g1_b_lr32.yaml:3,17,18,20 (3 warm-up epochs), PREC
    # amp: gradients clipped at 1.0 (prompting/moe.py:632); TEXT_LOSS_WEIGHT 5, GATE_LOSS_WEIGHT 1 (:35-40)
    ("mocoop", 16): {**DASSL, "lr": 0.032, "batch_size": 32, "epochs": 25, "warmup_epochs": 3, "max_grad_norm": 1.0},
    # CoOp configs/trainers/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml:3,17,18
    ("cocoop", 16): {**DASSL, "lr": 0.002, "batch_size": 1, "epochs": 10},
    # MaPLe configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml:3,17,18
    ("maple", 16): {**DASSL, "lr": 0.0035, "batch_size": 4, "epochs": 5},
    # PromptSRC configs/trainers/PromptSRC/vit_b16_c2_ep50_batch4_4+4ctx_few_shot.yaml:4,17-23 (few_shot.sh:8)
    ("promptsrc", 1): {**DASSL, "lr": 0.0025, "batch_size": 4, "epochs": 50},
    ("promptsrc", 16): {**DASSL, "lr": 0.0025, "batch_size": 4, "epochs": 50},
    # Tip-Adapter configs/imagenet.yaml:30 (augment_epoch 10), main.py:173-178 (crop 0.5-1 + flip); val read whole
    ("tip-adapter", 16): {"aug_views": 10, "aug_crop_scale": [0.5, 1.0], "aug_hflip": True, "val_shots": 0},
    # Tip-Adapter main.py:72 AdamW(lr, eps=1e-4) (torch's default weight decay 0.01), imagenet.yaml:29,31, main.py:181
    ("tip-adapter-f", 16): {"optimizer": "adamw", "lr": 1e-3, "adam_eps": 1e-4, "weight_decay": 0.01, "epochs": 20,
                            "batch_size": 256},
    # CLIP-LoRA run_utils.py:28-30, lora.py:73-76 (AdamW wd 1e-2, CosineAnnealingLR eta_min 1e-6), main.py:38-43, lora.py:143
    ("lora", 16): {"optimizer": "adamw", "lr": 2e-4, "weight_decay": 0.01, "batch_size": 32, "steps": 8000, "min_lr": 1e-6,
                   "aug_crop_scale": [0.08, 1.0], "aug_hflip": True, "select": "last"},
    ("lora", 4): {"steps": 2000},
    # FLYP README.md:34; wise-ft src/args.py:96 (warm-up 500), finetune.py:89 (clip 1.0), finetune.py:119-120 (last epoch)
    ("full", 16): {"optimizer": "adamw", "lr": 1e-5, "weight_decay": 0.1, "epochs": 10, "warmup_steps": 500,
                   "max_grad_norm": 1.0, "aug_crop_scale": [0.9, 1.0], "aug_hflip": False, "select": "last"},
}


@pytest.mark.parametrize("method,shots", sorted(ORIGINAL))
def test_defaults_equal_the_original_config(method, shots):
    defaults = method_class(method).training_defaults(shots)
    for key, value in ORIGINAL[(method, shots)].items():
        assert defaults.get(key) == value, f"{method} {shots} shots: {key} = {defaults.get(key)!r}, original {value!r}"


def test_methods_show_states_the_original_settings():
    runner = CliRunner()
    shown = {args: runner.invoke(cli, ["methods", "show", *args]).output
             for args in [("coop", "--shots", "2"), ("coop", "--shots", "8"), ("tip-adapter-f",), ("full",)]}
    assert "epochs: 100" in shown[("coop", "--shots", "2")] and "epochs: 200" in shown[("coop", "--shots", "8")]
    assert "adam_eps: 0.0001" in shown[("tip-adapter-f",)] and "weight_decay: 0.01" in shown[("tip-adapter-f",)]
    assert "warmup_steps: 500" in shown[("full",)] and "max_grad_norm: 1.0" in shown[("full",)]
    assert "differs from the original code" in shown[("coop", "--shots", "2")]


def _lrs(scheduler, optimizer, steps):
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_dassl_schedule_holds_the_lr_for_an_epoch_as_dassl_steps_it():
    # Dassl: ConstantWarmupScheduler(1 epoch at 1e-5) around CosineAnnealingLR(T_max=epochs), stepped after each epoch
    base, epochs, per_epoch = 0.002, 5, 3
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    scheduler = cosine_with_warmup(optimizer, 0, epochs * per_epoch, constant_steps=per_epoch, constant_factor=1e-5 / base,
                                   steps_per_epoch=per_epoch)
    lrs = _lrs(scheduler, optimizer, epochs * per_epoch)
    expected = [1e-5] + [base * 0.5 * (1 + math.cos(math.pi * (e - 1) / epochs)) for e in range(1, epochs)]
    for epoch in range(epochs):
        assert lrs[epoch * per_epoch: (epoch + 1) * per_epoch] == pytest.approx([expected[epoch]] * per_epoch, rel=1e-9)

    # torch's own CosineAnnealingLR stepped per epoch gives the same numbers
    reference = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(reference, T_max=epochs)
    for epoch in range(1, epochs):
        assert expected[epoch] == pytest.approx(reference.param_groups[0]["lr"], rel=1e-9)
        cosine.step()


def test_cosine_floor_is_cosine_annealing_eta_min_and_warmup_reaches_the_lr():
    base, total = 2e-4, 10
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=base)
    lrs = _lrs(cosine_with_warmup(optimizer, 0, total, min_factor=1e-6 / base), optimizer, total)
    reference = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=base)
    annealing = torch.optim.lr_scheduler.CosineAnnealingLR(reference, T_max=total, eta_min=1e-6)
    assert lrs == pytest.approx(_lrs(annealing, reference, total), rel=1e-9)
    # wise-ft src/models/utils.py:15-16: base * (step + 1) / warmup_length
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    assert _lrs(cosine_with_warmup(optimizer, 4, 20), optimizer, 4) == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert warmup_length(RunConfig(warmup_steps=500), 50) == 10 and warmup_length(RunConfig(warmup_steps=500), 10_000) == 500


def test_drop_last_drops_a_partial_batch_as_dassl_does():
    config = RunConfig(batch_size=32, drop_last=True)
    assert batches_per_epoch(config, 100) == 3 and updates_per_epoch(config, 100) == 3
    assert batches_per_epoch(config, 20) == 1  # fewer images than a batch: Dassl keeps them (len >= batch_size fails)
    assert batches_per_epoch(RunConfig(batch_size=32), 100) == 4
    assert training_length(RunConfig(batch_size=32, drop_last=True, epochs=2), 100) == (2, 3, 6)


def test_a_dassl_method_trains_on_whole_batches_only(tiny_config, split_data, tmp_path):
    import json

    out = tmp_path / "coop"
    result = CliRunner().invoke(cli, ["finetune", "--model-config", tiny_config, "--data", str(split_data), "--method", "coop",
                                      "--n-ctx", "2", "--epochs", "2", "--batch-size", "4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    n = metrics["train"]["n"]
    assert metrics["train"]["images_seen"] == 2 * (n // 4) * 4  # the last partial batch of each epoch is dropped
