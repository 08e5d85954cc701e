"""Group-limited top-k (DeepSeek-V2/V3, docs/routers/topk.md "Group-limited routing").

transformers' own routers are the reference: `DeepseekV3TopkRouter` (sigmoid scores, the
correction bias for selection only, groups ranked by their top-2 sum, norm_topk_prob,
routed_scaling_factor) and `DeepseekV2TopkRouter` with `topk_method: group_limited_greedy`
(softmax scores, groups ranked by their best score), built from their config classes with random
weights; same expert ids and weights on random inputs."""

from __future__ import annotations

import pytest
import torch

from moe_dist.common.config import ConfigError
from moe_dist.moe.config import MoEConfig
from moe_dist.moe.layer import MoELayer
from moe_dist.routing.base import RoutingContext
from moe_dist.routing.registry import build_router, router_config_from_dict
from moe_dist.routing.topk import group_limit_mask, topk_from_logits

D, E, T = 16, 12, 64


def _sorted(idx_TK: torch.Tensor, w_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' routers return the K experts unsorted (topk(sorted=False)): compare by id."""
    order = idx_TK.argsort(dim=-1)
    return idx_TK.gather(1, order), w_TK.gather(1, order)


def _ours(router_cfg: dict, top_k: int, weight_ED: torch.Tensor, bias_E: torch.Tensor | None = None):
    cfg = router_config_from_dict(router_cfg)
    cfg.check_layer(E, top_k)
    router = build_router(cfg, d_model=D, num_experts=E, top_k=top_k, layer_index=0)
    with torch.no_grad():
        router.gate.weight_ED.copy_(weight_ED)
        if bias_E is not None:
            router.selection_bias_E.copy_(bias_E)
    return router


@pytest.mark.parametrize("groups,topk_groups,top_k,renormalize", [(4, 2, 3, True), (6, 1, 2, False),
                                                                   (3, 2, 4, True)])
def test_matches_transformers_deepseek_v3_router(groups, topk_groups, top_k, renormalize):
    import transformers
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    config = transformers.DeepseekV3Config(hidden_size=D, num_attention_heads=4, n_routed_experts=E,
                                           num_experts_per_tok=top_k, n_group=groups, topk_group=topk_groups,
                                           norm_topk_prob=renormalize, routed_scaling_factor=2.5)
    hf = DeepseekV3TopkRouter(config)
    g = torch.Generator().manual_seed(groups)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(E, D, generator=g))
        # Large enough to change which experts and which groups win.
        hf.e_score_correction_bias.copy_(0.3 * torch.randn(E, generator=g))
    ours = _ours({"type": "topk", "score": "sigmoid", "bias_balancing": True, "renormalize": renormalize,
                  "scale": 2.5, "expert_groups": groups, "topk_groups": topk_groups, "group_score": "top2_sum"},
                 top_k, hf.weight, hf.e_score_correction_bias)
    x = torch.randn(T, D, generator=g)
    idx = assert_same_routes(ours, hf, x)
    # The limit binds: without it, some tokens would pick experts of other groups.
    free = _ours({"type": "topk", "score": "sigmoid", "bias_balancing": True}, top_k, hf.weight,
                 hf.e_score_correction_bias)(x, RoutingContext(training=False))
    assert not torch.equal(_sorted(free.idx_TK, free.w_TK)[0], idx)


def assert_same_routes(ours, hf, x: torch.Tensor) -> torch.Tensor:
    """Our router and transformers' `hf` choose the same experts with the same weights for `x`
    (in any order within a token); returns our ids, sorted."""
    _, hf_w, hf_idx = hf(x)
    out = ours(x, RoutingContext(training=False))
    idx, w = _sorted(out.idx_TK, out.w_TK)
    hf_idx, hf_w = _sorted(hf_idx, hf_w)
    assert torch.equal(idx, hf_idx)
    torch.testing.assert_close(w, hf_w, rtol=1e-6, atol=1e-7)
    return idx


def test_matches_transformers_deepseek_v2_group_limited_greedy():
    import transformers
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter

    config = transformers.DeepseekV2Config(hidden_size=D, num_attention_heads=4, n_routed_experts=E,
                                           num_experts_per_tok=3, topk_method="group_limited_greedy", n_group=4,
                                           topk_group=2, routed_scaling_factor=1.5)
    hf = DeepseekV2TopkRouter(config)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(E, D, generator=g))
    ours = _ours({"type": "topk", "renormalize": False, "scale": 1.5, "expert_groups": 4, "topk_groups": 2,
                  "group_score": "max"}, 3, hf.weight)  # V2 never renormalizes (the import's mapping)
    assert_same_routes(ours, hf, torch.randn(T, D, generator=g))


