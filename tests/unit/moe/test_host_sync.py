"""The MoE layer's host-sync budget at EP 1 (issue 21): a forward and backward read nothing from
the device, counted by `HostSyncCensus` on CPU, for the backend GPUs use (`grouped_mm`, bf16) and
the CPU default (`auto`, fp32: its kernels read their split sizes inside the op, under
`host_sync.allowed()`). EP 2 (one read per forward): tests/distributed/test_host_sync_ep.py."""

from __future__ import annotations

import pytest
import torch
from tests.harness.host_sync import census_of_backward, census_of_layer_step

from moe_dist.common.host_sync import HostSyncCensus
from moe_dist.moe.config import MoEConfig
from moe_dist.moe.layer import MoELayer, MoESideInputs

ROUTERS = [
    {"type": "topk"},
    {"type": "topk", "bias_balancing": True, "score": "sigmoid", "renormalize": True},
    {"type": "topk", "bias_balancing": True, "score": "sigmoid", "expert_groups": 4, "topk_groups": 2},
    *[{"type": "inhibition", "mode": mode} for mode in ("subtractive", "divisive", "rectified", "subspace")],
    {"type": "inhibition", "mode": "subtractive", "stat": "batch"},
    {"type": "fixed_projection"},
    {"type": "fixed_projection", "source": "embedding", "center": True},
    {"type": "attentive"},
    {"type": "hash", "vocab_size": 50},
]
MODES = [dict(capacity_factor=1.0, min_capacity=1), dict(dropless=True)]


def census_of_step(impl: str, dtype: torch.dtype, router: dict, mode: dict, budget_ranks: int = 0,
                   **extra) -> tuple[HostSyncCensus, ...]:
    cfg = MoEConfig.from_dict(dict(d_model=64, d_ff=128, num_experts=8, top_k=2, expert_impl=impl, router=router,
                                   aux_loss=dict(switch=0.01, z_loss=0.001, importance=0.01), **mode, **extra))
    layer = MoELayer(cfg, seed=0).to(dtype)
    torch.manual_seed(0)
    x = torch.randn(32, 64, dtype=dtype, requires_grad=True)
    side = MoESideInputs(stream_TD=torch.randn(32, 64, dtype=dtype), labels_T=torch.randint(-1, 3, (32,)),
                         num_labels=3, token_ids_T=torch.randint(0, 50, (32,)), budget_ranks=budget_ranks)
    layer(x, side)  # the first call: one-time work (kernel self-checks) is no step's
    out, forward, backward = census_of_layer_step(layer, x, side)
    # What a step needs must be there: the layer ran and every gradient flows.
    assert x.grad is not None and layer.router.training
    assert float(out.stats["dropped_fraction"]) == 0.0 or not mode.get("dropless")
    return forward, backward


@pytest.mark.parametrize("mode", MODES, ids=["capacity", "dropless"])
@pytest.mark.parametrize("router", ROUTERS, ids=lambda r: "-".join(str(v) for v in r.values()))
def test_gpu_backend_reads_nothing_from_the_device(router, mode):
    forward, backward = census_of_step("grouped_mm", torch.bfloat16, router, mode)
    assert forward.count == 0, f"forward:\n{forward.report()}"
    assert backward.count == 0, f"backward:\n{backward.report()}"


@pytest.mark.parametrize("mode", MODES, ids=["capacity", "dropless"])
def test_cpu_default_backend_reads_only_inside_its_op(mode):
    forward, backward = census_of_step("auto", torch.float32, {"type": "topk"}, mode)
    assert forward.count == 0, f"forward:\n{forward.report()}"
    assert backward.count == 0, f"backward:\n{backward.report()}"


@pytest.mark.parametrize("overflow", ["drop", "spill"])
def test_bounded_dispatch_reads_nothing(overflow):
    """The receive budget over budget (cf 1.0 of a rank's fair share, budgeted as over 4 ranks: some
    pairs overflow, some spill) reads nothing under drop and spill; only `error` may
    read (moe/rank_budget.py)."""
    forward, backward = census_of_step("grouped_mm", torch.bfloat16, {"type": "topk"}, MODES[0], budget_ranks=4,
                                       rank_capacity_factor=1.0, overflow=overflow, spill_choices=3)
    assert forward.count == backward.count == 0, f"{forward.report()}\n{backward.report()}"


def test_expert_mask_and_shared_expert_read_nothing():
    forward, backward = census_of_step("grouped_mm", torch.bfloat16, {"type": "topk"}, MODES[0],
                                       comet_active_fraction=0.25, num_shared_experts=1, shared_gate=True)
    assert forward.count == backward.count == 0, f"{forward.report()}\n{backward.report()}"


def test_the_backward_census_sees_a_read_in_a_custom_backward():
    class ReadsInBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            grad.sum().item()
            return grad * 2

    y = ReadsInBackward.apply(torch.ones(3, requires_grad=True)).sum()
    with census_of_backward(HostSyncCensus()) as backward:
        y.backward()
    assert backward.kinds["item"] == 1, backward.report()


def test_the_census_sees_a_read_in_the_layer(monkeypatch):
    """The budget above is not vacuous: a read put back into the layer's path is counted there."""
    from moe_dist.moe import capacity
    real = capacity._count
    monkeypatch.setattr(capacity, "_count", lambda ids, size, w=None: torch.bincount(ids, w, minlength=size)
                        if w is None else real(ids, size, w))
    forward, _ = census_of_step("grouped_mm", torch.bfloat16, {"type": "topk"}, MODES[0])
    assert forward.kinds["bincount"] == 2, forward.report()


@pytest.mark.parametrize("scope", ["micro_batch", "sequence", "global_batch"])
def test_balance_scopes_and_padding_mask_read_nothing(scope):
    """The scoped balance losses, the padding mask, packed documents and the running step counts
    add no read (dp_global, the default, is every case above)."""
    cfg = MoEConfig.from_dict(dict(d_model=64, d_ff=128, num_experts=8, top_k=2, expert_impl="grouped_mm",
                                   capacity_factor=1.0, min_capacity=1,
                                   aux_loss=dict(switch=0.01, z_loss=0.001, importance=0.01, switch_scope=scope,
                                                 importance_scope=scope)))
    layer = MoELayer(cfg, seed=0).to(torch.bfloat16)
    torch.manual_seed(0)
    x = torch.randn(4, 8, 64, dtype=torch.bfloat16, requires_grad=True)
    valid = torch.arange(8)[None, :] < torch.tensor([8, 5, 0, 3])[:, None]
    first = layer(x, MoESideInputs(valid_T=valid.reshape(-1)))
    side = MoESideInputs(valid_T=valid.reshape(-1), segment_ids_T=(torch.arange(32) % 8 >= 4).long(),
                         step_counts=None if first.step_counts is None else {0: first.step_counts})
    out, forward, backward = census_of_layer_step(layer, x, side)
    assert x.grad is not None and (out.step_counts is not None) == (scope == "global_batch")
    assert forward.count == 0, f"forward:\n{forward.report()}"
    assert backward.count == 0, f"backward:\n{backward.report()}"
