"""Learning-rate schedule: linear warmup from 0, then cosine (or constant) to `min_lr` at `steps`."""

from __future__ import annotations

import math

import torch

from moe_dist.train.config import TrainSection


def lr_at(step: int, train: TrainSection) -> float:
    """Learning rate of optimizer step `step` (0-based: the first step uses lr_at(0))."""
    if train.warmup_steps and step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    if train.lr_decay == "constant":
        return train.lr
    decay_steps = max(1, train.steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / decay_steps)
    return train.min_lr + (train.lr - train.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_lr_scheduler(optimizer: torch.optim.Optimizer, train: TrainSection) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR (its state_dict is its step count, saved by the engine's checkpoints)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, train) / train.lr)
