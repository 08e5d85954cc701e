"""The one op (`moe_dist.kernels.grouped_mm`, `gather_grouped_mm`) under every backend: results,
the backend choice, the refusals, and the memory the gather-fused first projection saves."""

import pytest
import torch
from tests.harness.gemm_check import needs_mkl

from moe_dist.common.config import ConfigError
from moe_dist.common.host_sync import HostSyncCensus
from moe_dist.common.tensor_memory import peak_tensor_mb
from moe_dist.kernels import gather_grouped_mm, grouped_mm
from moe_dist.kernels import portable
from moe_dist.kernels.cpu import avx512_gemm, mkl_grouped
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
    return peak_tensor_mb(lambda: layer(x).y.square().sum().backward())


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
    with pytest.raises(ConfigError, match="moe.expert_impl 'mkl': this PyTorch build has no usable MKL"):
        MoELayer(cfg(expert_impl="mkl"), seed=0)
    MoELayer(cfg(expert_impl="auto"), seed=0)  # auto falls back


def test_mkl_impl_refuses_what_it_cannot_run():
    with pytest.raises(ConfigError, match="moe.expert_impl 'mkl' needs fp32 CPU tensors"):
        grouped_mm(torch.randn(3, 4, dtype=torch.float64), torch.randn(1, 4, 4, dtype=torch.float64), [3], "mkl")
    with pytest.raises(ValueError, match="must sum to the 3 rows"):
        mkl_grouped.segment_matmul(torch.randn(3, 4), torch.randn(2, 4, 4), [1, 1])


def _per_expert_loop(x: torch.Tensor, w: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """The reference: one matmul per expert over its rows."""
    starts = [sum(counts[:j]) for j in range(len(counts))]
    return torch.cat([x[s:s + c] @ w[j] for j, (s, c) in enumerate(zip(starts, counts))])


def _count_calls(monkeypatch, module, name: str) -> list:
    """Record each call of `module.name` (still made) in the returned list."""
    calls, real = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a: (calls.append(1), real(*a))[1])
    return calls


# Every backend usable here, as (moe.expert_impl, AVX-512 kernels on): `mkl` twice, once with
# MKL's batch GEMM alone and once with the AVX-512 kernels where they build.
BACKEND_CASES = [("loop", False), ("grouped_mm", False), ("mkl", False), ("mkl", True), ("auto", True)]


