"""Grouped GEMM on CPU through MKL's batch API: the experts' GEMMs run side by side.

Operands as in `moe_dist.kernels`: `x` [rows, in_width] grouped by expert (`counts[j]` rows for
expert j), `w_stack` [experts, in_width, out_width].

Why: `torch._grouped_mm` on CPU is a loop of matmuls, each split over every thread, and with the
few rows per expert of a many-expert layer such small multi-threaded GEMMs spend their time
splitting and synchronising rather than computing. MKL's `cblas_sgemm_batch` takes all the
experts' GEMMs in one call and gives whole GEMMs to threads. Small segments go to our own AVX-512
kernels where they build (`avx512_gemm`: MKL packs each weight before computing with it, they
read it in place and prefetch the next), else to MKL's batch call. Segments that fill every
thread on their own run as GEMMs of their own, split over every thread as one dense GEMM is:
whole GEMMs per thread, and kernels built for few rows, lose there. The measurements behind
these choices and constants: BENCHMARKS.md, "Kernel tuning constants".

PyTorch's CPU wheels link MKL statically into libtorch_cpu and export its CBLAS symbols; this
module calls them with ctypes. Where the symbol is missing (other BLAS builds, other platforms) or
the one-time self-check disagrees with `torch.mm`, `available()` is False and `moe_dist.kernels`
picks the portable backend instead. fp32 only: MKL has no bf16 batch GEMM with this interface.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

import torch
from torch import Tensor

from moe_dist.kernels.cpu import avx512_gemm

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112
_INT32_MAX = 2**31 - 1


@functools.cache
def _sgemm_batch():
    """The `cblas_sgemm_batch` function of the MKL inside libtorch_cpu, or None."""
    if not sys.platform.startswith("linux") or not torch.backends.mkl.is_available():
        return None
    path = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    try:
        fn = ctypes.CDLL(path).cblas_sgemm_batch
    except (OSError, AttributeError):
        return None
    p = ctypes.c_void_p
    fn.argtypes = [ctypes.c_int] + [p] * 13 + [ctypes.c_int, p]
    fn.restype = None
    return fn


@functools.cache
def _self_check() -> bool:
    """Run one small grouped product (including an empty group) and compare with torch.mm, so a
    BLAS whose integer width or layout differs from what we declare is never used for real."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(7, 3, generator=g), torch.randn(3, 3, 5, generator=g)
    sizes, starts = _row_starts([4, 0, 3])
    every = torch.arange(3)
    y, dw = torch.empty(7, 5), torch.zeros(3, 3, 5)
    _mkl_mm(x, w, sizes, starts, every, False, y)
    _mkl_outer(x, y, sizes, starts, every, dw)
    ref_y = torch.cat([x[:4] @ w[0], x[4:] @ w[2]])
    ref_dw = torch.stack([x[:4].t() @ ref_y[:4], torch.zeros(3, 5), x[4:].t() @ ref_y[4:]])
    return torch.allclose(y, ref_y, atol=1e-5) and torch.allclose(dw, ref_dw, atol=1e-4)


def available(x: Tensor, w: Tensor) -> bool:
    """Whether `segment_matmul(x, w, ...)` can run here: fp32 CPU tensors, dimensions that fit
    MKL's 32-bit integers (LP64 interface), and an MKL that passed the self-check."""
    if x.device.type != "cpu" or w.device.type != "cpu":
        return False
    if x.dtype != torch.float32 or w.dtype != torch.float32:
        return False
    if max(*x.shape, *w.shape) > _INT32_MAX:
        return False
    return _sgemm_batch() is not None and _self_check()


