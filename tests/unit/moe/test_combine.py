"""`moe.dispatch.combine`: the weighted sum over a token's choices is fp32, in one fixed order, and
never reads a dropped pair's row (issue 21: eval determinism by construction)."""

from __future__ import annotations

import torch

from moe_dist.moe.capacity import assign_slots
from moe_dist.moe.config import MoEConfig
from moe_dist.moe.dispatch import combine, dispatch
from moe_dist.moe.layer import MoELayer
from moe_dist.parallel.groups import ParallelGroups


def _plan(idx_TK: torch.Tensor, num_experts: int, capacity: int | None):
    slots = assign_slots(idx_TK, num_experts, capacity)
    x_TD = torch.zeros(idx_TK.shape[0], 4)
    return dispatch(x_TD, idx_TK, slots.keep_TK, slots.kept_E, ParallelGroups.single())[2], slots


def test_choices_are_summed_in_fp32_for_bf16_rows():
    # bf16 spacing at 1.0 is 2^-7: summed in bf16, 1 + 2^-8 + 2^-8 rounds to 1 twice (ties to
    # even); in fp32 the sum is 1 + 2^-7, which bf16 holds exactly.
    idx_TK = torch.tensor([[0, 1, 2]])
    plan, _ = _plan(idx_TK, 3, None)
    rows = torch.tensor([1.0, 2.0 ** -8, 2.0 ** -8])  # the row of expert j (rows are in expert order)
    y_MD = rows[:, None].expand(3, 4).to(torch.bfloat16)
    w_TK = torch.ones(1, 3)
    out = combine(y_MD, w_TK, plan, ParallelGroups.single())
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, torch.full((1, 4), 1.0 + 2.0 ** -7, dtype=torch.bfloat16))
    # The weights stay fp32: 1 + 2^-9 is no bf16 number (it rounds to 1, and 1 + 2^-8 then ties
    # to 1); in fp32, 1 + 2^-9 + 2^-8 = 1 + 3 * 2^-9 rounds once, up to 1 + 2^-7.
    plan, _ = _plan(torch.tensor([[0, 1]]), 2, None)
    y_MD = torch.ones(2, 4, dtype=torch.bfloat16)
    out = combine(y_MD, torch.tensor([[1.0 + 2.0 ** -9, 2.0 ** -8]]), plan, ParallelGroups.single())
    assert torch.equal(out, torch.full((1, 4), 1.0 + 2.0 ** -7, dtype=torch.bfloat16))


def test_dropped_pairs_rows_never_leak_even_when_not_finite():
    torch.manual_seed(0)
    idx_TK = torch.randint(0, 4, (16, 2))
    plan, slots = _plan(idx_TK, 4, capacity=2)
    assert not bool(slots.keep_TK.all())
    kept = int(slots.kept_E.sum())
    y_MD = torch.randn(32, 8)
    y_MD[kept:] = float("nan")  # the dropped pairs' rows, past the kept ones
    y_MD.requires_grad_()
    w_TK = torch.rand(16, 2, requires_grad=True)
    out = combine(y_MD, w_TK, plan, ParallelGroups.single())
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(y_MD.grad).all() and torch.isfinite(w_TK.grad).all()
    assert torch.equal(y_MD.grad[kept:], torch.zeros_like(y_MD.grad[kept:]))
    assert torch.equal(w_TK.grad[~slots.keep_TK], torch.zeros(int((~slots.keep_TK).sum())))
    # The kept pairs' sum is the reference's.
    ref = torch.zeros(16, 8, dtype=torch.float64)
    rank = plan.rank_TK
    for t in range(16):
        for k in range(2):
            if slots.keep_TK[t, k]:
                ref[t] += w_TK[t, k].double() * y_MD[rank[t, k]].double()
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-6, atol=1e-6)


def test_combine_gradients_match_autograd_reference():
    torch.manual_seed(1)
    idx_TK = torch.randint(0, 4, (12, 3))
    plan, slots = _plan(idx_TK, 4, capacity=5)
    y = torch.randn(36, 6, dtype=torch.float64, requires_grad=True)
    w = torch.rand(12, 3, dtype=torch.float64, requires_grad=True)
    g = torch.randn(12, 6, dtype=torch.float64)
    combine(y, w, plan, ParallelGroups.single()).backward(g)
    y_ref, w_ref = y.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    rows = y_ref[plan.rank_TK.reshape(-1)].view(12, 3, 6)
    ((rows * (w_ref * slots.keep_TK)[..., None]).sum(1)).backward(g)
    torch.testing.assert_close(y.grad, y_ref.grad)
    torch.testing.assert_close(w.grad, w_ref.grad)


def test_layer_is_bit_exact_across_repeated_runs():
    for dtype in (torch.float32, torch.bfloat16):
        layer = MoELayer(MoEConfig.from_dict(dict(d_model=32, d_ff=64, num_experts=8, top_k=2, min_capacity=1,
                                                  capacity_factor=1.0, expert_impl="grouped_mm")), seed=0).to(dtype)
        x = torch.randn(64, 32, dtype=dtype)
        runs = []
        for _ in range(3):
            xi = x.clone().requires_grad_()
            out = layer(xi)
            out.y.float().sum().backward()
            runs.append((out.y, xi.grad, *(p.grad.clone() for p in layer.parameters())))
            layer.zero_grad()
        for run in runs[1:]:
            assert all(torch.equal(a, b) for a, b in zip(runs[0], run)), dtype
