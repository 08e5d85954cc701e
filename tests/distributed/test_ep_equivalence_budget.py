"""The bounded dispatch (moe.rank_capacity_factor, moe/rank_budget.py) under expert parallelism on
CPU/gloo: under budget it is today's dispatch (the EP run equals the single-process reference
without a budget, and counts nothing over budget); over budget each policy equals the
single-process reference that budgets each capacity group per destination rank (`budget_ranks`):
outputs, losses, budget counts, every gradient and one AdamW step. `error` stops every rank in
the same forward, naming the overflow, instead of leaving ranks in an all-to-all.
"""

from __future__ import annotations

import pytest
import torch
from tests.harness.dist import assert_grads_and_adamw_step_match, run_distributed, shard

from moe_dist.moe.config import MoEConfig
from moe_dist.moe.layer import MoELayer, MoESideInputs
from moe_dist.moe.rank_budget import BudgetOverflowError
from moe_dist.parallel.grads import reduce_gradients
from moe_dist.parallel.groups import ParallelGroups

TOKENS_PER_RANK, D_MODEL, D_FF, NUM_EXPERTS, SEED = 24, 16, 64, 8, 11
TOL = dict(rtol=2e-5, atol=2e-6)
BUDGET_COUNTS = ("pairs_over_budget", "pairs_spilled", "pairs_budget_dropped")
# Bias balancing's selection bias, set high for expert 1, makes every token's first choice one
# expert: the hot expert that overflows its rank's budget.
HOT_ROUTER = {"type": "topk", "bias_balancing": True}
CASES = [
    # Under budget (cf 2: twice the fair share, above any route these seeds make).
    dict(dropless=True, rank_capacity_factor=2.0, overflow="spill", hot=False),
    dict(capacity_factor=1.0, min_capacity=1, rank_capacity_factor=2.0, overflow="drop", hot=False),
    # Over budget.
    dict(dropless=True, rank_capacity_factor=1.0, overflow="drop", hot=True),
    dict(dropless=True, rank_capacity_factor=1.0, overflow="spill", hot=True),
    dict(dropless=True, rank_capacity_factor=1.0, overflow="spill", spill_choices=1, hot=True),
    dict(capacity_factor=2.0, min_capacity=1, drop_policy="probs", rank_capacity_factor=0.75, overflow="spill",
         spill_choices=3, hot=True),
]


def make_layer(ep_size: int, case: dict, groups: ParallelGroups | None = None) -> MoELayer:
    fields = {k: v for k, v in case.items() if k != "hot"}
    cfg = MoEConfig.from_dict(dict(d_model=D_MODEL, d_ff=D_FF, num_experts=NUM_EXPERTS, top_k=2, ep_size=ep_size,
                                   router=HOT_ROUTER, aux_loss=dict(switch=0.1, z_loss=0.01, importance=0.1),
                                   **fields))
    layer = MoELayer(cfg, seed=SEED, groups=groups)
    if case["hot"]:
        with torch.no_grad():
            layer.router.selection_bias_E[1] = 1.0
    return layer


def check_budget_equivalence(rank: int, world: int, groups: ParallelGroups, case: dict) -> None:
    torch.manual_seed(1234)
    x = torch.randn(world * TOKENS_PER_RANK, D_MODEL)
    G = torch.randn(world * TOKENS_PER_RANK, D_MODEL)
    what = f"rank {rank} world {world} ep {groups.ep_size} {case}"
    hot = case["hot"]
    # Under budget the reference has no budget at all: today's dispatch.
    ref_case = case if hot else {k: v for k, v in case.items() if k not in ("rank_capacity_factor", "overflow")}
    ref = make_layer(1, {**ref_case, "hot": hot})
    x_ref = x.clone().requires_grad_()
    out_ref = ref(x_ref, MoESideInputs(capacity_groups=world, budget_ranks=groups.ep_size))
    ((out_ref.y * G).sum() / world + out_ref.aux_loss).backward()

    layer = make_layer(groups.ep_size, case, groups)
    x_r = shard(x, rank, world).clone().requires_grad_()
    out = layer(x_r)
    loss = (out.y * shard(G, rank, world)).sum() + out.aux_loss
    loss.backward()
    reduce_gradients(layer, groups)

    over = groups.all_reduce_sum_dp(out.stats["pairs_over_budget"].clone())
    assert (float(over) > 0) == hot, f"the case must overflow (and only then): {over} {what}"
    if hot:
        for name in BUDGET_COUNTS:
            torch.testing.assert_close(groups.all_reduce_sum_dp(out.stats[name].clone()), out_ref.stats[name],
                                       msg=lambda m: f"{name} {what}: {m}")
        if case["overflow"] == "spill":
            assert float(out_ref.stats["pairs_spilled"]) > 0, what
    for name in ("tokens_per_expert", "tokens_per_expert_kept"):
        torch.testing.assert_close(groups.all_reduce_sum_dp(out.stats[name].clone()), out_ref.stats[name],
                                   msg=lambda m: f"{name} {what}: {m}")
    torch.testing.assert_close(out.y, shard(out_ref.y, rank, world), **TOL, msg=lambda m: f"output {what}: {m}")
    for name, value in out.losses.items():
        torch.testing.assert_close(groups.all_reduce_sum_dp(value.detach()) / world, out_ref.losses[name].detach(),
                                   **TOL, msg=lambda m: f"aux loss {name} {what}: {m}")
    torch.testing.assert_close(x_r.grad / world, shard(x_ref.grad, rank, world), **TOL)
    lo, hi = layer.first_expert, layer.first_expert + layer.cfg.num_local_experts

    def ref_slice(name: str, t: torch.Tensor) -> torch.Tensor:
        return t[lo:hi] if name.startswith("experts.") else t

    assert_grads_and_adamw_step_match(layer, ref, ref_slice, what, **TOL)


def _worker(rank: int, world: int, ep_size: int) -> None:
    groups = ParallelGroups.build(ep_size, NUM_EXPERTS)
    for case in CASES:
        check_budget_equivalence(rank, world, groups, case)


@pytest.mark.parametrize("world,ep_size", [(2, 2), (4, 4), (4, 2)])
def test_bounded_dispatch_matches_single_process(world, ep_size):
    run_distributed(_worker, world, ep_size)


def _error_worker(rank: int, world: int) -> None:
    groups = ParallelGroups.build(2, NUM_EXPERTS)
    layer = make_layer(2, dict(dropless=True, rank_capacity_factor=1.5, overflow="error", hot=False), groups)
    layer.layer_index = 3
    torch.manual_seed(rank)
    x = torch.randn(TOKENS_PER_RANK, D_MODEL)
    layer(x)  # budget ceil(1.5 * 24 * 2 / 2) = 36 rows: random routing stays under it
    if rank == 0:  # only rank 0's tokens turn hot: rank 1 has no overflow of its own, yet must stop too
        with torch.no_grad():
            layer.router.selection_bias_E[[5, 6]] = 10.0  # every token picks experts 5 and 6 (EP rank 1)
    with pytest.raises(BudgetOverflowError, match=r"MoE layer 3: EP rank 0 routed 48 rows to EP rank 1, over its "
                                                  r"receive budget of 36 rows .*expert 5 alone got 24 of them"):
        layer(x)


def test_error_stops_every_rank_in_the_same_forward():
    run_distributed(_error_worker, 2)
