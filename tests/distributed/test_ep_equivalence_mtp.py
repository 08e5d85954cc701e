"""DeepSeek-V3's architecture under expert parallelism: multi-head latent attention (a low-rank
query, a joint key-value latent, split rotary/non-rotary heads), a dense first layer, group-limited top-k
(2 of 4 expert groups, ranked by their top-2 sum) on sigmoid scores with a non-zero selection bias,
renormalized and scaled, and an MTP block (an MoE block, layer n_layers) whose loss joins the
training loss. EP 2 and 4 on CPU/gloo equal one process holding every rank's sequences (same
weights): logits, the LM, MTP and aux losses, every gradient and one AdamW step. Capacity is
per source-rank shard in the reference (`capacity_groups`), for the MTP block's tokens too, so
the same pairs drop. How the model test is built: test_ep_equivalence_model.py."""

from __future__ import annotations

import pytest
import torch
from tests.harness.dist import assert_grads_and_adamw_step_match, run_distributed, shard

from moe_dist.model.config import parse_model_config
from moe_dist.model.transformer import MoETransformer
from moe_dist.parallel.grads import reduce_gradients
from moe_dist.parallel.groups import ParallelGroups

V, SEQ, SEQS_PER_RANK, E, SEED, N_LAYERS = 61, 10, 2, 8, 5, 3
TOL = dict(rtol=2e-5, atol=2e-6)
ROUTER = {"type": "topk", "score": "sigmoid", "bias_balancing": True, "renormalize": True, "scale": 2.5,
          "expert_groups": 4, "topk_groups": 2, "group_score": "top2_sum"}


def make_cfg(ep_size: int):
    return parse_model_config(
        dict(vocab_size=V, d_model=16, n_layers=N_LAYERS, n_heads=4, d_ff=24, max_seq_len=SEQ, moe_every=1,
             moe_offset=1, tie_embeddings=False, mtp_layers=1, mtp_loss_weight=0.3, attention="mla",
             q_lora_rank=12, kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=6),
        dict(num_experts=E, d_ff=16, top_k=3, ep_size=ep_size, num_shared_experts=1, capacity_factor=1.0,
             min_capacity=1, drop_policy="probs", router=ROUTER,
             aux_loss=dict(switch=0.1, z_loss=0.01, importance=0.1)))


def build(ep_size: int, groups: ParallelGroups | None = None) -> MoETransformer:
    model = MoETransformer(make_cfg(ep_size), seed=SEED, groups=groups)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for _, moe in model.moe_layers():  # large enough to change which groups and experts win
            moe.router.selection_bias_E.copy_(0.2 * torch.randn(E, generator=g))
    return model


def mean_over_ranks(t: torch.Tensor, groups: ParallelGroups) -> torch.Tensor:
    return groups.all_reduce_sum_dp(t.detach().clone()) / groups.world_size


def _worker(rank: int, world: int, ep_size: int) -> None:
    groups = ParallelGroups.build(ep_size, E)
    tokens = torch.randint(0, V, (world * SEQS_PER_RANK, SEQ + 1), generator=torch.Generator().manual_seed(3))
    x, y = tokens[:, :-1], tokens[:, 1:]

    ref = build(1)
    out_ref = ref(x, y, capacity_groups=world)
    out_ref.loss.backward()

    model = build(ep_size, groups)
    out = model(shard(x, rank, world), shard(y, rank, world))
    out.loss.backward()
    reduce_gradients(model, groups)

    assert sorted(out_ref.moe_stats) == [1, 2, N_LAYERS] == sorted(out.moe_stats)
    dropped = [s["dropped_fraction"] for s in out_ref.moe_stats.values()]
    assert all(d > 0 for d in dropped), f"capacity must drop pairs in every MoE layer ({dropped})"
    torch.testing.assert_close(out.logits_BSV, shard(out_ref.logits_BSV, rank, world), **TOL)
    for name in ("lm_loss", "mtp_loss", "aux_loss", "loss"):
        torch.testing.assert_close(mean_over_ranks(getattr(out, name), groups), getattr(out_ref, name).detach(),
                                   **TOL, msg=lambda m, n=name: f"{n} (ep {ep_size}, rank {rank}): {m}")
    for layer, stats in out.moe_stats.items():
        load = groups.all_reduce_sum_dp(stats["tokens_per_expert"].clone())
        torch.testing.assert_close(load, out_ref.moe_stats[layer]["tokens_per_expert"], rtol=0, atol=0)

    moe = model.blocks[N_LAYERS].moe
    lo, hi = moe.first_expert, moe.first_expert + moe.cfg.num_local_experts

    def ref_slice(name: str, t: torch.Tensor) -> torch.Tensor:
        return t[lo:hi] if ".moe.experts." in name else t

    assert_grads_and_adamw_step_match(model, ref, ref_slice, f"(ep {ep_size}, rank {rank})", **TOL)


def test_group_limited_routing_and_mtp_match_single_process_at_ep2():
    run_distributed(_worker, 2, 2)


@pytest.mark.slow
def test_group_limited_routing_and_mtp_match_single_process_at_ep4():
    run_distributed(_worker, 4, 4)
