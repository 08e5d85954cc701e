"""The receive budget (moe/rank_budget.py) on hand-built routes: each overflow policy does what
docs/training.md ("Bounded dispatch") says, deterministically, and changes nothing under budget."""

from __future__ import annotations

import pytest
import torch

from moe_dist.common.config import ConfigError
from moe_dist.moe.capacity import assign_slots
from moe_dist.moe.config import MoEConfig
from moe_dist.moe.layer import MoELayer, MoESideInputs
from moe_dist.moe.rank_budget import BudgetOverflowError, apply_rank_budget, overflow_report, rank_budget
from moe_dist.moe.stats import budget_statistics

# 4 tokens, K 2, E 4 over P 2 ranks: experts 0, 1 on rank 0 and 2, 3 on rank 1. Rank 0 is asked
# for 5 pairs (weights .5 .3 .4 .6 .2), rank 1 for 3.
IDX = torch.tensor([[0, 1], [0, 2], [1, 0], [3, 2]])
W = torch.tensor([[.5, .3], [.4, .35], [.6, .2], [.45, .3]])
PROBS = torch.tensor([[.5, .3, .15, .05], [.4, .1, .35, .15], [.2, .6, .05, .15], [.1, .15, .3, .45]])


def budgeted(budget: int, policy: str, idx=IDX, w=W, probs=PROBS, capacity=None, **kw):
    plan = assign_slots(idx, 4, capacity)
    return apply_rank_budget(idx, w, plan, num_experts=4, ranks=2, budget=budget, policy=policy, probs_TE=probs,
                             **kw)


def test_budget_is_the_factor_times_the_fair_share_per_destination_rank():
    assert rank_budget(24, 2, 2, 1.0) == 24
    assert rank_budget(24, 2, 4, 1.25) == 15  # ceil(1.25 * 48 / 4)
    assert rank_budget(3, 1, 8, 0.1) == 1  # never 0: every rank may receive a row
    assert rank_budget(24, 2, 2, 0.0) is None


@pytest.mark.parametrize("policy", ["drop", "spill", "error"])
def test_under_budget_nothing_changes(policy):
    plan = assign_slots(IDX, 4, None)
    out = budgeted(5, policy)
    assert torch.equal(out.idx_TK, IDX) and torch.equal(out.w_TK, W)
    assert torch.equal(out.plan.keep_TK, plan.keep_TK) and torch.equal(out.plan.kept_E, plan.kept_E)
    assert torch.equal(out.plan.slot_TK, plan.slot_TK)
    assert not out.plan.spilled_TK.any() and not out.over_budget_TK.any()


def test_drop_keeps_the_highest_weights_of_each_destination():
    out = budgeted(3, "drop")
    # Rank 0 keeps .6, .5, .4 and drops .3 (token 0's second choice) and .2 (token 2's).
    over = torch.tensor([[False, True], [False, False], [False, True], [False, False]])
    assert torch.equal(out.over_budget_TK, over)
    assert torch.equal(out.plan.keep_TK, ~over)
    assert not out.plan.spilled_TK.any()
    assert torch.equal(out.idx_TK, IDX) and torch.equal(out.w_TK, W)
    assert out.plan.kept_E.tolist() == [2, 1, 2, 1]
    assert {k: float(v) for k, v in budget_statistics(out.over_budget_TK, out.plan.spilled_TK).items()} == {
        "pairs_over_budget": 2.0, "pairs_spilled": 0.0, "pairs_budget_dropped": 2.0}


def test_drop_breaks_weight_ties_by_position():
    # Every weight equal: the pairs' order q = k*T + t decides, first choices before second ones.
    out = budgeted(3, "drop", w=torch.ones(4, 2))
    # Rank 0's pairs in position order: (t0,k0) (t1,k0) (t2,k0) (t0,k1) (t2,k1): the last two drop.
    assert out.over_budget_TK.nonzero().tolist() == [[0, 1], [2, 1]]


