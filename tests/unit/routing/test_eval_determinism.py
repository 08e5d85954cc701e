"""Eval is deterministic for every router: the same input twice gives the same routes and output,
whatever the global RNG does in between; a token's route does not depend on the rest of its batch
(population statistics come from the EMA buffers); and eval leaves every buffer as it was."""

import pytest
import torch

from moe_dist.moe.config import MoEConfig
from moe_dist.moe.layer import MoELayer, MoESideInputs
from moe_dist.routing.base import RoutingContext
from moe_dist.routing.registry import router_types

ROUTERS = [
    {"type": "topk", "jitter_eps": 0.2},
    {"type": "topk", "bias_balancing": True},
    *[{"type": "inhibition", "mode": mode, "stat": stat, "jitter_eps": 0.2}
      for mode in ("subtractive", "divisive", "rectified", "subspace") for stat in ("batch", "ema")],
    {"type": "fixed_projection"},
    {"type": "fixed_projection", "weights": "softmax", "center": True},
    {"type": "fixed_projection", "source": "embedding", "center": True},
    {"type": "attentive"},
    {"type": "hash", "vocab_size": 16},
]


def test_every_registered_router_is_covered():
    assert {r["type"] for r in ROUTERS} == set(router_types())


@pytest.mark.parametrize("router", ROUTERS, ids=lambda r: "-".join(str(v) for v in r.values()))
def test_eval_routes_are_deterministic(router):
    layer = MoELayer(MoEConfig.from_dict(dict(d_model=16, d_ff=12, num_experts=8, top_k=2, min_capacity=1,
                                              router=router)), seed=1)
    x, stream = torch.randn(48, 16), torch.randn(48, 16)
    ids = torch.randint(0, 16, (48,))  # token ids: what the hash router routes by
    layer(x, MoESideInputs(stream_TD=stream, token_ids_T=ids))  # a training forward fills the statistics buffers
    layer.eval()
    buffers = {k: v.clone() for k, v in layer.named_buffers()}
    ctx = RoutingContext(training=False, stream_TD=stream, token_ids_T=ids)
    outputs = []
    for seed in (0, 1):
        torch.manual_seed(seed)  # eval must draw nothing from the global RNG
        outputs.append((layer.router(x, ctx), layer(x, MoESideInputs(stream_TD=stream, token_ids_T=ids))))
    (route_a, out_a), (route_b, out_b) = outputs
    assert torch.equal(route_a.idx_TK, route_b.idx_TK)
    assert torch.equal(route_a.w_TK, route_b.w_TK)
    assert torch.equal(out_a.y, out_b.y)
    alone = layer.router(x[:5], RoutingContext(training=False, stream_TD=stream[:5], token_ids_T=ids[:5]))
    assert torch.equal(alone.idx_TK, route_a.idx_TK[:5])
    for name, value in layer.named_buffers():
        assert torch.equal(value, buffers[name]), f"eval changed buffer {name}"
