"""DeepSeek-V4's layout under expert parallelism: the first MoE layer routes by a frequency-packed
token-id table (`moe.hash_layers`, docs/routers/hash.md), the next by the learned top-k router.
EP 2 and 4 on CPU/gloo equal one process holding every rank's sequences (same weights): logits,
LM and aux losses, every gradient and one AdamW step. The layer alone, seeded table:
test_ep_equivalence_layer.py.

The reference applies capacity per source-rank shard (`capacity_groups`), as the EP run does.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tests.harness.dist import assert_grads_and_adamw_step_match, run_distributed, shard

from moe_dist.model.config import parse_model_config
from moe_dist.model.transformer import MoETransformer
from moe_dist.parallel.grads import reduce_gradients
from moe_dist.parallel.groups import ParallelGroups
from moe_dist.routing.hash import HashRouter
from moe_dist.routing.topk import TopKRouter

V, SEQ, SEQS_PER_RANK, E, SEED = 61, 12, 2, 8, 5
TOL = dict(rtol=2e-5, atol=2e-6)


def make_cfg(ep_size: int, counts_path: str):
    return parse_model_config(
        dict(vocab_size=V, d_model=16, n_layers=3, n_heads=4, d_ff=24, max_seq_len=SEQ, moe_every=1, moe_offset=1),
        dict(num_experts=E, d_ff=16, top_k=2, ep_size=ep_size, capacity_factor=1.0, min_capacity=1,
             num_shared_experts=1, aux_loss=dict(switch=0.1, z_loss=0.01, importance=0.1), hash_layers=1,
             hash_router={"type": "hash", "table": "frequency", "token_counts": counts_path},
             router={"type": "topk"}))


def mean_over_ranks(t: torch.Tensor, groups: ParallelGroups) -> torch.Tensor:
    return groups.all_reduce_sum_dp(t.detach().clone()) / groups.world_size


def _worker(rank: int, world: int, ep_size: int, counts_path: str) -> None:
    groups = ParallelGroups.build(ep_size, E)
    tokens = torch.randint(0, V, (world * SEQS_PER_RANK, SEQ + 1), generator=torch.Generator().manual_seed(3))
    x, y = tokens[:, :-1], tokens[:, 1:]

    ref = MoETransformer(make_cfg(1, counts_path), seed=SEED)
    out_ref = ref(x, y, capacity_groups=world)
    out_ref.loss.backward()

    model = MoETransformer(make_cfg(ep_size, counts_path), seed=SEED, groups=groups)
    assert [type(moe.router) for _, moe in model.moe_layers()] == [HashRouter, TopKRouter]
    torch.testing.assert_close(model.blocks[1].moe.router.table_VK, ref.blocks[1].moe.router.table_VK, rtol=0, atol=0)
    out = model(shard(x, rank, world), shard(y, rank, world))
    out.loss.backward()
    reduce_gradients(model, groups)

    what = f"(rank {rank}, world {world}, ep {ep_size})"
    dropped = [float(s["dropped_fraction"]) for s in out_ref.moe_stats.values()]
    assert all(d > 0 for d in dropped), f"capacity must drop pairs in both layers {dropped} {what}"
    torch.testing.assert_close(out.logits_BSV, shard(out_ref.logits_BSV, rank, world), **TOL)
    torch.testing.assert_close(mean_over_ranks(out.lm_loss, groups), out_ref.lm_loss.detach(), **TOL)
    torch.testing.assert_close(mean_over_ranks(out.aux_loss, groups), out_ref.aux_loss.detach(), **TOL)
    for layer in (1, 2):
        summed = groups.all_reduce_sum_dp(out.moe_stats[layer]["tokens_per_expert"].clone())
        torch.testing.assert_close(summed, out_ref.moe_stats[layer]["tokens_per_expert"], **TOL)

    lo, hi = model.blocks[1].moe.first_expert, model.blocks[1].moe.first_expert + model.cfg.moe.num_local_experts

    def ref_slice(name: str, t: torch.Tensor) -> torch.Tensor:
        return t[lo:hi] if ".moe.experts." in name else t

    assert_grads_and_adamw_step_match(model, ref, ref_slice, what, **TOL)


@pytest.mark.parametrize("world,ep_size", [(2, 2), (4, 4)])
def test_hash_then_topk_layers_match_single_process_under_expert_parallelism(tmp_path, world, ep_size):
    counts = np.random.default_rng(0).integers(0, 500, V)
    counts[::5] = 0
    path = str(tmp_path / "token_counts.npy")
    np.save(path, counts)
    run_distributed(_worker, world, ep_size, path)
