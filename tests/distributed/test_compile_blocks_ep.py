"""`train.compile` with peers: at EP 2 on gloo the compiled blocks (the all-to-alls and the
global-count loss's all-reduce run eagerly between the compiled regions) compute what the eager
blocks compute: logits, losses and every gradient, two steps (the second on cached graphs)."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters
from tests.harness.compiled import assert_steps_match
from tests.harness.dist import run_distributed

from moe_dist.model.compile import compile_blocks
from moe_dist.model.config import parse_model_config
from moe_dist.model.transformer import MoETransformer
from moe_dist.parallel.groups import ParallelGroups

V, SEQ, E = 61, 8, 4


def _worker(rank: int, world: int) -> None:
    groups = ParallelGroups.build(world, E)
    cfg = parse_model_config(dict(vocab_size=V, d_model=16, n_layers=2, n_heads=2, d_ff=24, max_seq_len=SEQ,
                                  moe_every=1, moe_offset=1),
                             dict(num_experts=E, d_ff=16, top_k=2, ep_size=world, capacity_factor=1.0,
                                  min_capacity=1, aux_loss=dict(switch=0.1, importance=0.1)))
    eager = MoETransformer(cfg, seed=7, groups=groups)
    compiled = MoETransformer(cfg, seed=7, groups=groups)  # the same weights: they come from the seed
    compile_blocks(compiled, groups)
    tokens = torch.randint(0, V, (2, SEQ + 1), generator=torch.Generator().manual_seed(rank))
    assert_steps_match(eager, compiled, tokens[:, :-1], tokens[:, 1:])
    # Compiled, not fallen back to eager: graphs on both sides of the MoE layer's collectives.
    assert counters["stats"]["unique_graphs"] >= 2, dict(counters["stats"])


@pytest.mark.slow  # two ranks compiling on two cores
def test_compiled_blocks_match_eager_at_ep2():
    run_distributed(_worker, 2)
