"""The whole model with every feature of the imported architectures at once (grouped-query
attention with an explicit head_dim, q/k norm, q/k/v bias, partial rotary, or DeepSeek's latent
attention with YaRN; sigmoid (with the selection bias) or top-k-then-softmax routing with a
scale, a gated shared expert of its own width): expert parallelism on CPU/gloo equals one
process holding every rank's sequences (same weights): logits, LM and aux losses, every
gradient and one AdamW step. The MoE layer alone, router by router: test_ep_equivalence_layer.py.

The reference applies capacity per source-rank shard (`capacity_groups`), as the EP run does, so
the capacity cases drop the same pairs. Each rank's loss is the mean over its own tokens plus its
aux losses; their mean over ranks is the reference's loss.
"""

from __future__ import annotations

import pytest
import torch
from tests.harness.dist import assert_grads_and_adamw_step_match, run_distributed, shard

from moe_dist.model.config import parse_model_config
from moe_dist.model.transformer import MoETransformer
from moe_dist.parallel.grads import reduce_gradients
from moe_dist.parallel.groups import ParallelGroups

V, SEQ, SEQS_PER_RANK, E, SEED = 61, 10, 2, 8, 5
TOL = dict(rtol=2e-5, atol=2e-6)
ATTENTION = dict(n_heads=4, n_kv_heads=2, head_dim=6, qkv_bias=True)  # inner width 24 != d_model 16
CASES = {
    "sigmoid-head_norm-capacity": (dict(ATTENTION, qk_norm="head"),
                                   dict(capacity_factor=1.0, min_capacity=1, drop_policy="probs",
                                        router={"type": "topk", "score": "sigmoid", "renormalize": True,
                                                "scale": 2.5, "bias_balancing": True})),
    "after_topk-full_norm-dropless": (dict(ATTENTION, n_kv_heads=1, qk_norm="full"),
                                      dict(dropless=True, router={"type": "topk", "score_after_topk": True,
                                                                  "scale": 0.5})),
    # DeepSeek-V3's attention: latent attention with a low-rank query and YaRN's scaled softmax.
    "mla_yarn-sigmoid_bias-dropless": (dict(attention="mla", n_heads=4, q_lora_rank=6, kv_lora_rank=8,
                                            qk_rope_head_dim=4, qk_nope_head_dim=6, v_head_dim=5,
                                            rope_scaling=dict(type="yarn", factor=4.0, original_max_seq_len=4,
                                                              mscale=1.0, mscale_all_dim=1.0)),
                                       dict(dropless=True, router={"type": "topk", "score": "sigmoid",
                                                                   "renormalize": True, "scale": 2.5,
                                                                   "bias_balancing": True})),
    "partial_rotary-head_norm-dropless": (dict(ATTENTION, head_dim=8, qk_norm="head",
                                               partial_rotary_factor=0.5),
                                          dict(dropless=True)),
}


def make_cfg(ep_size: int, model: dict, moe: dict):
    return parse_model_config(
        dict(vocab_size=V, d_model=16, n_layers=3, d_ff=24, max_seq_len=SEQ, moe_every=1, moe_offset=1, **model),
        dict(num_experts=E, d_ff=16, top_k=2, ep_size=ep_size, num_shared_experts=1, shared_d_ff=12,
             shared_gate=True, aux_loss=dict(switch=0.1, z_loss=0.01, importance=0.1), **moe))


def mean_over_ranks(t: torch.Tensor, groups: ParallelGroups) -> torch.Tensor:
    return groups.all_reduce_sum_dp(t.detach().clone()) / groups.world_size


def _worker(rank: int, world: int, ep_size: int, case: str) -> None:
    model_kw, moe_kw = CASES[case]
    groups = ParallelGroups.build(ep_size, E)
    tokens = torch.randint(0, V, (world * SEQS_PER_RANK, SEQ + 1), generator=torch.Generator().manual_seed(3))
    x, y = tokens[:, :-1], tokens[:, 1:]

    ref = MoETransformer(make_cfg(1, model_kw, moe_kw), seed=SEED)
    out_ref = ref(x, y, capacity_groups=world)
    out_ref.loss.backward()

    model = MoETransformer(make_cfg(ep_size, model_kw, moe_kw), seed=SEED, groups=groups)
    out = model(shard(x, rank, world), shard(y, rank, world))
    out.loss.backward()
    reduce_gradients(model, groups)

    dropped = [s["dropped_fraction"] for s in out_ref.moe_stats.values()]
    assert all(d > 0 for d in dropped) != model.cfg.moe.dropless, f"{case}: capacity must drop pairs ({dropped})"
    torch.testing.assert_close(out.logits_BSV, shard(out_ref.logits_BSV, rank, world), **TOL)
    torch.testing.assert_close(mean_over_ranks(out.lm_loss, groups), out_ref.lm_loss.detach(), **TOL)
    torch.testing.assert_close(mean_over_ranks(out.aux_loss, groups), out_ref.aux_loss.detach(), **TOL)

    moe = model.blocks[1].moe
    lo, hi = moe.first_expert, moe.first_expert + moe.cfg.num_local_experts

    def ref_slice(name: str, t: torch.Tensor) -> torch.Tensor:
        return t[lo:hi] if ".moe.experts." in name else t

    names = {n for n, _ in model.named_parameters()}
    attention = ({"blocks.0.attn.q_up.weight", "blocks.0.attn.kv_down.weight", "blocks.0.attn.kv_norm.weight"}
                 if model.cfg.attention == "mla" else {"blocks.0.attn.qkv.bias", "blocks.0.attn.q_norm.weight"})
    assert attention | {"blocks.1.moe.shared_gate.weight"} <= names
    assert_grads_and_adamw_step_match(model, ref, ref_slice, f"({case}, rank {rank})", **TOL)


@pytest.mark.parametrize("case", sorted(CASES))
def test_model_with_every_new_feature_matches_single_process_under_expert_parallelism(case):
    run_distributed(_worker, 2, 2, case)


@pytest.mark.slow
def test_latent_attention_model_matches_single_process_at_ep_4():
    run_distributed(_worker, 4, 4, "mla_yarn-sigmoid_bias-dropless")
