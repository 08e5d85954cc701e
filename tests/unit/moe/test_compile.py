"""`torch.compile(fullgraph=True)` takes the MoE layer whole at EP 1 (issue 21): no graph break
(no host read, no data-dependent shape), and the compiled layer computes what the eager one does,
outputs, losses, every gradient and the routers' buffers, within the dtype's tolerance.

Two representative cases run by default (topk; DeepSeek-V3's group-limited sigmoid routing); the
grid (capacity and dropless; topk, inhibition, fixed_projection, hash, group-limited; shared expert on
and off; fp32 and bf16) is `slow`: each case is an inductor
compile of a forward and a backward, tens of seconds on two cores."""

from __future__ import annotations

import dataclasses
import copy
import itertools

import pytest
import torch
import torch._dynamo

from moe_dist.moe.config import MoEConfig
from moe_dist.moe.layer import MoELayer, MoESideInputs

TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}
ROUTERS = {"topk": {"type": "topk"}, "inhibition": {"type": "inhibition"},
           "fixed_projection": {"type": "fixed_projection", "center": True, "weights": "softmax"},
           "hash": {"type": "hash", "vocab_size": 50},
           # DeepSeek-V3's: sigmoid, the selection bias, 2 of 4 expert groups, renormalized and scaled.
           "group_limited": {"type": "topk", "score": "sigmoid", "bias_balancing": True, "renormalize": True,
                             "scale": 2.5, "expert_groups": 4, "topk_groups": 2}}
MODES = {"capacity": dict(capacity_factor=1.0, min_capacity=1), "dropless": dict(dropless=True)}
# The receive budget (moe/rank_budget.py), budgeted as over 4 ranks (MoESideInputs.budget_ranks)
# at cf 1.0: some ranks overflow, others have room, so under spill pairs move.
BUDGET_MODES = {f"budget_{overflow}": dict(dropless=True, rank_capacity_factor=1.0, overflow=overflow)
                for overflow in ("drop", "spill")}
BUDGET_SIDE = MoESideInputs(budget_ranks=4)


def make_layer(router: str, mode: str, shared: bool, dtype: torch.dtype) -> MoELayer:
    cfg = MoEConfig.from_dict(dict(d_model=32, d_ff=64, num_experts=8, top_k=2, expert_impl="auto",
                                   router=ROUTERS[router], num_shared_experts=int(shared),
                                   aux_loss=dict(switch=0.01, z_loss=0.001), **{**MODES, **BUDGET_MODES}[mode]))
    return MoELayer(cfg, seed=0).to(dtype)


def _step(layer, x: torch.Tensor, g: torch.Tensor, side: MoESideInputs | None = None):
    x = x.clone().requires_grad_()
    # Token ids for the hash router (the other routers ignore them).
    token_ids = torch.arange(x.shape[0]) * 7 % 50
    out = layer(x, dataclasses.replace(side or MoESideInputs(), token_ids_T=token_ids))
    loss = (out.y.float() * g).sum()
    if out.aux_loss is not None:
        loss = loss + out.aux_loss
    loss.backward()
    return out, x.grad


def check_compiled_matches_eager(router: str, mode: str, shared: bool, dtype: torch.dtype,
                                 side: MoESideInputs | None = None) -> None:
    torch._dynamo.reset()
    eager = make_layer(router, mode, shared, dtype)
    compiled_layer = copy.deepcopy(eager)
    compiled = torch.compile(compiled_layer, fullgraph=True)
    torch.manual_seed(0)
    x, g = torch.randn(64, 32, dtype=dtype), torch.randn(64, 32)
    for _ in range(2):  # a second step: buffers folded in by the first (inhibition's EMA) are read
        out_e, dx_e = _step(eager, x, g, side)
        out_c, dx_c = _step(compiled, x, g, side)
    what = f"{router} {mode} shared={shared} {dtype}"
    tol = TOL[dtype]
    if mode == "budget_spill":
        assert float(out_e.stats["pairs_spilled"]) > 0, what
    torch.testing.assert_close(out_c.y, out_e.y, **tol, msg=lambda m: f"output {what}: {m}")
    torch.testing.assert_close(dx_c, dx_e, **tol, msg=lambda m: f"input gradient {what}: {m}")
    assert (out_c.aux_loss is None) == (out_e.aux_loss is None)
    if out_e.aux_loss is not None:
        torch.testing.assert_close(out_c.aux_loss, out_e.aux_loss, **tol)
    assert out_c.stats.keys() == out_e.stats.keys(), what
    for name, value in out_e.stats.items():
        torch.testing.assert_close(out_c.stats[name], value, **tol, msg=lambda m, n=name: f"stat {n} {what}: {m}")
    for (name, p_c), p_e in zip(compiled_layer.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p_c.grad, p_e.grad, **tol, msg=lambda m, n=name: f"grad of {n} {what}: {m}")
    for (name, b_c), b_e in zip(compiled_layer.named_buffers(), eager.buffers()):
        torch.testing.assert_close(b_c, b_e, **tol, msg=lambda m, n=name: f"buffer {n} {what}: {m}")