def _call(trans_a: bool, trans_b: bool, m: Tensor, n: Tensor, k: Tensor, a_ptr: Tensor, lda: int,
          b_ptr: Tensor, ldb: int, c_ptr: Tensor, ldc: int) -> None:
    """One `cblas_sgemm_batch` call with one group per GEMM: C_j = op(A_j) @ op(B_j), row-major.

    Every argument array lives until the call returns (ctypes sees only raw addresses)."""
    groups = m.numel()
    i32 = functools.partial(torch.full, (groups,), dtype=torch.int32)
    arrays = dict(
        ta=i32(_TRANS if trans_a else _NO_TRANS), tb=i32(_TRANS if trans_b else _NO_TRANS),
        m=m.to(torch.int32), n=n.to(torch.int32), k=k.to(torch.int32),
        alpha=torch.ones(groups), beta=torch.zeros(groups),
        lda=i32(lda), ldb=i32(ldb), ldc=i32(ldc), size=i32(1),
        a=a_ptr.to(torch.int64), b=b_ptr.to(torch.int64), c=c_ptr.to(torch.int64))
    ptr = {name: t.data_ptr() for name, t in arrays.items()}
    _sgemm_batch()(_ROW_MAJOR, ptr["ta"], ptr["tb"], ptr["m"], ptr["n"], ptr["k"], ptr["alpha"],
                   ptr["a"], ptr["lda"], ptr["b"], ptr["ldb"], ptr["beta"], ptr["c"], ptr["ldc"],
                   groups, ptr["size"])


# A segment of at least this many rows per thread is a GEMM of its own, split over every thread:
# it fills them all, as one dense GEMM does. Smaller ones go to one batch call (whole GEMMs per
# thread), where separate multi-threaded GEMMs would each be too small to split well.
OWN_GEMM_ROWS_PER_THREAD = 512


def _own_gemm_rows() -> int:
    return OWN_GEMM_ROWS_PER_THREAD * torch.get_num_threads()


def _split_by_size(sizes: Tensor) -> tuple[list[int], Tensor]:
    """(experts whose segment is a GEMM of its own, the mask of the others)."""
    own = sizes >= _own_gemm_rows()
    return own.nonzero().flatten().tolist(), ~own


def _mkl_mm(x: Tensor, w_stack: Tensor, sizes: Tensor, starts: Tensor, experts: Tensor,
            transpose_w: bool, out: Tensor) -> None:
    """MKL's batch call for `experts`' segments of `segment_mm` (operands already checked)."""
    in_width, out_width, size, groups = x.shape[1], out.shape[1], x.element_size(), experts.numel()
    _call(False, transpose_w, sizes[experts], torch.full((groups,), out_width),
          torch.full((groups,), in_width),
          x.data_ptr() + starts[experts] * (in_width * size), in_width,
          w_stack.data_ptr() + experts * (w_stack.stride(0) * size), w_stack.shape[2],
          out.data_ptr() + starts[experts] * (out_width * size), out_width)


def _mkl_outer(x: Tensor, grad: Tensor, sizes: Tensor, starts: Tensor, experts: Tensor,
               out: Tensor) -> None:
    """MKL's batch call for `experts`' weight gradients of `segment_outer`."""
    in_width, out_width, size, groups = x.shape[1], grad.shape[1], x.element_size(), experts.numel()
    _call(True, False, torch.full((groups,), in_width), torch.full((groups,), out_width), sizes[experts],
          x.data_ptr() + starts[experts] * (in_width * size), in_width,
          grad.data_ptr() + starts[experts] * (out_width * size), out_width,
          out.data_ptr() + experts * (out.stride(0) * size), out_width)


def _row_starts(counts: list[int]) -> tuple[Tensor, Tensor]:
    """(rows per segment, first row of each segment)."""
    sizes = torch.tensor(counts, dtype=torch.int64)
    return sizes, sizes.cumsum(0) - sizes


def _matrices_contiguous(stack: Tensor) -> bool:
    """Each expert's matrix is row-major and dense; the experts' stride is free (BLAS gets one
    pointer per expert), so an expanded (stride-0) or sliced stack needs no copy."""
    return stack.stride(2) == 1 and stack.stride(1) == stack.shape[2]