def test_pairs_without_an_expert_slot_do_not_use_the_budget():
    # Capacity 1 per expert: expert 0 keeps token 0 only, so rank 0 is asked for 2 kept pairs.
    out = budgeted(2, "drop", capacity=1)
    assert not out.over_budget_TK.any()
    assert torch.equal(out.plan.keep_TK, assign_slots(IDX, 4, 1).keep_TK)


def test_spill_moves_to_the_next_ranked_expert_with_room_and_renormalises():
    out = budgeted(4, "spill")
    # Rank 0 (5 asked, budget 4) is over by token 2's second choice (expert 0, w .2). Token 2's
    # unchosen experts by probability: 3 (.15), then 2 (.05); rank 1 has one row of room.
    assert out.over_budget_TK.nonzero().tolist() == [[2, 1]]
    assert out.plan.spilled_TK.nonzero().tolist() == [[2, 1]]
    assert out.plan.keep_TK.all()
    assert out.idx_TK.tolist() == [[0, 1], [0, 2], [1, 3], [3, 2]]
    # The spilled pair takes probs[2, 3] = .15; the token's weights are rescaled to their old sum .8.
    torch.testing.assert_close(out.w_TK[2], torch.tensor([.6, .15]) * (.8 / .75))
    assert torch.equal(out.w_TK[[0, 1, 3]], W[[0, 1, 3]])  # other tokens bit for bit
    assert out.plan.kept_E.tolist() == [2, 2, 2, 2]
    assert out.plan.slot_TK[2, 1] == 1  # after token 3's pair at expert 3
    stats = budget_statistics(out.over_budget_TK, out.plan.spilled_TK)
    assert (float(stats["pairs_spilled"]), float(stats["pairs_budget_dropped"])) == (1.0, 0.0)


def test_spill_drops_a_pair_that_finds_no_room():
    out = budgeted(3, "spill")  # rank 1 is full (3 of 3): neither of rank 0's two extra pairs moves
    assert out.over_budget_TK.sum() == 2
    assert not out.plan.spilled_TK.any()
    assert torch.equal(out.plan.keep_TK, ~out.over_budget_TK)
    assert torch.equal(out.w_TK, W)


def test_spill_respects_expert_capacity_the_budget_and_the_number_of_choices():
    # E 6 over 2 ranks (0-2 | 3-5), capacity 2, budget 5. Rank 0 is asked for 6 pairs: token 1's
    # .2 is over. Its unchosen experts by probability: 3 (full: capacity 2), 2 (rank 0: no
    # budget left), 4 (rank 1 has room 1, expert 4 a free slot).
    idx = torch.tensor([[0, 1], [0, 1], [2, 3], [3, 4], [2, 5]])
    w = torch.tensor([[.5, .3], [.4, .2], [.6, .35], [.5, .4], [.45, .3]])
    probs = torch.full((5, 6), .01)
    probs[1, [3, 2, 4]] = torch.tensor([.3, .2, .15])
    plan = assign_slots(idx, 6, 2)
    assert plan.keep_TK.all()
    kw = dict(num_experts=6, ranks=2, budget=5, policy="spill", probs_TE=probs)
    two = apply_rank_budget(idx, w, plan, spill_choices=2, **kw)
    assert two.over_budget_TK.nonzero().tolist() == [[1, 1]]
    assert not two.plan.spilled_TK.any() and not two.plan.keep_TK[1, 1]
    three = apply_rank_budget(idx, w, plan, spill_choices=3, **kw)
    assert three.plan.spilled_TK.nonzero().tolist() == [[1, 1]] and three.plan.keep_TK.all()
    assert three.idx_TK[1].tolist() == [0, 4]
    assert three.plan.kept_E.tolist() == [2, 1, 2, 2, 2, 1]
    torch.testing.assert_close(three.w_TK[1], torch.tensor([.4, .15]) * (.6 / .55))


