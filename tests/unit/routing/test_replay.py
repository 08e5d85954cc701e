"""Route replay in the layer: forced ids reach every router through `RoutingContext.forced`, the
weights are then the router's own formula at those ids (the router still trains), forced weights
replace them, a router that ignores forced ids is refused, and one router's routes replay under
another router's weights."""

from __future__ import annotations

import copy

import pytest
import torch

from moe_dist.moe.config import MoEConfig
from moe_dist.moe.layer import MoELayer, MoESideInputs
from moe_dist.routing.base import ForcedRoute, Router, RouterConfig, RouterOutput
from moe_dist.routing import registry
from moe_dist.routing.registry import register_router

ROUTERS = [
    {"type": "topk"},
    {"type": "topk", "renormalize": True, "jitter_eps": 0.2},
    {"type": "topk", "score": "sigmoid", "bias_balancing": True},
    {"type": "topk", "score_after_topk": True},
    {"type": "inhibition", "mode": "subtractive"},
    {"type": "fixed_projection", "weights": "softmax"},
    {"type": "attentive"},
    {"type": "topk", "score": "sigmoid", "bias_balancing": True, "expert_groups": 4, "topk_groups": 2},
    {"type": "hash", "vocab_size": 50},
]
ids = [str(i) for i in range(len(ROUTERS))]


def layer_of(router: dict, seed: int = 0, **kw) -> MoELayer:
    cfg = MoEConfig.from_dict(dict(d_model=16, d_ff=24, num_experts=8, top_k=2, capacity_factor=1.0,
                                   min_capacity=1, router=router, aux_loss=dict(switch=0.01), **kw))
    return MoELayer(cfg, seed=seed)


def step(layer: MoELayer, x: torch.Tensor, side: MoESideInputs, rng_seed: int = 1):
    torch.manual_seed(rng_seed)  # router jitter draws the same noise in both runs
    x = x.clone().requires_grad_()
    out = layer(x, side)
    loss = out.y.square().sum() + (out.aux_loss if out.aux_loss is not None else 0.0)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    layer.zero_grad()
    return out, x.grad, grads


@pytest.mark.parametrize("router", ROUTERS, ids=ids)
def test_replaying_the_routers_own_routes_changes_nothing(router):
    layer = layer_of(router)
    replayed = copy.deepcopy(layer)  # the same router buffers (inhibition's EMA) in both runs
    x = torch.randn(24, 16)
    side = MoESideInputs(trace=True, stream_TD=torch.randn(24, 16), token_ids_T=torch.randint(0, 50, (24,)))
    ref, dx, grads = step(layer, x, side)
    forced = {0: ForcedRoute(idx_TK=ref.route.idx_TK.clone())}
    out, dx2, grads2 = step(replayed, x, MoESideInputs(trace=True, stream_TD=side.stream_TD, token_ids_T=side.token_ids_T,
                                                       forced_routes=forced))
    assert torch.equal(out.y, ref.y) and torch.equal(dx2, dx)
    assert torch.equal(out.route.w_TK, ref.route.w_TK) and torch.equal(out.route.keep_TK, ref.route.keep_TK)
    assert grads2.keys() == grads.keys() and all(torch.equal(grads2[n], grads[n]) for n in grads)


def test_forced_ids_take_the_routers_weights_at_them_and_the_router_trains():
    layer = layer_of({"type": "topk"})
    x = torch.randn(24, 16)
    free, _, _ = step(layer, x, MoESideInputs(trace=True))
    # Each token's two lowest-scored experts: never what the router would choose.
    logits = layer.router.gate(x)
    probs = torch.softmax(logits, -1)
    idx = torch.topk(-probs, 2, dim=-1).indices
    out, _, grads = step(layer, x, MoESideInputs(trace=True, forced_routes={0: ForcedRoute(idx_TK=idx)}))
    assert torch.equal(out.route.idx_TK, idx) and not torch.equal(free.route.idx_TK, idx)
    chosen = probs.gather(1, idx)  # K = 2: renormalized by default (docs/routers/topk.md)
    torch.testing.assert_close(out.route.w_TK, chosen / chosen.sum(-1, keepdim=True), rtol=0, atol=0)
    assert grads["router.gate.weight_ED"].abs().sum() > 0