def segment_mm(x: Tensor, w_stack: Tensor, counts: list[int], transpose_w: bool,
               out: Tensor | None = None) -> Tensor:
    """y[segment j] = x[segment j] @ w_stack[j] (or @ w_stack[j].T, with w_stack stored
    [experts, out_width, in_width]); into `out` (contiguous [rows, out_width]) when given. No
    autograd: `segment_matmul` is the differentiable op."""
    x = x.contiguous()
    w_stack = w_stack if _matrices_contiguous(w_stack) else w_stack.contiguous()
    out_width = w_stack.shape[1] if transpose_w else w_stack.shape[2]
    y = torch.empty(x.shape[0], out_width, dtype=x.dtype) if out is None else out
    if not y.is_contiguous() or y.shape != (x.shape[0], out_width):
        raise ValueError(f"out must be a contiguous [{x.shape[0]}, {out_width}] tensor, got {tuple(y.shape)}")
    if y.numel() == 0:
        return y
    sizes, starts = _row_starts(counts)
    own, small = _split_by_size(sizes)
    for j in own:
        seg = slice(int(starts[j]), int(starts[j] + sizes[j]))
        torch.mm(x[seg], w_stack[j].t() if transpose_w else w_stack[j], out=y[seg])
    if not small.any():
        return y
    kind = avx512_gemm.KIND_NT if transpose_w else avx512_gemm.KIND_NN
    if avx512_gemm.available(x, w_stack, kind):
        avx512_gemm.segment_mm(x, w_stack, torch.where(small, sizes, -1), starts, transpose_w, y)
    else:
        _mkl_mm(x, w_stack, sizes, starts, small.nonzero().flatten(), transpose_w, y)
    return y


def segment_outer(x: Tensor, grad: Tensor, counts: list[int], out: Tensor | None = None) -> Tensor:
    """dw[j] = x[segment j].T @ grad[segment j], zero for an expert with no rows; into `out`
    (contiguous [experts, in_width, out_width]) when given. No autograd (the weight gradient of
    `segment_matmul`)."""
    x, grad = x.contiguous(), grad.contiguous()
    shape = (len(counts), x.shape[1], grad.shape[1])
    dw = torch.empty(shape, dtype=x.dtype) if out is None else out
    if dw.shape != shape or not dw.is_contiguous():
        raise ValueError(f"out must be a contiguous {list(shape)} tensor, got shape {tuple(dw.shape)} "
                         f"strides {dw.stride()}")
    if x.shape[0] == 0:
        return dw.zero_()
    return outer_products(x, grad, counts, dw)


def outer_products(x: Tensor, grad: Tensor, counts: list[int], out: Tensor) -> Tensor:
    """`segment_outer`'s products without its checks: `x` and `grad` contiguous, `out` any
    [experts, in_width, out_width] stack whose matrices are each dense, in any expert stride."""
    sizes, starts = _row_starts(counts)
    own, small = _split_by_size(sizes)
    for j in own:
        seg = slice(int(starts[j]), int(starts[j] + sizes[j]))
        torch.mm(x[seg].t(), grad[seg], out=out[j])
    if not small.any():
        return out
    if avx512_gemm.available(x, out, avx512_gemm.KIND_OUTER):  # zeroes its empty experts itself
        avx512_gemm.segment_outer(x, grad, torch.where(small, sizes, -1), starts, out)
        return out
    _mkl_outer(x, grad, sizes, starts, small.nonzero().flatten(), out)
    for j in (sizes == 0).nonzero().flatten().tolist():  # BLAS leaves C = beta * C for k = 0
        out[j].zero_()
    return out


class _SegmentMatmul(torch.autograd.Function):
    """y = x @ w per segment; backward: dx = grad @ w.T per segment, dw[j] = x_j.T @ grad_j."""

    @staticmethod
    def forward(ctx, x: Tensor, w_stack: Tensor, counts: list[int]) -> Tensor:
        ctx.save_for_backward(x, w_stack)
        ctx.counts = counts
        return segment_mm(x, w_stack, counts, transpose_w=False)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        x, w_stack = ctx.saved_tensors
        dx = segment_mm(grad, w_stack, ctx.counts, transpose_w=True) if ctx.needs_input_grad[0] else None
        dw = segment_outer(x, grad, ctx.counts) if ctx.needs_input_grad[1] else None
        return dx, dw, None