def test_spill_offers_go_to_the_heaviest_waiting_pair_ties_by_token():
    # Rank 0 is asked for 6 pairs (budget 3): over are token 0's .3, token 2's .2 and token 3's
    # .3. All three offer a rank-1 expert first; rank 1 has one row of room: the heavier .3s
    # win over .2 and, tied, token 0 over token 3.
    idx = torch.tensor([[0, 1], [0, 2], [1, 0], [3, 1]])
    w = torch.tensor([[.5, .3], [.4, .35], [.6, .2], [.45, .3]])
    probs = PROBS.clone()
    probs[3] = torch.tensor([.1, .15, .3, .45])
    out = budgeted(3, "spill", idx=idx, w=w, probs=probs, spill_choices=2)
    assert out.over_budget_TK.nonzero().tolist() == [[0, 1], [2, 1], [3, 1]]
    assert out.plan.spilled_TK.nonzero().tolist() == [[0, 1]]
    assert out.idx_TK[0].tolist() == [0, 2]
    assert out.plan.keep_TK.sum() == 6


def test_spill_gives_each_waiting_pair_of_a_token_its_own_expert():
    # Both of token 1's pairs are over rank 0's budget of 2; rank 1 is empty. Round 1 moves its
    # first choice to its best unchosen expert (3), round 2 its second choice to the next (2).
    idx = torch.tensor([[0, 1], [0, 1]])
    w = torch.tensor([[.5, .4], [.3, .2]])
    probs = torch.tensor([[.5, .4, .05, .05], [.3, .2, .1, .4]])
    out = budgeted(2, "spill", idx=idx, w=w, probs=probs, spill_choices=2)
    assert out.over_budget_TK.tolist() == [[False, False], [True, True]]
    assert out.plan.spilled_TK.tolist() == [[False, False], [True, True]]
    assert out.idx_TK.tolist() == [[0, 1], [3, 2]]
    torch.testing.assert_close(out.w_TK[1], torch.tensor([.4, .1]))  # sum .5 before and after
    one = budgeted(2, "spill", idx=idx, w=w, probs=probs, spill_choices=1)
    assert one.plan.spilled_TK.tolist() == [[False, False], [True, False]]  # one round: one pair