def test_forced_weights_replace_the_routers_and_another_layer_routes_as_usual():
    layer = layer_of({"type": "topk"})
    x = torch.randn(24, 16)
    idx = torch.randint(0, 8, (24, 1)).repeat(1, 2) + torch.tensor([0, 1])
    idx = idx % 8
    w = torch.rand(24, 2)
    out, _, grads = step(layer, x, MoESideInputs(trace=True, forced_routes={0: ForcedRoute(idx, w)}))
    assert torch.equal(out.route.idx_TK, idx) and torch.equal(out.route.w_TK, w)
    # Constant weights: the router learns from its aux loss only, not through the combine.
    aux_only = layer_of({"type": "topk"})
    other = aux_only(x, MoESideInputs(forced_routes={5: ForcedRoute(idx, w)}, trace=True))
    assert not torch.equal(other.route.idx_TK, idx) or not torch.equal(other.route.w_TK, w)


def test_one_routers_routes_replay_under_another_routers_weights():
    x = torch.randn(24, 16)
    recorded = layer_of({"type": "topk", "renormalize": True}, seed=3)(x, MoESideInputs(trace=True)).route
    other = layer_of({"type": "fixed_projection", "weights": "softmax"}, seed=7)
    own = other(x, MoESideInputs(trace=True)).route
    out = other(x, MoESideInputs(trace=True, forced_routes={0: ForcedRoute(recorded.idx_TK)}))
    assert torch.equal(out.route.idx_TK, recorded.idx_TK) and not torch.equal(own.idx_TK, recorded.idx_TK)
    # fixed_projection's own weights at the replayed ids: the softmax of its scores there.
    scores = other.router._input(x, None) @ other.router.v_projection.t()
    torch.testing.assert_close(out.route.w_TK, torch.softmax(scores.gather(1, recorded.idx_TK), -1))


def test_a_forced_route_of_another_shape_is_refused():
    layer = layer_of({"type": "topk"})
    with pytest.raises(ValueError, match=r"forced routes have shape \(24, 3\).*24 tokens to top_k=2"):
        layer(torch.randn(24, 16), MoESideInputs(forced_routes={0: ForcedRoute(torch.zeros(24, 3, dtype=torch.long))}))


class _Ignores(Router):
    def forward(self, x_TD, ctx):
        idx = torch.zeros(x_TD.shape[0], self.top_k, dtype=torch.long) + torch.arange(self.top_k)
        return RouterOutput(idx_TK=idx, w_TK=torch.ones(idx.shape))


class _IgnoresConfig(RouterConfig):
    pass


def test_a_router_that_ignores_forced_routes_is_refused(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # this test's router only
    register_router("test_ignores_forced", _IgnoresConfig, _Ignores)
    layer = layer_of({"type": "test_ignores_forced"})
    forced = {0: ForcedRoute(torch.zeros(24, 2, dtype=torch.long))}
    with pytest.raises(ValueError, match="router 'test_ignores_forced' of MoE layer 0 ignores forced routes"):
        layer(torch.randn(24, 16), MoESideInputs(forced_routes=forced))


def test_hash_layer_takes_forced_ids_with_its_uniform_weights():
    layer = layer_of({"type": "hash", "vocab_size": 50})
    x, token_ids = torch.randn(24, 16), torch.randint(0, 50, (24,))
    own = layer.router.table_VK[token_ids]
    idx = (own + 1) % 8  # never the table's choice
    out, _, _ = step(layer, x, MoESideInputs(trace=True, token_ids_T=token_ids,
                                             forced_routes={0: ForcedRoute(idx_TK=idx)}))
    assert torch.equal(out.route.idx_TK, idx)
    assert torch.equal(out.route.w_TK, torch.full((24, 2), 0.5))