def _expert_chunks(counts: list[int], num_chunks: int, min_batch: int) -> list[tuple[int, int, int, int]]:
    """Contiguous runs of experts with at least `sum(counts) / num_chunks` rows each, as
    (first expert, end expert, first row, end row). A run also holds at least `min_batch` experts
    unless it ends in a segment large enough to be a GEMM of its own: each run is one batch call,
    and a call of few experts leaves threads idle at its end."""
    target = max(1, -(-sum(counts) // num_chunks))
    own_rows = _own_gemm_rows()
    chunks, e0, r0, r1 = [], 0, 0, 0
    for j, c in enumerate(counts):
        r1 += c
        full = r1 - r0 >= target and (j + 1 - e0 >= min_batch or c >= own_rows)
        if full or j == len(counts) - 1:
            chunks.append((e0, j + 1, r0, r1))
            e0, r0 = j + 1, r1
    return chunks


class _GatherSegmentMatmul(torch.autograd.Function):
    """y = source[index] @ w per segment; the backward never holds all of `source[index]`.

    With top-k routing `source[index]` holds k copies of each kept token, and the backward of a
    plain gather-then-GEMM keeps that copy, its gradient and the layer's weight gradients alive
    at once (the layer's peak memory). Here the backward regathers the rows a chunk of experts at
    a time and adds their input gradient straight into `source`'s rows. The forward gathers all
    rows at once: its copy lives only for the call and is half the size of the hidden activation
    the layer keeps anyway, while each extra batch call costs idle threads at its end.
    """

    # Two halves: more chunks lower the peak only a little (one chunk's gathered rows are a
    # small part of it), while every extra round of gather, GEMMs and index_add costs time.
    CHUNKS = 2
    # A chunk is one batch call per product, and a call of a few GEMMs leaves threads idle.
    MIN_EXPERTS_PER_CHUNK = 16

    @staticmethod
    def forward(ctx, source: Tensor, index: Tensor, w_stack: Tensor, counts: list[int]) -> Tensor:
        ctx.save_for_backward(source, index, w_stack)
        ctx.counts = counts
        return segment_mm(source.index_select(0, index), w_stack, counts, transpose_w=False)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        source, index, w_stack = ctx.saved_tensors
        d_source, dw = gather_segment_backward(grad, source, index, w_stack, ctx.counts, ctx.needs_input_grad[0],
                                               ctx.needs_input_grad[2])
        return d_source, None, dw, None


def gather_segment_backward(grad: Tensor, source: Tensor, index: Tensor, w_stack: Tensor, counts: list[int],
                            need_source: bool, need_w: bool) -> tuple[Tensor | None, Tensor | None]:
    """The gradients of `gather_segment_matmul` in source and weights (None where not needed),
    regathering the rows a chunk of experts at a time (see `_GatherSegmentMatmul`). Rows of
    `index` and `grad` past `sum(counts)` are not read. No autograd."""
    grad, w_stack = grad.contiguous(), w_stack.contiguous()
    d_source = torch.zeros_like(source) if need_source else None
    dw = torch.empty_like(w_stack) if need_w else None
    cls = _GatherSegmentMatmul
    for e0, e1, r0, r1 in _expert_chunks(counts, cls.CHUNKS, cls.MIN_EXPERTS_PER_CHUNK):
        chunk, rows = counts[e0:e1], index[r0:r1]
        if dw is not None:
            segment_outer(source.index_select(0, rows), grad[r0:r1], chunk, out=dw[e0:e1])
        if d_source is not None:
            # A temporary, not a name: a chunk's input gradient must be freed before the
            # next chunk's is computed, or two of them are alive at the layer's peak.
            d_source.index_add_(0, rows, segment_mm(grad[r0:r1], w_stack[e0:e1], chunk, transpose_w=True))
    return d_source, dw


def _check_counts(counts: list[int], rows: int, w_stack: Tensor) -> None:
    if sum(counts) != rows or len(counts) != w_stack.shape[0]:
        raise ValueError(f"counts {counts} must sum to the {rows} rows of x and have one entry "
                         f"per expert ({w_stack.shape[0]})")


def gather_segment_matmul(source: Tensor, index: Tensor, w_stack: Tensor, counts: list[int]) -> Tensor:
    """`segment_matmul(source[index], w_stack, counts)` with less memory in the backward
    (see `_GatherSegmentMatmul`). Callers check `available(source, w_stack)` first."""
    _check_counts(counts, index.numel(), w_stack)
    return _GatherSegmentMatmul.apply(source, index, w_stack, counts)


def segment_matmul(x: Tensor, w_stack: Tensor, counts: list[int]) -> Tensor:
    """Row segment j of `x` (counts[j] rows) times `w_stack[j]`, differentiable in both.
    Callers check `available(x, w_stack)` first."""
    _check_counts(counts, x.shape[0], w_stack)
    return _SegmentMatmul.apply(x, w_stack, counts)