@pytest.mark.parametrize("backend,avx512", BACKEND_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("in_width,out_width", [(64, 128), (13, 21)])  # the kernels' widths; odd ones
@pytest.mark.parametrize("counts", [[7, 0, 19, 1, 0, 12], [0, 0, 0]], ids=["some_empty", "all_empty"])
@pytest.mark.parametrize("gather", [False, True], ids=["grouped_mm", "gather_grouped_mm"])
def test_every_backend_matches_the_loop(monkeypatch, backend, avx512, in_width, out_width, counts, gather):
    """Forward, input gradient and weight gradients of both ops, each backend against the
    per-expert loop, with empty experts and widths no kernel is tuned for; and the backend that
    was asked for is the one that ran."""
    cpu_backend = backend in ("mkl", "auto") and mkl_grouped.available(torch.randn(1, 4), torch.randn(1, 4, 4))
    if backend == "mkl" and not cpu_backend:
        pytest.skip("this PyTorch build has no usable MKL batch GEMM")
    if backend == "grouped_mm" and (not hasattr(torch, "_grouped_mm") or in_width % 4 or out_width % 4):
        pytest.skip("torch._grouped_mm takes 16-byte aligned rows only")
    if avx512 and not (avx512_gemm._library() is not None and avx512_gemm._self_check()):
        pytest.skip("no AVX-512 CPU, no C compiler or a failed self-check here")
    if not avx512:
        monkeypatch.setattr(avx512_gemm, "_library", lambda: None)
    else:  # on wherever they build, not only where this machine's trial picks them over MKL
        monkeypatch.setenv("MOE_DIST_AVX512_GEMM", "1")
    ran = {"mkl": _count_calls(monkeypatch, mkl_grouped, "_call"),
           "avx512": _count_calls(monkeypatch, avx512_gemm, "_run")}

    g = torch.Generator().manual_seed(in_width * 100 + len(counts))
    rows, experts = sum(counts), len(counts)
    source = torch.randn(max(rows // 2, 1), in_width, generator=g)  # top-2-like: rows repeat
    index = torch.randint(0, source.shape[0], (rows,), generator=g)
    w = torch.randn(experts, in_width, out_width, generator=g)
    grad_y = torch.randn(rows, out_width, generator=g)
    results = []
    for run in ("op", "reference"):
        s, wi = source.clone().requires_grad_(), w.clone().requires_grad_()
        if run == "reference":
            y = _per_expert_loop(s.index_select(0, index), wi, counts)
        elif gather:
            y = gather_grouped_mm(s, index, wi, counts, backend)
        else:
            y = grouped_mm(s.index_select(0, index), wi, counts, backend)
        y.backward(grad_y)
        results.append((y, s.grad, wi.grad))
    for name, got, want in zip(("output", "input gradient", "weight gradient"), *results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    empty = torch.tensor(counts) == 0
    assert torch.equal(results[0][2][empty], torch.zeros_like(w[empty]))

    calls = {name: len(c) for name, c in ran.items()}
    if not cpu_backend:
        assert calls == {"mkl": 0, "avx512": 0}, calls
    elif rows:  # one call per product: forward, input gradient, weight gradient
        kernels_take_widths = in_width % 16 == 0 and out_width % 64 == 0
        assert calls["avx512"] == (3 if avx512 and kernels_take_widths else 0), calls
        assert calls["mkl"] == (0 if calls["avx512"] else 3), calls


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="no torch._grouped_mm in this PyTorch")
def test_the_gpu_kernels_read_nothing_and_zero_the_rows_past_the_counts():
    """What runs inside the op on a GPU (`portable.grouped`, `grouped_outer`: the census cannot see
    inside a custom op, so they are counted here directly) takes the counts on the device and
    never reads them; rows past the last segment come out zero, not as stale memory."""
    x, w, grad = torch.randn(12, 16), torch.randn(3, 16, 8), torch.randn(12, 8)
    counts = torch.tensor([4, 0, 5])  # rows 9..11 are past the segments
    with HostSyncCensus() as census:
        y = portable.grouped(x, w, counts)
        dx = portable.grouped(grad, w, counts, transpose_w=True)
        dw = portable.grouped_outer(x, grad, counts)
    assert census.count == 0, census.report()
    torch.testing.assert_close(y, torch.cat([x[:4] @ w[0], x[4:9] @ w[2], torch.zeros(3, 8)]))
    torch.testing.assert_close(dx, torch.cat([grad[:4] @ w[0].t(), grad[4:9] @ w[2].t(), torch.zeros(3, 16)]))
    torch.testing.assert_close(dw, torch.stack([x[:4].t() @ grad[:4], torch.zeros(16, 8), x[4:9].t() @ grad[4:9]]))


@pytest.mark.parametrize("backend", ["loop", "grouped_mm", "auto"])
def test_rows_past_the_counts_are_zero_in_output_and_gradient(backend):
    """The layer's dropped pairs at EP 1: rows of the gather index past sum(counts) are neither
    multiplied nor given a gradient, even when they point at rows with non-finite values."""
    source = torch.randn(6, 16)
    source[5] = float("nan")  # only rows past the counts gather it
    index = torch.tensor([0, 1, 2, 3, 4, 5, 5])
    counts = torch.tensor([2, 3])
    w = torch.randn(2, 16, 16)
    s, wi = source.clone().requires_grad_(), w.clone().requires_grad_()
    y = gather_grouped_mm(s, index, wi, counts, backend)
    assert torch.equal(y[5:], torch.zeros(2, 16))
    y.backward(torch.randn(7, 16))
    assert torch.isfinite(wi.grad).all() and torch.equal(s.grad[5], torch.zeros(16))
    ref = torch.cat([source[:2] @ w[0], source[2:5] @ w[1]])
    torch.testing.assert_close(y[:5], ref, rtol=1e-5, atol=1e-5)
