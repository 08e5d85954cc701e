"""Learning-rate schedule: linear warmup from 0, then cosine, linear, constant, or warmup-stable-decay
(WSD: `lr` until `steps - decay_steps`, then a `decay_shape` decay to `min_lr` at `steps`; Hägele et
al. 2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed Training Durations"). The formula:
docs/training.md, "Learning-rate schedules".

On `--resume` the schedule and optimizer settings of the config in force are the ones used from the
resumed step on (`ConfiguredSettings`): the checkpoint restores the scheduler's step count and the
Adam state, not its base LR, weight decay, betas or eps."""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from moe_dist.train.config import TrainSection


def decay_factor(shape: str, progress: float) -> float:
    """1 at the decay's start (progress 0), 0 at its end (progress 1)."""
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if shape == "linear":
        return 1.0 - progress
    if shape == "1-sqrt":
        return 1.0 - math.sqrt(progress)
    raise ValueError(f"unknown decay shape {shape!r}")


def lr_at(step: int, train: TrainSection) -> float:
    """Learning rate of optimizer step `step` (0-based: the first step uses lr_at(0))."""
    if train.warmup_steps and step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    if train.lr_decay == "constant":
        return train.lr
    if train.lr_decay == "wsd":
        decay_start = train.steps - train.decay_steps
        if step < decay_start:
            return train.lr
        start, length, shape = decay_start, train.decay_steps, train.decay_shape or "1-sqrt"
    else:  # cosine or linear: the whole run after the warmup decays
        start, length, shape = train.warmup_steps, max(1, train.steps - train.warmup_steps), train.lr_decay
    progress = min(1.0, (step - start) / length)
    return train.min_lr + (train.lr - train.min_lr) * decay_factor(shape, progress)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, train: TrainSection) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR (its state_dict is its step count, saved by the engine's checkpoints)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, train) / train.lr)


# What the config sets in each optimizer group (DeepSpeed's load replaces them with the
# checkpoint's), and the train keys they and the schedule come from.
GROUP_SETTINGS = ("initial_lr", "weight_decay", "betas", "eps")
SCHEDULE_KEYS = ("lr", "min_lr", "warmup_steps", "lr_decay", "decay_steps", "decay_shape", "steps", "weight_decay",
                 "adam_betas", "adam_eps")


@dataclass
class ConfiguredSettings:
    """The optimizer groups' settings and the scheduler's base LRs as this run's config built them,
    taken before a checkpoint is loaded over them."""

    groups: list[dict[str, Any]]
    base_lrs: list[float]

    @classmethod
    def take(cls, optimizer: torch.optim.Optimizer, scheduler) -> "ConfiguredSettings":
        return cls(groups=[{k: copy.deepcopy(g[k]) for k in GROUP_SETTINGS if k in g} for g in optimizer.param_groups],
                   base_lrs=list(scheduler.base_lrs))

    def apply(self, optimizer: torch.optim.Optimizer, scheduler, step: int, train: TrainSection) -> None:
        """After the load: the restored state (Adam moments, the scheduler's step count) stays, the
        base values are this config's again. The scheduler's restored base LRs would otherwise
        scale this config's schedule by old lr / new lr from the next step on."""
        if len(self.groups) != len(optimizer.param_groups):
            raise RuntimeError(f"the optimizer has {len(optimizer.param_groups)} parameter groups after the "
                               f"checkpoint load, {len(self.groups)} before it")
        scheduler.base_lrs = list(self.base_lrs)
        for group, settings in zip(optimizer.param_groups, self.groups):
            group.update(copy.deepcopy(settings))
            group["lr"] = lr_at(step, train)
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def schedule_changes(stored_train: dict[str, Any], train: TrainSection) -> list[str]:
    """'train.lr: 0.003 -> 0.001' for each LR, schedule or optimizer setting of `train` that differs
    from the stored config's train section (keys the stored one lacks are not compared)."""
    changes = []
    for key in SCHEDULE_KEYS:
        if key in stored_train and stored_train[key] != getattr(train, key):
            changes.append(f"train.{key}: {stored_train[key]!r} -> {getattr(train, key)!r}")
    return changes


# The train keys lr_at reads: a resume that changes one of them moves the learning rate.
LR_KEYS = ("lr", "min_lr", "warmup_steps", "lr_decay", "decay_steps", "decay_shape", "steps")


def resume_lr_change(stored_train: dict[str, Any], train: TrainSection, step: int) -> str | None:
    """'learning rate at step 201: 3.00e-04 -> 4.90e-04 ...' when the stored config's schedule and
    this config's give the next step (0-based `step`) different rates (e.g. train.steps raised to
    extend a cosine run moves it up); None when they agree or the stored one cannot be rebuilt."""
    stored = {k: stored_train[k] for k in LR_KEYS if k in stored_train}
    try:
        old = dataclasses.replace(train, **stored)
    except (TypeError, ValueError):  # a stored value this version no longer accepts: nothing to compare
        return None
    before, after = lr_at(step, old), lr_at(step, train)
    if math.isclose(before, after, rel_tol=1e-9, abs_tol=0.0):
        return None
    return (f"learning rate at step {step + 1}: {before:.3e} -> {after:.3e} (the checkpoint's schedule -> this "
            f"config's)")
