"""Expert parallelism on CPU/gloo equals one process holding every rank's tokens (same weights):
outputs, each aux loss, routing statistics, every gradient and one AdamW step.

The reference applies capacity per source-rank shard (`capacity_groups`), as the EP run does.
Both sides use the same loss: per rank `sum(y_r * G_r) + aux_r`, whose mean over ranks is the
reference's `sum(y * G) / W + aux`.
"""

from __future__ import annotations

import pytest
import torch
from tests.harness.dist import assert_grads_and_adamw_step_match, run_distributed, shard

from moe_dist.moe.config import MoEConfig
from moe_dist.moe.layer import MoELayer, MoESideInputs
from moe_dist.moe.stats import count_ratios
from moe_dist.parallel.grads import reduce_gradients
from moe_dist.parallel.groups import ParallelGroups

# Shapes are chosen for the model, so that EP=N has something to get wrong (checked in
# check_layer_equivalence, not just claimed here):
# - 8 experts: 4 per rank at ep 2 and 2 at ep 4, so every rank receives rows for several local
#   experts from every source rank (expert offsets, expert-major regrouping, uneven splits), and
#   world 4 at ep 2 has two expert-data-parallel replicas for the gradient reduction to sum.
# - 24 tokens per rank at capacity_factor 1.0 (make_cfg), k 1 or 2: 3 or 6 slots per expert and
#   source rank, so every capacity case drops pairs (13-46% of them at these seeds) and the
#   drop policies decide something; dropless cases keep all of them.
# - d_model 16: at 64 a near-zero AdamW element of the shared expert was flaky at atol 2e-6.
# - d_ff 64 is a width every expert backend takes (a multiple of 64 and of 16). Which backend runs
#   is not this test's business: each backend is tested against the loop in its own test.
TOKENS_PER_RANK, D_MODEL, D_FF, NUM_EXPERTS, SEED = 24, 16, 64, 8, 11
MIN_LOCAL_EXPERTS = 2
VOCAB = 29  # token ids for the hash router: fewer than the tokens, so ids repeat within a rank
TOL = dict(rtol=2e-5, atol=2e-6)

