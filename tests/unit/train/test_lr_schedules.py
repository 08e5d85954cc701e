"""The linear and warmup-stable-decay (WSD) schedules follow the formula of docs/training.md,
"Learning-rate schedules", step by step, through the LambdaLR the engine steps; and their settings
are checked when the config is parsed."""

from __future__ import annotations

import math

import pytest
import torch

from moe_dist.common.config import ConfigError
from moe_dist.train.config import TrainSection
from moe_dist.train.schedule import build_lr_scheduler, lr_at, schedule_changes


def section(**kw) -> TrainSection:
    return TrainSection(**{**dict(steps=12, seq_len=8, micro_batch=1, deepspeed_config="x.json", lr=1.0,
                                  min_lr=0.1, warmup_steps=2), **kw})


def stepped(t: TrainSection, steps: int) -> list[float]:
    """The LR each optimizer step runs at, as the engine's scheduler gives it."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=t.lr)
    sched = build_lr_scheduler(opt, t)
    seen = []
    for _ in range(steps):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return seen


def documented(step: int, *, lr, min_lr, warmup, steps, decay_steps, shape) -> float:
    """docs/training.md: warmup lr*(s+1)/W; stable lr; from S = steps - decay_steps,
    p = min(1, (s - S) / decay_steps), lr_s = min_lr + (lr - min_lr) * f(p)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    start = steps - decay_steps
    if step < start:
        return lr
    p = min(1.0, (step - start) / decay_steps)
    f = {"1-sqrt": 1 - math.sqrt(p), "linear": 1 - p, "cosine": 0.5 * (1 + math.cos(math.pi * p))}[shape]
    return min_lr + (lr - min_lr) * f


@pytest.mark.parametrize("shape", [None, "1-sqrt", "linear", "cosine"])
def test_wsd_follows_the_documented_formula(shape):
    t = section(lr_decay="wsd", decay_steps=4, decay_shape=shape)
    expect = [documented(s, lr=1.0, min_lr=0.1, warmup=2, steps=12, decay_steps=4, shape=shape or "1-sqrt")
              for s in range(14)]
    assert stepped(t, 14) == pytest.approx(expect)
    # The phases by hand: warmup 0.5, 1; stable 1 through step 7; the decay from step 8.
    assert expect[:9] == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert expect[12] == pytest.approx(0.1) and expect[13] == pytest.approx(0.1)  # at and past steps


def test_wsd_one_minus_sqrt_by_hand():
    t = section(lr_decay="wsd", decay_steps=4, warmup_steps=0, min_lr=0.0)
    assert [lr_at(s, t) for s in range(8, 13)] == pytest.approx([1.0, 0.5, 1 - math.sqrt(0.5), 1 - math.sqrt(0.75),
                                                                   0.0])


def test_linear_decays_from_the_warmup_to_min_lr():
    t = section(lr_decay="linear")  # 10 decay steps after a warmup of 2
    assert stepped(t, 13) == pytest.approx([0.5, 1.0] + [0.1 + 0.9 * (1 - k / 10) for k in range(10)] + [0.1])


def test_a_branched_decay_equals_the_stable_run_up_to_its_start():
    """Branching a decay at step k from a run that stays stable longer: the branch's config
    (steps k + D, decay_steps D) gives the stable run's LRs up to k, then its own decay."""
    stable = section(lr_decay="wsd", steps=100, decay_steps=20)
    branch = section(lr_decay="wsd", steps=10, decay_steps=4)
    assert [lr_at(s, branch) for s in range(6)] == [lr_at(s, stable) for s in range(6)]
    assert lr_at(6, branch) == 1.0 and lr_at(7, branch) < 1.0
    assert schedule_changes({"steps": 100, "decay_steps": 20, "lr_decay": "wsd"}, branch) == [
        "train.decay_steps: 20 -> 4", "train.steps: 100 -> 10"]


@pytest.mark.parametrize("kw, message", [
    (dict(lr_decay="wsd"), "train.decay_steps must be set for train.lr_decay 'wsd'"),
    (dict(lr_decay="wsd", decay_steps=11), "train.decay_steps (11) must be <= train.steps - train.warmup_steps"),
    (dict(lr_decay="wsd", decay_steps=0), "train.decay_steps"),
    (dict(lr_decay="wsd", decay_steps=4, decay_shape="sqrt"), "train.decay_shape must be one of"),
    (dict(lr_decay="cosine", decay_steps=4), "train.decay_steps (4) applies only to train.lr_decay 'wsd'"),
    (dict(lr_decay="linear", decay_shape="cosine"), "train.decay_shape ('cosine') applies only"),
    (dict(lr_decay="step"), "train.lr_decay must be one of ['cosine', 'constant', 'linear', 'wsd']"),
])
def test_schedule_settings_are_checked(kw, message):
    with pytest.raises(ConfigError) as e:
        section(**kw)
    assert message in str(e.value)
