"""The MoE layer's host-sync budget at EP 2 on gloo (issue 21): one read per layer forward (the
split sizes the uneven all-to-all needs, send and receive counts in one read), none in the
backward (the all-to-all's backward reuses the splits it saved), with a receive budget too. EP 1:
tests/unit/moe/test_host_sync.py."""

from __future__ import annotations

import pytest
import torch
from tests.harness.dist import run_distributed
from tests.harness.host_sync import census_of_layer_step

from moe_dist.moe.config import MoEConfig
from moe_dist.moe.layer import MoELayer
from moe_dist.parallel.groups import ParallelGroups

CASES = [dict(capacity_factor=1.0, min_capacity=1, router={"type": "topk"}),
         dict(dropless=True, router={"type": "inhibition", "mode": "divisive"}),
         dict(dropless=True, router={"type": "fixed_projection", "center": True}),
         # The receive budget: spill reads nothing of its own; error's overflow report rides on the
         # split read (cf 2: the budget holds every pair, so the forward goes on).
         dict(dropless=True, router={"type": "topk"}, rank_capacity_factor=1.0, overflow="spill"),
         dict(dropless=True, router={"type": "topk"}, rank_capacity_factor=2.0, overflow="error")]


def _worker(rank: int, world: int) -> None:
    groups = ParallelGroups.build(2, 8)
    for case in CASES:
        cfg = MoEConfig.from_dict(dict(d_model=64, d_ff=128, num_experts=8, top_k=2, ep_size=2,
                                       expert_impl="grouped_mm", aux_loss=dict(switch=0.01, importance=0.01),
                                       **case))
        layer = MoELayer(cfg, seed=0, groups=groups).to(torch.bfloat16)
        torch.manual_seed(rank)
        x = torch.randn(32, 64, dtype=torch.bfloat16, requires_grad=True)
        out, forward, backward = census_of_layer_step(layer, x)
        assert x.grad is not None and layer.experts.w_in_EDI.grad is not None
        what = f"rank {rank} {case}"
        assert forward.count == 1, f"forward {what}:\n{forward.report()}"
        assert forward.kinds["tolist"] == 1 and all("moe/dispatch.py" in w for w in forward.where), what
        assert backward.count == 0, f"backward {what}:\n{backward.report()}"


@pytest.mark.parametrize("world", [2])
def test_ep2_reads_the_split_sizes_once_per_forward(world):
    run_distributed(_worker, world)
