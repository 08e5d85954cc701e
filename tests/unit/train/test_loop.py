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
from moe_dist.train.moe_metrics import MoEStatsAccumulator, budget_line, step_load, wants_step_load
from moe_dist.train.progress import Progress, format_duration
from moe_dist.train.schedule import ConfiguredSettings, build_lr_scheduler, lr_at, schedule_changes


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


def adamw(t: TrainSection, weight: torch.nn.Parameter):
    opt = torch.optim.AdamW([weight], lr=t.lr, weight_decay=t.weight_decay, betas=tuple(t.adam_betas), eps=t.adam_eps)
    return opt, build_lr_scheduler(opt, t)


def test_a_loaded_optimizer_and_scheduler_take_the_configured_values_back():
    """As on --resume: the checkpoint's Adam state and step count stay, its base LR, weight decay,
    betas and eps give way to this config's (a loaded LambdaLR keeps its old base LR otherwise)."""
    old_t = section(lr=3e-3, min_lr=0.0, warmup_steps=2)
    weight = torch.nn.Parameter(torch.ones(3))
    opt, sched = adamw(old_t, weight)
    for _ in range(3):
        weight.grad = torch.ones(3)
        opt.step()
        sched.step()
    new_t = section(lr=1e-3, min_lr=1e-4, warmup_steps=2, steps=20, weight_decay=0.01, adam_betas=[0.8, 0.9],
                    adam_eps=1e-6)
    new_opt, new_sched = adamw(new_t, weight)
    configured = ConfiguredSettings.take(new_opt, new_sched)
    new_opt.load_state_dict(opt.state_dict())
    new_sched.load_state_dict(sched.state_dict())
    assert new_sched.base_lrs == [3e-3]  # what the load alone leaves
    configured.apply(new_opt, new_sched, 3, new_t)
    seen = []
    for _ in range(4):
        group = new_opt.param_groups[0]
        seen.append(group["lr"])
        assert (group["weight_decay"], tuple(group["betas"]), group["eps"]) == (0.01, (0.8, 0.9), 1e-6)
        new_opt.step()
        new_sched.step()
    assert seen == pytest.approx([lr_at(s, new_t) for s in range(3, 7)])
    assert int(new_opt.state[weight]["step"]) == 7  # Adam's count continued from the checkpoint's 3
    stored = {"lr": 3e-3, "min_lr": 0.0, "warmup_steps": 2, "steps": 10, "lr_decay": "cosine", "weight_decay": 0.1,
              "adam_betas": [0.9, 0.95], "adam_eps": 1e-8}
    assert schedule_changes(stored, new_t) == [
        "train.lr: 0.003 -> 0.001", "train.min_lr: 0.0 -> 0.0001", "train.steps: 10 -> 20",
        "train.weight_decay: 0.1 -> 0.01", "train.adam_betas: [0.9, 0.95] -> [0.8, 0.9]",
        "train.adam_eps: 1e-08 -> 1e-06"]
    assert schedule_changes({"lr": 1e-3}, new_t) == []  # keys the stored config lacks are not compared


def stats(load, kept, joint=None, h_sum=0.5, switch=1.0, importance=None):
    """One micro batch of one layer in the layer's contract: this rank's own counts, plus the
    local ratios the accumulator must not average (they are recomputed from the sums)."""
    load_E = torch.tensor(load, dtype=torch.float32)
    tokens = float(sum(load)) / 2  # top-2
    out = {"tokens_per_expert": load_E, "tokens_per_expert_kept": torch.tensor(kept, dtype=torch.float32),
           "num_tokens": torch.tensor(tokens), "entropy_token_sum": torch.tensor(h_sum),
           "importance": torch.tensor(importance if importance is not None else [tokens / 2, tokens / 2]),
           "loss_switch": torch.tensor(switch),
           "dropped_fraction": torch.tensor(0.9), "load_cv": torch.tensor(9.0), "entropy_token": torch.tensor(9.0)}
    if joint is not None:
        out["expert_label_counts"] = torch.tensor(joint, dtype=torch.float32)
    return out


def entropy_of(p):
    return -sum(x * math.log(x) for x in p if x > 0)


def test_accumulator_sums_counts_and_recomputes_ratios():
    acc = MoEStatsAccumulator()
    acc.add({1: stats([4, 0], [2, 0], [[4, 0], [0, 0]], h_sum=0.2, switch=1.0, importance=[2.0, 0.0])})
    acc.add({1: stats([0, 12], [0, 12], [[0, 0], [0, 12]], h_sum=0.4, switch=2.0, importance=[1.0, 5.0])})
    row = acc.summary()[1]
    assert row["load_E"] == [4.0, 12.0]
    assert row["dropped_fraction"] == pytest.approx(2 / 16)  # pooled, not the mean of 0.5 and 0
    assert row["load_cv"] == pytest.approx(4 / 8)
    assert row["load_max_over_mean"] == pytest.approx(12 / 8)
    assert row["entropy_token"] == pytest.approx(0.6 / 8)  # sum of entropies over sum of tokens
    assert row["entropy_mean"] == pytest.approx(entropy_of([3 / 8, 5 / 8]))
    assert row["loss_switch"] == pytest.approx(1.5)
    mi, mi_norm = mutual_information(torch.tensor([[4.0, 0.0], [0.0, 12.0]], dtype=torch.float64))
    assert row["mi_domain"] == pytest.approx(float(mi))
    assert row["mi_domain_normalized"] == pytest.approx(1.0)  # experts determine the domain
    assert row["expert_label_counts"] == [[4.0, 0.0], [0.0, 12.0]]
    acc.reset()
    assert acc.summary() == {}


