"""Optimisers, learning-rate schedules and training lengths: what an epoch, a `--steps` budget and a warm-up mean
in optimizer updates, shared by every method."""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Optional

import torch

from cliptune.config.run import RunConfig
from cliptune.core.errors import CliptuneError

log = logging.getLogger("cliptune")


def build_optimizer(config: RunConfig, parameters):
    if not parameters:
        raise CliptuneError(f"method '{config.method}' has no trainable parameters")
    lr = config.lr
    if config.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=config.weight_decay, eps=config.adam_eps)
    if config.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.optimizer == "lion":
        from lion_pytorch import Lion

        return Lion(parameters, lr=lr, weight_decay=config.weight_decay)
    raise CliptuneError(f"unknown optimizer '{config.optimizer}' (available: adamw, sgd, lion)")


def cosine_with_warmup(optimizer, warmup_steps: int, total_steps: int, constant_steps: int = 0, constant_factor: float = 0.0,
                       min_factor: float = 0.0, steps_per_epoch: Optional[int] = None):
    """Cosine decay to `min_factor` x lr after a warm-up: `constant_steps` at `constant_factor` x lr (Dassl's
    WARMUP_TYPE constant), then `warmup_steps` of linear warm-up to the base lr, `(step + 1) / warmup_steps`
    as in wise-ft/FLYP/ZSCL `_warmup_lr` (src/models/utils.py:15-16).

    As in Dassl (ConstantWarmupScheduler around CosineAnnealingLR(T_max=max_epoch), WARMUP_RECOUNT), the
    cosine starts counting after the constant warm-up but keeps the whole budget as its period, so it
    does not quite reach zero when the constant warm-up is used. `steps_per_epoch` holds the lr for a whole
    epoch (Dassl steps its scheduler once per epoch: CoOp trainers/coop.py:281-282), so epoch e >= 1 trains at
    `lr * 0.5 * (1 + cos(pi * (e - 1) / epochs))`. `min_factor` is CosineAnnealingLR's `eta_min / lr`.
    """

    def factor(step: int) -> float:
        if steps_per_epoch:
            step -= step % steps_per_epoch
        if step < constant_steps:
            return constant_factor
        step -= constant_steps
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


WARMUP_SHARE = 0.2  # a linear warm-up never takes more than this share of the run's optimizer updates


def warmup_length(config: RunConfig, total_updates: int) -> int:
    """The run's linear warm-up: `config.warmup_steps`, capped at a fifth of the run (WiSE-FT's and FLYP's 500 steps
    are ~2 % of an ImageNet run; on a few-shot run of 50 updates they would never reach the lr)."""
    return min(config.warmup_steps, int(WARMUP_SHARE * total_updates))


def budget_lr_factor(config: RunConfig, updates_per_epoch: int) -> float:
    """How much a default lr is raised when `--steps` cuts the method's default budget.

    A step budget B below the method's default budget B0 (its default steps, or default epochs x
    updates per epoch) gets lr x min(10, sqrt(B0 / B)): fewer, larger steps, so that a CPU-sized
    budget still adapts (e.g. CLIP-LoRA's 2e-4 over 8000 steps becomes ~1.8e-3 over 100). Only when
    `config.scale_lr` (by default: the steps are yours, the lr is the method's default).
    """
    if not config.scale_lr or not config.steps:
        return 1.0
    from cliptune.methods import method_class

    defaults = method_class(config.method).training_defaults(config.shots)
    reference = defaults.get("steps") or defaults.get("epochs", RunConfig.epochs) * updates_per_epoch
    return min(10.0, math.sqrt(reference / config.steps)) if reference > config.steps else 1.0


def with_budget_lr(config: RunConfig, train_size: int) -> RunConfig:
    """The run's config with its lr final: raised by `budget_lr_factor` for a `--steps` budget on `train_size`
    images (`scale_lr` then off, so that the returned config is final and resolving it again changes nothing)."""
    factor = budget_lr_factor(config, updates_per_epoch(config, train_size))
    if factor == 1.0:
        return config
    lr = config.lr * factor
    log.info("lr %g (set by %s) raised to %g for the --steps budget (--set scale_lr=false keeps it)",
             config.lr, config.sources.get("lr", "engine defaults"), lr)
    resolved = dataclasses.replace(config, lr=lr, scale_lr=False)
    resolved.sources = {**config.sources, "lr": f"{config.sources.get('lr', 'engine defaults')}, raised for the --steps budget"}
    return resolved


def batches_per_epoch(config: RunConfig, train_size: int) -> int:
    """Micro-batches in one epoch; `drop_last` drops a last partial batch as Dassl's train loader does
    (`drop_last=is_train and len(data_source) >= batch_size`: dassl/data/data_manager.py:43)."""
    if config.drop_last and train_size >= config.batch_size:
        return train_size // config.batch_size
    return math.ceil(train_size / config.batch_size)


def updates_per_epoch(config: RunConfig, train_size: int) -> int:
    """Optimizer updates in one epoch: micro-batches grouped by gradient accumulation."""
    return math.ceil(batches_per_epoch(config, train_size) / config.grad_accum)


def training_length(config: RunConfig, train_size: int) -> tuple:
    """(epochs, micro-batches in the last epoch, optimizer updates in all) for `--epochs` or a `--steps` budget."""
    batches = batches_per_epoch(config, train_size)
    per_epoch = updates_per_epoch(config, train_size)
    if not config.steps:
        return config.epochs, batches, per_epoch * config.epochs
    epochs = math.ceil(config.steps / per_epoch)
    last_updates = config.steps - (epochs - 1) * per_epoch
    return epochs, min(batches, last_updates * config.grad_accum), config.steps


def build_schedule(config: RunConfig, optimizer, train_size: int):
    """The run's LambdaLR: Dassl's constant warm-up epochs (keeping their share of a `--steps` budget), the linear
    warm-up (capped by `warmup_length`), then cosine decay to `config.min_lr`; held per epoch with `lr_per_epoch`."""
    per_epoch = updates_per_epoch(config, train_size)
    _, _, total_updates = training_length(config, train_size)
    constant_steps = (round(config.steps * config.warmup_epochs / max(1, config.epochs)) if config.steps
                      else config.warmup_epochs * per_epoch)
    warmup = warmup_length(config, total_updates)
    if warmup < config.warmup_steps:
        log.info("warm-up of %d steps capped at %d, a fifth of the run's %d optimizer steps", config.warmup_steps, warmup,
                 total_updates)
    return cosine_with_warmup(optimizer, warmup, total_updates, constant_steps=constant_steps,
                              constant_factor=config.warmup_lr / config.lr, min_factor=min(1.0, config.min_lr / config.lr),
                              # a --steps budget has no epochs of the method's protocol to hold the lr for
                              steps_per_epoch=per_epoch if config.lr_per_epoch and not config.steps else None)