LAYER_CASES = [
    dict(top_k=1, drop_policy="position"),
    dict(top_k=2, drop_policy="position"),
    dict(top_k=1, drop_policy="probs"),
    dict(top_k=2, drop_policy="probs"),
    dict(top_k=1, dropless=True),
    dict(top_k=2, dropless=True),
    dict(top_k=2, activation="gelu", num_shared_experts=1),
]
# The research routers' configs run a representative subset, which keeps the test's time near
# three minutes and still covers k=1 and 2, both drop policies and dropless for every router.
REPRESENTATIVE = [LAYER_CASES[0], LAYER_CASES[3], LAYER_CASES[5]]
# Every router must pass unchanged; research routers add themselves here. `aux_loss` entries
# override the base coefficients.
ROUTER_CASES = [
    dict(router={"type": "topk"}, layers=LAYER_CASES),
    dict(router={"type": "topk", "renormalize": True, "bias_balancing": True}, layers=LAYER_CASES),
    # 24 tokens per rank, 16 sampled: the subsample is the same on each rank and its reference group.
    dict(router={"type": "topk"}, aux_loss=dict(sample_similarity=0.5, sample_similarity_tokens=16),
         layers=REPRESENTATIVE),
    *[dict(router={"type": "inhibition", "mode": mode, "stat": stat}, layers=REPRESENTATIVE)
      for mode in ("subtractive", "divisive", "rectified", "subspace") for stat in ("batch", "ema")],
    dict(router={"type": "fixed_projection"}, layers=REPRESENTATIVE),
    dict(router={"type": "fixed_projection", "source": "embedding"}, layers=REPRESENTATIVE),
    dict(router={"type": "fixed_projection", "center": True}, layers=REPRESENTATIVE),
    dict(router={"type": "fixed_projection", "weights": "softmax"}, layers=REPRESENTATIVE),
    dict(router={"type": "fixed_projection", "weights": "softmax", "source": "embedding", "center": True,
                 "center_stat": "batch"}, layers=REPRESENTATIVE),
    dict(router={"type": "attentive"}, layers=REPRESENTATIVE),
    dict(router={"type": "attentive", "renormalize": True, "hidden": 8}, layers=REPRESENTATIVE),
    # Routes by token id (MoESideInputs.token_ids_T) through a table every rank builds alike.
    dict(router={"type": "hash", "vocab_size": VOCAB}, layers=REPRESENTATIVE),
    # COMET's neuron mask inside experts: expert i's mask projection must not depend on ep_size.
    dict(router={"type": "topk"}, layers=[dict(top_k=2, comet_active_fraction=0.25)]),
    # Imported architectures' routing: DeepSeek-V3 sigmoid scores (renormalized, scaled, selection
    # bias) and Mixtral's softmax over the chosen logits, with a gated shared expert of its own
    # width (Qwen2-MoE). The whole model with these and the attention features:
    # test_ep_equivalence_model.py.
    dict(router={"type": "topk", "score": "sigmoid", "renormalize": True, "scale": 2.5, "bias_balancing": True},
         layers=[dict(case, num_shared_experts=1, shared_d_ff=24, shared_gate=True) for case in REPRESENTATIVE]),
    dict(router={"type": "topk", "score_after_topk": True, "scale": 0.5}, layers=REPRESENTATIVE),
    # Group-limited selection (docs/routers/topk.md) under the research routers that take it:
    # inhibition's population statistics, then 2 of 4 groups; the attentive gate, 1 of 2 groups.
    dict(router={"type": "inhibition", "mode": "subtractive", "stat": "batch", "expert_groups": 4,
                 "topk_groups": 2, "group_score": "max"}, layers=REPRESENTATIVE),
    dict(router={"type": "attentive", "hidden": 8, "expert_groups": 2, "topk_groups": 1}, layers=REPRESENTATIVE),
]


def make_cfg(ep_size: int, layer_case: dict, router: dict, aux_loss: dict | None = None) -> MoEConfig:
    # cf 1.0 with 24 tokens per rank and k up to 2 forces drops; min_capacity 1 keeps them.
    return MoEConfig.from_dict(dict(d_model=D_MODEL, d_ff=D_FF, num_experts=NUM_EXPERTS, capacity_factor=1.0,
                                    min_capacity=1, ep_size=ep_size, router=router,
                                    aux_loss=dict(switch=0.1, z_loss=0.01, importance=0.1, **(aux_loss or {})),
                                    **layer_case))


def total_loss(out, G: torch.Tensor, scale: float) -> torch.Tensor:
    """`sum(y * G) * scale + aux`; routers without a weighted aux loss add nothing."""
    loss = (out.y * G).sum() * scale
    return loss if out.aux_loss is None else loss + out.aux_loss


def mean_over_ranks(t: torch.Tensor, groups: ParallelGroups) -> torch.Tensor:
    return groups.all_reduce_sum_dp(t.detach()) / groups.world_size


