"""The CPU backend's AVX-512 expert GEMMs (`moe_dist/kernels/cpu/avx512_gemm.py`): every kernel
against torch.mm on shapes with row and column tails, empty and skipped experts and shared
weights; the `mkl` backend really using them; and the fallback to MKL when they cannot be built."""

import pytest
import torch
from tests.harness.gemm_check import assert_mkl_matches_the_loop

from moe_dist.kernels.cpu import avx512_gemm, mkl_grouped

needs_kernels = pytest.mark.skipif(avx512_gemm._library() is None,
                                   reason="no AVX-512 CPU or no C compiler here")


def _segments(counts: list[int]) -> tuple[torch.Tensor, torch.Tensor, list[slice]]:
    c = torch.tensor(counts)
    rows = c.clamp(min=0)
    starts = rows.cumsum(0) - rows
    return c, starts, [slice(s, s + r) for s, r in zip(starts.tolist(), rows.tolist())]


@needs_kernels
@pytest.mark.parametrize("in_width,out_width", [(48, 64), (16, 192), (96, 128)])
def test_kernels_match_torch_mm(in_width, out_width):
    g = torch.Generator().manual_seed(in_width + out_width)
    counts = [13, 0, 6, -1, 1, 25, 5]  # tails of the 6- and 4-row tiles, an empty and a skipped expert
    c, starts, segs = _segments(counts)
    n, e = sum(s.stop - s.start for s in segs), len(counts)
    x, dy = torch.randn(n, in_width, generator=g), torch.randn(n, out_width, generator=g)
    w_nn = torch.randn(e, in_width, out_width, generator=g)
    w_nt = torch.randn(e, out_width, in_width, generator=g)
    y_nn, y_nt = torch.full((n, out_width), 3.0), torch.full((n, out_width), 3.0)
    dw = torch.full((e, in_width, out_width), 7.0)
    avx512_gemm.segment_mm(x, w_nn, c, starts, False, y_nn)
    avx512_gemm.segment_mm(x, w_nt, c, starts, True, y_nt)
    avx512_gemm.segment_outer(x, dy, c, starts, dw)
    for j, seg in enumerate(segs):
        if counts[j] < 0:
            assert (dw[j] == 7.0).all()  # skipped: left to the caller
            continue
        torch.testing.assert_close(y_nn[seg], x[seg] @ w_nn[j], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(y_nt[seg], x[seg] @ w_nt[j].t(), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(dw[j], x[seg].t() @ dy[seg], rtol=1e-5, atol=1e-4)


@needs_kernels
def test_nt_takes_any_number_of_output_columns_and_shared_weights():
    c, starts, segs = _segments([5, 9])
    x, w = torch.randn(14, 32), torch.randn(70, 32)  # 70 weight rows: a tail of the 6-row tile
    y = torch.empty(14, 70)
    avx512_gemm.segment_mm(x, w.expand(2, 70, 32), c, starts, True, y)
    torch.testing.assert_close(y, x @ w.t(), rtol=1e-5, atol=1e-4)


@needs_kernels
def test_mkl_backend_runs_on_the_kernels(monkeypatch):
    """With widths the kernels take, `grouped_mm(backend='mkl')` computes the small segments with them
    (forward, input gradient, weight gradient) and agrees with the per-expert loop. Forced on:
    whether they beat MKL here is the per-machine choice's business (test_cpu_kernel_choice.py)."""
    monkeypatch.setenv("MOE_DIST_AVX512_GEMM", "1")
    calls = []
    for name in ("segment_mm", "segment_outer"):
        real = getattr(avx512_gemm, name)
        monkeypatch.setattr(avx512_gemm, name, lambda *a, _r=real, _n=name: (calls.append(_n), _r(*a))[1])
    assert_mkl_matches_the_loop(torch.randn(60, 64), torch.randn(4, 64, 128), [40, 0, 17, 3], atol=1e-4)
    assert calls == ["segment_mm", "segment_mm", "segment_outer"], calls


def test_a_failed_build_falls_back_to_mkl(monkeypatch, tmp_path):
    monkeypatch.setenv("MOE_DIST_CACHE_DIR", str(tmp_path))
    with pytest.raises(RuntimeError, match="no C compiler 'no-such-cc'"):
        avx512_gemm.build("no-such-cc")
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    avx512_gemm._library.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="false failed on avx512_gemm.c"):
            avx512_gemm.build()
        assert avx512_gemm._library() is None
        assert not avx512_gemm.available(torch.randn(2, 64), torch.randn(1, 64, 64), avx512_gemm.KIND_NN)
        assert list(tmp_path.iterdir()) == []  # no half-written library left behind
        if mkl_grouped.available(torch.randn(1, 4), torch.randn(1, 4, 4)):
            x, w = torch.randn(5, 64), torch.randn(2, 64, 64)
            torch.testing.assert_close(mkl_grouped.segment_mm(x, w, [2, 3], False),
                                       torch.cat([x[:2] @ w[0], x[2:] @ w[1]]), rtol=1e-5, atol=1e-5)
    finally:
        avx512_gemm._library.cache_clear()


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv("MOE_DIST_AVX512_GEMM", "0")
    avx512_gemm._library.cache_clear()
    try:
        assert avx512_gemm._library() is None
    finally:
        avx512_gemm._library.cache_clear()


@needs_kernels
def test_build_is_cached_and_atomic(monkeypatch, tmp_path):
    monkeypatch.setenv("MOE_DIST_CACHE_DIR", str(tmp_path))
    first = avx512_gemm.build()
    assert first.parent == tmp_path and avx512_gemm.build() == first
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # only the renamed library