def test_layer_traces_as_one_graph():
    """`torch._dynamo.explain`: one graph, no break (before issue 21: 8 graphs, 7 breaks)."""
    for mode, dtype in (("capacity", torch.bfloat16), ("dropless", torch.float32)):
        torch._dynamo.reset()
        layer = make_layer("topk", mode, True, dtype)
        explained = torch._dynamo.explain(lambda x: layer(x).y)(torch.randn(16, 32, dtype=dtype))
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_hash_layer_traces_as_one_graph():
    """The table lookup by token id reads nothing from the device: no break."""
    torch._dynamo.reset()
    layer = make_layer("hash", "capacity", False, torch.float32)
    explained = torch._dynamo.explain(lambda x, ids: layer(x, MoESideInputs(token_ids_T=ids)).y)(
        torch.randn(16, 32), torch.arange(16) * 3 % 50)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_bounded_dispatch_traces_as_one_graph():
    for mode in BUDGET_MODES:
        torch._dynamo.reset()
        layer = make_layer("topk", mode, False, torch.float32)
        explained = torch._dynamo.explain(lambda x: layer(x, BUDGET_SIDE).y)(torch.randn(16, 32))
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_compiled_spill_matches_eager():
    check_compiled_matches_eager("topk", "budget_spill", False, torch.float32, BUDGET_SIDE)


@pytest.mark.parametrize("router", [{"type": "inhibition", "mode": "divisive"},
                                    {"type": "inhibition", "mode": "subspace", "stat": "batch"}], ids=str)
def test_inhibition_modes_compile_would_get_wrong_are_refused(router):
    """Their backward reads the EMA buffers the same forward updates, which AOTAutograd gets wrong
    (silently: wrong input gradients); eval, which updates nothing, is not refused."""
    torch._dynamo.reset()
    layer = MoELayer(MoEConfig.from_dict(dict(d_model=32, d_ff=64, num_experts=8, top_k=2, router=router)), seed=0)
    with pytest.raises(Exception, match="cannot be trained under torch.compile"):
        torch.compile(layer, fullgraph=True, backend="eager")(torch.randn(8, 32))
    layer.eval()
    torch.compile(layer, fullgraph=True, backend="eager")(torch.randn(8, 32))


FAST = [("topk", "capacity", True, torch.float32), ("group_limited", "dropless", True, torch.float32)]


@pytest.mark.parametrize("router,mode,shared,dtype", FAST, ids=str)
def test_compiled_layer_matches_eager(router, mode, shared, dtype):
    check_compiled_matches_eager(router, mode, shared, dtype)


GRID = [case for case in itertools.product(ROUTERS, MODES, (False, True), (torch.float32, torch.bfloat16))
        if case not in FAST]


@pytest.mark.slow
@pytest.mark.parametrize("router,mode,shared,dtype", GRID, ids=str)
def test_compiled_layer_matches_eager_grid(router, mode, shared, dtype):
    check_compiled_matches_eager(router, mode, shared, dtype)


@pytest.mark.parametrize("scope", ["micro_batch", "sequence", "global_batch"])
def test_balance_scopes_with_padding_trace_as_one_graph(scope):
    """The scoped balance losses with a padding mask, packed documents and running step counts
    keep the layer one graph (dp_global, the default, is the case above)."""
    from moe_dist.moe.layer import MoESideInputs

    torch._dynamo.reset()
    cfg = MoEConfig.from_dict(dict(d_model=32, d_ff=64, num_experts=8, top_k=2, expert_impl="auto",
                                   aux_loss=dict(switch=0.01, importance=0.01, switch_scope=scope,
                                                 importance_scope=scope), **MODES["capacity"]))
    layer = MoELayer(cfg, seed=0)
    valid = torch.arange(8)[None, :] < torch.tensor([8, 3])[:, None]
    side = MoESideInputs(valid_T=valid.reshape(-1), segment_ids_T=(torch.arange(16) % 8 >= 5).long(),
                         step_counts={0: {"tokens_per_expert": torch.ones(8), "importance": torch.ones(8)}})
    explained = torch._dynamo.explain(lambda x: layer(x, side).aux_loss)(torch.randn(2, 8, 32))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
