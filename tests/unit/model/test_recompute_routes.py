"""A recompute never re-routes: with `model.activation_checkpointing` (attention and dense FFNs
recomputed in the backward) and `model.moe_recompute: experts` (the experts recomputed), the MoE
layer's routes are the forward's. A router that routes differently at every call makes a second
routing visible: the gradients would then differ from those of the same model without recompute,
and the router would run twice per step."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from moe_dist.model.config import parse_model_config
from moe_dist.model.transformer import MoETransformer
from moe_dist.routing.base import RouterConfig, RouterOutput
from moe_dist.routing import registry
from moe_dist.routing.registry import register_router
from moe_dist.routing.replay import choose_experts
from moe_dist.routing.topk import LinearGate, TopKRouter

V, B, S = 61, 2, 16


@dataclass
class _DriftingConfig(RouterConfig):
    type: str = "test_drifting"


class _DriftingRouter(TopKRouter):
    """`topk`'s gate, whose choice shifts by one expert at every call: deliberately impure, so that
    a second routing of the same tokens picks other experts."""

    calls = 0

    def __init__(self, cfg, **kw) -> None:
        super(TopKRouter, self).__init__(cfg, **kw)
        self.gate = LinearGate(self.d_model, self.num_experts)

    def forward(self, x_TD, ctx):
        type(self).calls += 1
        logits_TE = self.gate(x_TD)
        probs_TE = torch.softmax(logits_TE, -1)
        shifted_TE = torch.roll(probs_TE, type(self).calls, dims=-1)
        idx_TK = choose_experts(shifted_TE, self.top_k, ctx.forced)
        return RouterOutput(idx_TK=idx_TK, w_TK=probs_TE.gather(1, idx_TK), probs_TE=probs_TE, logits_TE=logits_TE)


@pytest.fixture(autouse=True)
def _drifting_router_registered(monkeypatch):
    # Registered for this module's tests only: the registry is process-wide, and the router
    # coverage test enumerates it.
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    register_router("test_drifting", _DriftingConfig, _DriftingRouter)


def grads_and_calls(**recompute):
    cfg = parse_model_config(dict(vocab_size=V, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=32,
                                  moe_every=1, **recompute),
                             dict(num_experts=8, d_ff=32, top_k=2, capacity_factor=1.0, min_capacity=1,
                                  router={"type": "test_drifting"}, aux_loss=dict(switch=0.01)))
    model = MoETransformer(cfg, seed=0).train()
    tokens = torch.randint(0, V, (B, S + 1), generator=torch.Generator().manual_seed(0))
    _DriftingRouter.calls = 0
    out = model(tokens[:, :-1], tokens[:, 1:])
    out.loss.backward()
    return out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, \
        _DriftingRouter.calls


@pytest.mark.parametrize("recompute", [dict(activation_checkpointing=True),
                                       dict(activation_checkpointing=True, moe_recompute="experts"),
                                       dict(moe_recompute="activation")], ids=str)
def test_recompute_reuses_the_forwards_routes(recompute):
    loss, grads, calls = grads_and_calls()
    loss_r, grads_r, calls_r = grads_and_calls(**recompute)
    assert calls == calls_r == 2  # once per MoE layer: the backward routed nothing
    assert torch.equal(loss_r, loss)
    assert grads_r.keys() == grads.keys()
    for name, g in grads.items():
        assert torch.equal(grads_r[name], g), name