def test_spill_is_deterministic_and_differentiable():
    torch.manual_seed(0)
    T, E, K = 64, 8, 2
    logits = torch.randn(T, E, requires_grad=True)
    probs = torch.softmax(logits, -1)
    w, idx = torch.topk(probs, K)
    plan = assign_slots(idx, E, None)
    runs = [apply_rank_budget(idx, w, plan, num_experts=E, ranks=4, budget=14, policy="spill", probs_TE=probs,
                              spill_choices=3, num_groups=2) for _ in range(2)]
    assert runs[0].plan.spilled_TK.any() and runs[0].over_budget_TK.sum() > runs[0].plan.spilled_TK.sum()
    for a, b in zip(runs[0].__dict__.values(), runs[1].__dict__.values()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)
    for name in ("slot_TK", "keep_TK", "kept_E", "spilled_TK"):
        assert torch.equal(getattr(runs[0].plan, name), getattr(runs[1].plan, name))
    out = runs[0]
    # Every (group, destination rank) receives at most the budget; no token holds an expert twice.
    group = (torch.arange(T) // (T // 2))[:, None].expand(T, K)
    cell = (group * 4 + out.idx_TK // 2)[out.plan.keep_TK]
    assert torch.bincount(cell, minlength=8).max() <= 14
    assert (out.idx_TK[:, 0] != out.idx_TK[:, 1]).all()
    # The token's weights sum as the router's did; the gradient reaches the spilled pair's score.
    torch.testing.assert_close(out.w_TK.sum(1), w.sum(1))
    t, k = out.plan.spilled_TK.nonzero()[0].tolist()
    out.w_TK[t, k].backward()
    assert logits.grad[t].abs().sum() > 0


def test_overflow_report_names_the_most_asked_rank_and_its_hottest_expert():
    plan = assign_slots(IDX, 4, None)
    assert overflow_report(IDX, plan.keep_TK, 4, 2).tolist() == [[5, 0, 0, 3]]
    assert overflow_report(IDX, plan.keep_TK, 4, 2, num_groups=2).tolist() == [[3, 0, 0, 2], [2, 0, 0, 1]]


def layer_cfg(**kw) -> MoEConfig:
    return MoEConfig.from_dict(dict(d_model=16, d_ff=32, num_experts=8, top_k=2, dropless=True,
                                    aux_loss=dict(switch=0.01, z_loss=0.001), **kw))


def test_a_layer_under_budget_equals_the_unbounded_layer():
    torch.manual_seed(0)
    x, g = torch.randn(32, 16), torch.randn(32, 16)
    results = []
    for extra in ({}, dict(rank_capacity_factor=2.0, overflow="spill")):
        layer = MoELayer(layer_cfg(**extra), seed=3)
        xi = x.clone().requires_grad_()
        out = layer(xi)
        ((out.y * g).sum() + out.aux_loss).backward()
        results.append((out, xi.grad, [p.grad for p in layer.parameters()]))
    (a, ga, pa), (b, gb, pb) = results
    assert float(b.stats["pairs_over_budget"]) == 0.0
    assert torch.equal(a.y, b.y) and torch.equal(ga, gb)
    assert all(torch.equal(u, v) for u, v in zip(pa, pb))
    assert "pairs_over_budget" not in a.stats  # no budget, no budget counts


def test_a_hot_expert_is_bounded_counted_and_eval_is_unbounded():
    layer = MoELayer(layer_cfg(rank_capacity_factor=1.0, overflow="drop", router={"type": "topk", "bias_balancing": True}),
                     seed=3)
    with torch.no_grad():
        layer.router.selection_bias_E[0] = 10.0  # every token picks expert 0 first
    out = layer(torch.randn(32, 16), MoESideInputs(budget_ranks=4))
    # Budget ceil(1.0 * 32 * 2 / 4) = 16 rows per rank of 2 experts: rank 0 is asked for >= 32.
    over = float(out.stats["pairs_over_budget"])
    assert over >= 16 and float(out.stats["pairs_budget_dropped"]) == over
    assert float(out.stats["tokens_per_expert_kept"][:2].sum()) == 16
    layer.eval()
    assert "pairs_over_budget" not in layer(torch.randn(32, 16)).stats


def test_error_names_layer_rank_expert_and_load():
    layer = MoELayer(layer_cfg(rank_capacity_factor=1.0, overflow="error",
                               router={"type": "topk", "bias_balancing": True}), seed=3, layer_index=5)
    with torch.no_grad():
        layer.router.selection_bias_E[6] = 10.0
    layer(torch.randn(32, 16))  # one rank: the budget (64) holds every pair
    with pytest.raises(BudgetOverflowError, match=r"MoE layer 5: EP rank 0 routed \d+ rows to EP rank 3, over its "
                                                  r"receive budget of 8 rows .*expert 6 alone got 16 of them"):
        layer(torch.randn(32, 16), MoESideInputs(capacity_groups=2, budget_ranks=4))


def test_config_refuses_what_cannot_work():
    with pytest.raises(ConfigError, match="moe.overflow 'spill' needs a router.*'fixed_projection'"):
        layer_cfg(rank_capacity_factor=1.0, overflow="spill", router={"type": "fixed_projection"})
    layer_cfg(rank_capacity_factor=1.0, overflow="drop", router={"type": "fixed_projection"})
    with pytest.raises(ConfigError, match="moe.rank_capacity_factor must be a number >= 0.*-1"):
        layer_cfg(rank_capacity_factor=-1)
    with pytest.raises(ConfigError, match=r"moe.overflow must be one of \['drop', 'spill', 'error'\], got 'spil'"):
        layer_cfg(overflow="spil")
    with pytest.raises(ConfigError, match="moe.spill_choices must be an integer >= 1, got 0"):
        layer_cfg(spill_choices=0)
