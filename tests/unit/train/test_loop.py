"""Pure pieces of the trainer: LR schedule, routing-statistics accumulation, progress line,
checkpoint pointer, config overrides."""

from __future__ import annotations

import math

import pytest
import torch

from moe_dist.checkpoint.training.layout import read_latest
from moe_dist.common.atomic import write_text_atomic
from moe_dist.moe.stats import mutual_information
from moe_dist.train.config import TrainSection, apply_overrides
from moe_dist.train.moe_metrics import MoEStatsAccumulator, step_load
from moe_dist.train.progress import Progress, format_duration
from moe_dist.train.schedule import build_lr_scheduler, lr_at


def section(**kw) -> TrainSection:
    return TrainSection(**{**dict(steps=10, seq_len=8, micro_batch=1, deepspeed_config="x.json", lr=1.0,
                                  min_lr=0.1, warmup_steps=4), **kw})


def test_warmup_then_cosine():
    t = section()
    assert [lr_at(s, t) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, t) == pytest.approx(1.0)
    assert lr_at(7, t) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(10, t) == pytest.approx(0.1)
    assert lr_at(50, t) == pytest.approx(0.1)  # past the end: stays at min_lr
    assert lr_at(6, section(lr_decay="constant")) == 1.0


def test_scheduler_steps_through_lr_at():
    t = section()
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=t.lr)
    sched = build_lr_scheduler(opt, t)
    seen = []
    for _ in range(10):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([lr_at(s, t) for s in range(10)])


def stats(load, kept, joint=None, h=0.5, switch=1.0):
    out = {"tokens_per_expert": torch.tensor(load, dtype=torch.float32),
           "tokens_per_expert_kept": torch.tensor(kept, dtype=torch.float32),
           "entropy_token": torch.tensor(h), "entropy_mean": torch.tensor(1.0), "loss_switch": torch.tensor(switch)}
    if joint is not None:
        out["expert_label_counts"] = torch.tensor(joint, dtype=torch.float32)
    return out


def test_accumulator_sums_counts_and_recomputes_ratios():
    acc = MoEStatsAccumulator()
    acc.add({1: stats([4, 0], [2, 0], [[4, 0], [0, 0]], h=0.2, switch=1.0)})
    acc.add({1: stats([0, 12], [0, 12], [[0, 0], [0, 12]], h=0.4, switch=2.0)})
    row = acc.summary()[1]
    torch.testing.assert_close(row["load_E"], torch.tensor([4.0, 12.0]))
    assert row["dropped_fraction"] == pytest.approx(2 / 16)  # pooled, not the mean of 0.5 and 0
    assert row["load_cv"] == pytest.approx(4 / 8)
    assert row["load_max_over_mean"] == pytest.approx(12 / 8)
    assert row["entropy_token"] == pytest.approx(0.3)
    assert row["loss_switch"] == pytest.approx(1.5)
    mi, mi_norm = mutual_information(torch.tensor([[4.0, 0.0], [0.0, 12.0]]))
    assert row["mi_domain"] == pytest.approx(float(mi))
    assert row["mi_domain_normalized"] == pytest.approx(1.0)  # experts determine the domain
    acc.reset()
    assert acc.summary() == {}


def test_step_load_sums_micro_batches():
    load = step_load([{3: stats([1, 2], [1, 2])}, {3: stats([5, 0], [5, 0])}])
    torch.testing.assert_close(load[3], torch.tensor([6.0, 2.0]))


def test_progress_line():
    p = Progress(total_steps=100, tokens_per_step=1000)
    tokens_per_s, sec_per_step = p.interval(10)
    assert tokens_per_s > 0 and sec_per_step > 0
    line = p.line(10, 2.5, 1e-3, 0.5, 12345.0, 2.0)
    assert line == ("step 10/100 | loss 2.5000 | lr 1.000e-03 | grad norm 0.500 | 12,345 tokens/s | 2.00 s/step "
                    "| ETA 3m00s")
    assert format_duration(3725) == "1h02m05s"


def test_latest_pointer(tmp_path):
    assert read_latest(str(tmp_path)) is None
    write_text_atomic(str(tmp_path / "latest"), "step_00000003")
    assert read_latest(str(tmp_path)) == "step_00000003"
    assert [p.name for p in tmp_path.iterdir()] == ["latest"]  # no temporary file left behind


def test_overrides():
    raw = {"train": {"steps": 5}}
    out = apply_overrides(raw, ["train.steps=7", "train.lr=1e-3", "moe.router.type=topk"])
    assert out == {"train": {"steps": 7, "lr": 1e-3}, "moe": {"router": {"type": "topk"}}}
    assert raw == {"train": {"steps": 5}}