def check_layer_equivalence(rank: int, world: int, groups: ParallelGroups, layer_case: dict, router: dict,
                            aux_loss: dict | None = None) -> None:
    torch.manual_seed(1234)  # identical global batch on every rank
    x = torch.randn(world * TOKENS_PER_RANK, D_MODEL)
    G = torch.randn(world * TOKENS_PER_RANK, D_MODEL)
    stream = torch.randn(world * TOKENS_PER_RANK, D_MODEL)  # token embeddings for COMET's routing stream
    token_ids = torch.randint(0, VOCAB, (world * TOKENS_PER_RANK,))  # what the hash router routes by
    what = f"rank {rank} world {world} ep {groups.ep_size} {layer_case} {router} {aux_loss}"

    ref = MoELayer(make_cfg(1, layer_case, router, aux_loss), seed=SEED)
    x_ref = x.clone().requires_grad_()
    out_ref = ref(x_ref, MoESideInputs(stream_TD=stream, capacity_groups=world, token_ids_T=token_ids))
    loss_ref = total_loss(out_ref, G, 1.0 / world)
    loss_ref.backward()

    layer = MoELayer(make_cfg(groups.ep_size, layer_case, router, aux_loss), seed=SEED, groups=groups)
    x_r = shard(x, rank, world).clone().requires_grad_()
    out = layer(x_r, MoESideInputs(stream_TD=shard(stream, rank, world), token_ids_T=shard(token_ids, rank, world)))
    loss = total_loss(out, shard(G, rank, world), 1.0)
    loss.backward()
    reduce_gradients(layer, groups)

    # The shapes above must keep the case meaningful: several experts per rank, capacity that binds.
    assert layer.cfg.num_local_experts >= MIN_LOCAL_EXPERTS, what
    dropless = layer_case.get("dropless", False)
    assert (out_ref.stats["dropped_fraction"] > 0) != dropless, f"capacity must drop pairs (and only then) {what}"
    lo, hi = layer.first_expert, layer.first_expert + layer.cfg.num_local_experts

    def ref_slice(name: str, t: torch.Tensor) -> torch.Tensor:
        """The reference's counterpart: expert tensors (params and buffers) hold every expert."""
        return t[lo:hi] if name.startswith("experts.") else t

    torch.testing.assert_close(out.y, shard(out_ref.y, rank, world), **TOL, msg=lambda m: f"output {what}: {m}")
    assert (out.stream is None) == (out_ref.stream is None)
    if out.stream is not None:
        torch.testing.assert_close(out.stream, shard(out_ref.stream, rank, world), **TOL)
    # Statistics buffers (inhibition EMAs) fold in global statistics: equal on every rank.
    ref_buffers = dict(ref.named_buffers())
    for name, b in layer.named_buffers():
        torch.testing.assert_close(b, ref_slice(name, ref_buffers[name]), **TOL,
                                   msg=lambda m: f"buffer {name} {what}: {m}")
    torch.testing.assert_close(mean_over_ranks(loss, groups), loss_ref.detach(), **TOL)
    assert out.losses.keys() == out_ref.losses.keys()
    for name, value in out.losses.items():
        torch.testing.assert_close(mean_over_ranks(value, groups), out_ref.losses[name].detach(), **TOL,
                                   msg=lambda m: f"aux loss {name} {what}: {m}")
    # Statistics are this rank's own counts (no collective in the forward): summed over the
    # ranks they are the reference's, and so are the ratios of those sums.
    summed = {}
    for name in ("tokens_per_expert", "tokens_per_expert_kept", "num_tokens", "importance", "entropy_token_sum"):
        assert (name in out.stats) == (name in out_ref.stats), f"{name} {what}"
        if name in out.stats:
            summed[name] = groups.all_reduce_sum_dp(out.stats[name].clone())
            torch.testing.assert_close(summed[name], out_ref.stats[name], **TOL, msg=lambda m: f"{name} {what}: {m}")
    for name, value in count_ratios(summed).items():
        torch.testing.assert_close(value, out_ref.stats[name], **TOL, msg=lambda m: f"{name} {what}: {m}")
    # The local loss is W times this rank's share of the mean loss.
    torch.testing.assert_close(x_r.grad / world, shard(x_ref.grad, rank, world), **TOL)


    assert_grads_and_adamw_step_match(layer, ref, ref_slice, what, **TOL)


def _worker(rank: int, world: int, ep_size: int) -> None:
    groups = ParallelGroups.build(ep_size, NUM_EXPERTS)
    for router_case in ROUTER_CASES:
        for case in router_case["layers"]:
            check_layer_equivalence(rank, world, groups, case, router_case["router"], router_case.get("aux_loss"))


@pytest.mark.parametrize("world,ep_size", [(2, 2), (4, 4), (4, 2)])
def test_expert_parallel_matches_single_process(world, ep_size):
    run_distributed(_worker, world, ep_size)