def test_accumulator_sums_over_ranks_in_one_packed_reduction():
    """Two ranks with their own counts: one all-reduce of one flat vector for both layers gives
    what one process holding all four micro batches logs (losses: mean over ranks and batches)."""
    ranks = [MoEStatsAccumulator(), MoEStatsAccumulator()]
    together = MoEStatsAccumulator()
    batches = [[stats([4, 0], [2, 0], [[4, 0], [0, 0]], h_sum=0.2, switch=1.0)],
               [stats([2, 6], [2, 6], [[0, 2], [0, 6]], h_sum=0.7, switch=3.0)]]
    for r, acc in enumerate(ranks):
        for b in batches[r] * 2:
            acc.add({1: b, 5: stats([1, 1], [1, 1], h_sum=0.1, switch=4.0)})
            together.add({1: b, 5: stats([1, 1], [1, 1], h_sum=0.1, switch=4.0)})
    calls = []

    def all_reduce_sum(t):
        calls.append(t.shape)
        return ranks[0].pack() + ranks[1].pack()

    rows = ranks[0].summary(all_reduce_sum, ranks=2)
    assert len(calls) == 1 and calls[0] == ranks[0].pack().shape  # every layer in one collective
    want = together.summary()
    for layer in (1, 5):
        for name, value in want[layer].items():
            if name.startswith("loss_"):
                continue
            if name == "expert_label_counts":
                assert rows[layer][name] == value
            else:
                assert rows[layer][name] == pytest.approx(value), (layer, name)
    # the mean of each rank's batches' losses, not of the summed losses over one rank's batches
    assert rows[1]["loss_switch"] == pytest.approx(2.0)
    assert rows[5]["loss_switch"] == pytest.approx(4.0)
    assert rows[1]["load_E"] == [12.0, 12.0]


def test_receive_budget_counts_are_summed_logged_and_absent_without_a_budget():
    acc = MoEStatsAccumulator()
    for over, spilled in ((5.0, 3.0), (2.0, 0.0)):
        budget = {"pairs_over_budget": torch.tensor(over), "pairs_spilled": torch.tensor(spilled),
                  "pairs_budget_dropped": torch.tensor(over - spilled)}
        acc.add({1: {**stats([4, 0], [4, 0]), **budget}, 3: stats([1, 1], [1, 1])})
    rows = acc.summary()
    assert (rows[1]["pairs_over_budget"], rows[1]["pairs_spilled"], rows[1]["pairs_budget_dropped"]) == (7, 3, 4)
    assert "pairs_over_budget" not in rows[3]
    assert budget_line(12, rows) == ("step 12 | receive budget, pairs over budget/spilled/dropped per MoE layer: "
                                     "1: 7/3/4")
    assert budget_line(12, {3: rows[3]}) is None


def test_a_layer_without_entropy_sums_has_its_ratio_averaged():
    acc = MoEStatsAccumulator()
    for h in (0.2, 0.4):
        acc.add({0: {"tokens_per_expert": torch.tensor([1.0, 1.0]), "tokens_per_expert_kept": torch.tensor([1.0, 1.0]),
                     "entropy_token": torch.tensor(h)}})
    assert acc.summary()[0]["entropy_token"] == pytest.approx(0.3)


def test_step_load_sums_micro_batches_and_ranks_in_one_collective():
    calls = []

    def all_reduce_sum(t):
        calls.append(t.clone())
        return t * 2  # a second rank with the same load

    load = step_load([{3: stats([1, 2], [1, 2]), 4: stats([0, 1], [0, 1])},
                      {3: stats([5, 0], [5, 0]), 4: stats([2, 2], [2, 2])}], all_reduce_sum)
    assert len(calls) == 1
    torch.testing.assert_close(load[3], torch.tensor([12.0, 4.0], dtype=torch.float64))
    torch.testing.assert_close(load[4], torch.tensor([4.0, 6.0], dtype=torch.float64))


def test_only_routers_whose_after_step_reads_the_load_want_the_step_load():
    from moe_dist.routing.base import Router
    from moe_dist.routing.registry import build_router, router_config_from_dict

    class Plain(Router):
        pass

    class Hooked(Router):
        def after_step(self, load_E):
            pass

    def router(**cfg):
        return build_router(router_config_from_dict(cfg), d_model=8, num_experts=4, top_k=2, layer_index=0)

    plain, hooked = Plain.__new__(Plain), Hooked.__new__(Hooked)
    assert not wants_step_load([plain, plain])
    assert wants_step_load([plain, hooked])
    # Top-k and fixed projection override after_step for bias balancing: a step pays for the load's
    # all-reduce only when it is on.
    assert not wants_step_load([router(type="topk"), router(type="fixed_projection")])
    assert wants_step_load([router(type="topk", bias_balancing=True)])
    assert wants_step_load([router(type="fixed_projection", bias_balancing=True)])


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
