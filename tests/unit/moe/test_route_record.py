"""What the routing trace costs the MoE layer: nothing when off (no `MoEOutput.route`, the same
ops as before), and when on no host read and no graph break either: the layer only hands back
tensors it computed anyway (the router's ids and weights before capacity, the plan's keep flags);
the trace's reads happen outside the model (`evaluate.trace_writer`)."""

from __future__ import annotations

import torch
import torch._dynamo
from tests.harness.host_sync import census_of_layer_step
from torch.utils._python_dispatch import TorchDispatchMode

from moe_dist.moe.capacity import assign_slots
from moe_dist.moe.config import MoEConfig
from moe_dist.moe.layer import MoELayer, MoESideInputs
from moe_dist.routing.base import RoutingContext


def make_layer(impl: str = "auto", **kw) -> MoELayer:
    cfg = MoEConfig.from_dict(dict(d_model=32, d_ff=64, num_experts=8, top_k=2, expert_impl=impl,
                                   capacity_factor=1.0, min_capacity=1, aux_loss=dict(switch=0.01), **kw))
    return MoELayer(cfg, seed=0)


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_the_record_is_the_routers_choice_before_capacity_and_the_plans_drops():
    layer = make_layer()
    x = torch.randn(40, 32)
    out = layer(x, MoESideInputs(trace=True))
    route = layer.router(x, RoutingContext(training=True))
    assert torch.equal(out.route.idx_TK, route.idx_TK) and torch.equal(out.route.w_TK, route.w_TK)
    plan = assign_slots(route.idx_TK, 8, layer.capacity(40), "position", priority_TK=route.w_TK)
    assert torch.equal(out.route.keep_TK, plan.keep_TK) and not plan.keep_TK.all()
    assert not out.route.w_TK.requires_grad and not out.route.spilled_TK.any()  # no budget: nothing spills


def test_tracing_off_returns_nothing_and_runs_the_same_ops_as_on():
    layer = make_layer()
    x = torch.randn(40, 32)
    off, on = _Ops(), _Ops()
    with off:
        out_off = layer(x)
    with on:
        out_on = layer(x, MoESideInputs(trace=True))
    assert out_off.route is None and out_on.route is not None
    # On adds at most the detach of the weights (a view), no computation.
    extra = list(on.ops)
    for op in off.ops:
        extra.remove(op)
    assert set(extra) <= {"aten.detach.default"}, extra


def test_tracing_reads_nothing_from_the_device_on_or_off():
    for trace in (False, True):
        layer = make_layer("grouped_mm").to(torch.bfloat16)
        x = torch.randn(32, 32, dtype=torch.bfloat16, requires_grad=True)
        side = MoESideInputs(trace=trace)
        layer(x, side)  # one-time work first
        out, forward, backward = census_of_layer_step(layer, x, side)
        assert (out.route is not None) == trace
        assert forward.count == 0, f"trace={trace} forward:\n{forward.report()}"
        assert backward.count == 0, f"trace={trace} backward:\n{backward.report()}"


def test_a_traced_layer_still_compiles_as_one_graph():
    torch._dynamo.reset()
    layer = make_layer()
    side = MoESideInputs(trace=True)
    explained = torch._dynamo.explain(lambda x: layer(x, side).route.idx_TK)(torch.randn(16, 32))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_the_record_marks_the_pairs_a_receive_budget_spilled():
    cfg = MoEConfig.from_dict(dict(d_model=32, d_ff=64, num_experts=8, top_k=2, dropless=True,
                                   rank_capacity_factor=1.0, overflow="spill"))
    layer = MoELayer(cfg, seed=0).train()
    with torch.no_grad():  # a hot expert: every token's first choice is expert 0, whose rank overflows
        layer.router.gate.weight_ED[0] += 5.0
    out = layer(torch.randn(40, 32).abs(), MoESideInputs(trace=True, budget_ranks=4))
    assert out.route.spilled_TK.any()
    assert int(out.route.spilled_TK.sum()) == int(out.stats["pairs_spilled"])