@pytest.mark.parametrize("group_score", ["top2_sum", "max"])
def test_chosen_experts_lie_in_the_best_groups(group_score):
    g = torch.Generator().manual_seed(1)
    logits_TE = torch.randn(T, E, generator=g)
    _, _, idx_TK = topk_from_logits(logits_TE, 4, False, score="sigmoid", expert_groups=6, topk_groups=2,
                                    group_score=group_score)
    scores_TGe = torch.sigmoid(logits_TE).view(T, 6, 2)
    rank_TG = scores_TGe.sum(-1) if group_score == "top2_sum" else scores_TGe.amax(-1)
    best_TG = rank_TG.topk(2, dim=-1).indices.sort(-1).values
    # Top-4 of the 2 best groups of 2 experts: exactly their 4 experts.
    assert torch.equal((idx_TK // 2).sort(-1).values, best_TG.repeat_interleave(2, dim=-1))
    masked = group_limit_mask(torch.sigmoid(logits_TE), 6, 2, group_score)
    assert torch.equal(torch.isinf(masked).sum(-1), torch.full((T,), 8))


def test_no_limit_is_plain_topk():
    logits_TE = torch.randn(T, E, generator=torch.Generator().manual_seed(2))
    plain = topk_from_logits(logits_TE, 3, True)
    grouped = topk_from_logits(logits_TE, 3, True, expert_groups=4, topk_groups=4)
    for a, b in zip(plain, grouped):
        assert torch.equal(a, b)
    cfg = router_config_from_dict({"type": "topk", "expert_groups": 4})
    assert cfg.topk_groups == 4  # None means every group


def test_inhibition_selects_within_groups():
    """`inhibition` is `topk` on the inhibited input, so it inherits the group limit."""
    layer = MoELayer(MoEConfig.from_dict(dict(
        d_model=D, d_ff=8, num_experts=E, top_k=2, dropless=True,
        router={"type": "inhibition", "expert_groups": 6, "topk_groups": 1, "group_score": "max"})), seed=0)
    route = layer.router(torch.randn(T, D) + 3.0, RoutingContext(training=True))
    groups_TK = route.idx_TK // 2
    assert torch.equal(groups_TK[:, 0], groups_TK[:, 1])


def test_attentive_selects_within_groups():
    layer = MoELayer(MoEConfig.from_dict(dict(
        d_model=D, d_ff=8, num_experts=E, top_k=3, dropless=True,
        router={"type": "attentive", "expert_groups": 4, "topk_groups": 1})), seed=0)
    route = layer.router(torch.randn(T, D), RoutingContext(training=True))
    assert torch.equal((route.idx_TK // 3).amin(-1), (route.idx_TK // 3).amax(-1))


@pytest.mark.parametrize("moe,match", [
    (dict(num_experts=12, router={"type": "topk", "expert_groups": 5}), r"expert_groups \(5\) must divide"),
    (dict(num_experts=12, top_k=5, router={"type": "topk", "expert_groups": 6, "topk_groups": 2}),
     r"top_k \(5\) must be <= router.topk_groups \(2\)"),
    (dict(num_experts=12, router={"type": "topk", "expert_groups": 12, "topk_groups": 3}), "group_score 'top2_sum'"),
    (dict(num_experts=12, router={"type": "topk", "expert_groups": 4, "topk_groups": 5}),
     r"topk_groups \(5\) must be <= router.expert_groups \(4\)"),
    (dict(num_experts=12, router={"type": "topk", "expert_groups": 4, "group_score": "sum"}), "group_score"),
    (dict(num_experts=12, router={"type": "fixed_projection", "expert_groups": 4}),
     r"moe.router.expert_groups \(4\): router type 'fixed_projection' cannot limit expert groups: its scores "
     r"are a frozen"),
])
def test_bad_group_settings_are_refused_by_name(moe, match):
    with pytest.raises(ConfigError, match=match):
        MoEConfig.from_dict(dict(d_model=D, d_ff=8, **moe))
