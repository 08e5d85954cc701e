"""Routers under a bf16 model cast (what DeepSpeed's bf16 mode does to every floating buffer):
their statistics and frozen projections stay fp32, unrounded, and routing runs on bf16 inputs."""

import pytest
import torch

from moe_dist.moe.config import MoEConfig
from moe_dist.moe.layer import MoELayer, MoESideInputs

ROUTERS = [
    {"type": "topk", "bias_balancing": True},
    {"type": "inhibition", "mode": "divisive"},
    {"type": "inhibition", "mode": "subspace"},
    {"type": "fixed_projection", "center": True},
    {"type": "fixed_projection", "source": "embedding"},
    {"type": "attentive"},
]


@pytest.mark.parametrize("router", ROUTERS, ids=lambda r: "-".join(str(v) for v in r.values()))
def test_router_state_stays_fp32_and_routing_runs_in_a_bf16_model(router):
    layer = MoELayer(MoEConfig.from_dict(dict(d_model=16, d_ff=12, num_experts=8, router=router)), seed=1)
    before = {name: b.clone() for name, b in layer.router.named_buffers()}
    layer.bfloat16()
    for name, b in layer.router.named_buffers():
        assert torch.equal(b, before[name]) and b.dtype == before[name].dtype, name
    x, stream = torch.randn(32, 16).bfloat16(), torch.randn(32, 16).bfloat16()
    assert layer(x, MoESideInputs(stream_TD=stream)).y.dtype == torch.bfloat16
    layer.eval()
    layer(x, MoESideInputs(stream_TD=stream))


def test_ema_keeps_fp32_precision_in_a_bf16_model():
    layer = MoELayer(MoEConfig.from_dict(dict(d_model=16, d_ff=12, num_experts=8,
                                              router={"type": "inhibition", "stat": "ema"}))).bfloat16()
    x = torch.randn(32, 16).bfloat16()
    layer(x)
    # One step: the corrected EMA is the fp32 mean of the (bf16) tokens, not a bf16-rounded one.
    torch.testing.assert_close(layer.router.inhibition.ema_statistics()["mean_D"], x.float().mean(0),
                               rtol=1e-6, atol=1e-7)
