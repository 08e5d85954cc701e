"""The one op (`moe_dist.kernels.grouped_mm`, `gather_grouped_mm`) under every backend: results,
the backend choice, the refusals, and the memory the gather-fused first projection saves."""

import pytest
import torch
from gemm_check import needs_mkl, peak_mib

from moe_dist.kernels import grouped_mm
from moe_dist.kernels.cpu import mkl_grouped
from moe_dist.moe.config import MoEConfig
from moe_dist.moe.layer import MoELayer


def cfg(**kw) -> MoEConfig:
    base = dict(d_model=16, d_ff=32, num_experts=8, top_k=2, min_capacity=1)
    return MoEConfig.from_dict({**base, **kw})


@pytest.mark.parametrize("impl,width", [("grouped_mm", 8), ("loop", 8), ("mkl", 8), ("mkl", 5),
                                        ("auto", 8), ("auto", 5)])
def test_grouped_mm_matches_per_expert_matmul(impl, width):
    # width 5 (20-byte rows) is not 16-byte aligned: "auto" must fall back instead of failing.
    x = torch.randn(11, 4)
    w = torch.randn(3, 4, width)
    counts = [4, 0, 7]  # an expert with no rows
    y = grouped_mm(x, w, counts, impl)
    torch.testing.assert_close(y, torch.cat([x[:4] @ w[0], x[4:] @ w[2]]))


def _peak_step_mib(layer: MoELayer, x: torch.Tensor) -> float:
    """Peak bytes held by tensors allocated during one forward+backward (profiler events)."""
    return peak_mib(lambda: layer(x).y.square().sum().backward())


@needs_mkl
def test_fused_gather_lowers_the_layers_peak_memory():
    """The reason for `gather_grouped_mm`: on the CPU backend the backward no longer holds the
    k-fold gathered input and its gradient next to the expert weight gradients."""
    peaks = {}
    for impl in ("mkl", "grouped_mm"):
        layer = MoELayer(cfg(d_model=64, d_ff=128, top_k=2, expert_impl=impl), seed=0)
        x = torch.randn(1024, 64, requires_grad=True)
        _peak_step_mib(layer, x)  # warm: lazy one-time allocations are not the step's
        peaks[impl] = _peak_step_mib(layer, x)
    # At the peak the plain path also holds the gathered input and its gradient (2 x 0.5 MiB,
    # 2048 rows x 64); the fused one holds the source's gradient (0.25 MiB) and a chunk instead.
    assert peaks["mkl"] <= peaks["grouped_mm"] - 0.4, peaks


def test_mkl_impl_is_refused_at_build_without_mkl(monkeypatch):
    monkeypatch.setattr(mkl_grouped, "available", lambda x, w: False)
    with pytest.raises(ValueError, match="expert_impl 'mkl'"):
        MoELayer(cfg(expert_impl="mkl"), seed=0)
    MoELayer(cfg(expert_impl="auto"), seed=0)  # auto falls back


def test_mkl_impl_refuses_what_it_cannot_run():
    with pytest.raises(RuntimeError, match="expert_impl 'mkl'"):
        grouped_mm(torch.randn(3, 4, dtype=torch.float64), torch.randn(1, 4, 4, dtype=torch.float64), [3], "mkl")
    with pytest.raises(ValueError, match="must sum to the 3 rows"):
        mkl_grouped.segment_matmul(torch.randn(3, 4), torch.randn(2, 4, 4), [1, 1])
