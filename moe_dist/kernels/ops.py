"""`grouped_mm` and `gather_grouped_mm` as custom ops (`moe_dist::...`), and the backend choice
behind them (see `moe_dist.kernels`).

Why custom ops (MegaBlocks' ops/ over backend/): the segments arrive as a device tensor, and a
backend that wants them on the host (the CPU backend's batch calls, the loop) reads them inside
the op, where the read is the kernel's own (`host_sync.allowed()`; free on CPU). The layer never
sees which backend ran, `torch.compile` sees one opaque op with a fake (shape-only) version and
no graph break, and the backward is one op too.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from moe_dist.common import host_sync
from moe_dist.common.config import ConfigError, check_choice
from moe_dist.kernels import portable
from moe_dist.kernels.cpu import mkl_grouped

BACKENDS = ("auto", "mkl", "grouped_mm", "loop")


def check_backend(backend: str) -> None:
    """Refuse, when the layer is built, a backend this process can never run: an `mkl` that
    would otherwise fail at the first step."""
    check_choice("moe.expert_impl", backend, BACKENDS)
    if backend == "mkl" and not mkl_grouped.available(torch.empty(1, 1), torch.empty(1, 1, 1)):
        raise ConfigError("moe.expert_impl 'mkl': this PyTorch build has no usable MKL batch GEMM "
                          "(use 'auto', 'grouped_mm' or 'loop')")


def pick(x: Tensor, w_stack: Tensor, backend: str) -> str:
    """The backend that runs these operands under `backend`: `auto` resolved by device, dtype and
    alignment; `mkl` refused where it cannot run."""
    check_choice("moe.expert_impl", backend, BACKENDS)
    if backend in ("auto", "mkl") and mkl_grouped.available(x, w_stack):
        return "mkl"
    if backend == "mkl":
        raise ConfigError(f"moe.expert_impl 'mkl' needs fp32 CPU tensors and PyTorch's MKL; got "
                          f"{x.dtype} on {x.device} (use 'auto')")
    if backend == "auto":
        return "grouped_mm" if portable.torch_grouped_mm_supported(x, w_stack) else "loop"
    return backend


# The kernels, by chosen backend. Every one leaves rows past the last segment zero.

def _mkl_counts(counts: Tensor, rows: int, experts: int) -> tuple[list[int], int]:
    with host_sync.allowed():  # the CPU backend's batch calls take host sizes; on CPU a free read
        host = counts.tolist()
    if len(host) != experts or sum(host) > rows or min(host, default=0) < 0:
        raise ValueError(f"counts {host} must have one entry >= 0 per expert ({experts}) and sum to at most "
                         f"the {rows} rows of x")
    return host, sum(host)


def _mkl_mm(x: Tensor, w_stack: Tensor, counts: Tensor, transpose_w: bool) -> Tensor:
    host, used = _mkl_counts(counts, x.shape[0], w_stack.shape[0])
    y = x.new_empty((x.shape[0], w_stack.shape[1] if transpose_w else w_stack.shape[2]))
    mkl_grouped.segment_mm(x[:used], w_stack, host, transpose_w, out=y[:used])
    return _zeroed_tail(y, used)


def _zeroed_tail(y: Tensor, used: int) -> Tensor:
    y[used:].zero_()
    return y


def _forward(x: Tensor, w_stack: Tensor, counts: Tensor, chosen: str, transpose_w: bool = False) -> Tensor:
    if chosen == "mkl":
        return _mkl_mm(x, w_stack, counts, transpose_w)
    if chosen == "grouped_mm":
        return portable.grouped(x, w_stack, counts, transpose_w)
    return portable.loop(x, w_stack, counts, transpose_w)


def _outer(x: Tensor, grad: Tensor, counts: Tensor, chosen: str) -> Tensor:
    if chosen == "mkl":
        host, used = _mkl_counts(counts, x.shape[0], counts.shape[0])
        return mkl_grouped.segment_outer(x[:used], grad[:used], host)
    if chosen == "grouped_mm":
        return portable.grouped_outer(x, grad, counts)
    return portable.loop_outer(x, grad, counts)


# The ops. Unneeded gradients come back as empty tensors (an op returns tensors, not None).

@torch.library.custom_op("moe_dist::grouped_mm", mutates_args=())
def _grouped_mm_op(x: Tensor, w_stack: Tensor, counts: Tensor, backend: str) -> Tensor:
    return _forward(x, w_stack, counts, pick(x, w_stack, backend))


@_grouped_mm_op.register_fake
def _(x: Tensor, w_stack: Tensor, counts: Tensor, backend: str) -> Tensor:
    return x.new_empty((x.shape[0], w_stack.shape[2]))


@torch.library.custom_op("moe_dist::grouped_mm_backward", mutates_args=())
def _grouped_mm_backward_op(grad: Tensor, x: Tensor, w_stack: Tensor, counts: Tensor, backend: str,
                            need_x: bool, need_w: bool) -> tuple[Tensor, Tensor]:
    chosen = pick(x, w_stack, backend)
    grad = grad.contiguous()
    dx = _forward(grad, w_stack, counts, chosen, transpose_w=True) if need_x else x.new_empty(0)
    dw = _outer(x, grad, counts, chosen) if need_w else w_stack.new_empty(0)
    return dx, dw


@_grouped_mm_backward_op.register_fake
def _(grad, x, w_stack, counts, backend, need_x, need_w):
    return (x.new_empty(x.shape if need_x else (0,)), w_stack.new_empty(w_stack.shape if need_w else (0,)))


def _grouped_mm_setup(ctx, inputs, output) -> None:
    x, w_stack, counts, backend = inputs
    ctx.save_for_backward(x, w_stack, counts)
    ctx.backend = backend


def _grouped_mm_backward(ctx, grad: Tensor):
    x, w_stack, counts = ctx.saved_tensors
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dx, dw = _grouped_mm_backward_op(grad, x, w_stack, counts, ctx.backend, need_x, need_w)
    return (dx if need_x else None), (dw if need_w else None), None, None


_grouped_mm_op.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)


@torch.library.custom_op("moe_dist::gather_grouped_mm", mutates_args=())
def _gather_grouped_mm_op(source: Tensor, index: Tensor, w_stack: Tensor, counts: Tensor, backend: str) -> Tensor:
    chosen = pick(source, w_stack, backend)
    if chosen == "mkl":  # gather only the rows the segments cover
        host, used = _mkl_counts(counts, index.shape[0], w_stack.shape[0])
        y = source.new_empty((index.shape[0], w_stack.shape[2]))
        mkl_grouped.segment_mm(source.index_select(0, index[:used]), w_stack, host, False, out=y[:used])
        return _zeroed_tail(y, used)
    return _forward(source.index_select(0, index), w_stack, counts, chosen)


@_gather_grouped_mm_op.register_fake
def _(source: Tensor, index: Tensor, w_stack: Tensor, counts: Tensor, backend: str) -> Tensor:
    return source.new_empty((index.shape[0], w_stack.shape[2]))


@torch.library.custom_op("moe_dist::gather_grouped_mm_backward", mutates_args=())
def _gather_grouped_mm_backward_op(grad: Tensor, source: Tensor, index: Tensor, w_stack: Tensor, counts: Tensor,
                                   backend: str, need_source: bool, need_w: bool) -> tuple[Tensor, Tensor]:
    chosen = pick(source, w_stack, backend)
    if chosen == "mkl":  # regathers a chunk of experts at a time: never all of source[index]
        host, _ = _mkl_counts(counts, index.shape[0], w_stack.shape[0])
        d_source, dw = mkl_grouped.gather_segment_backward(grad, source, index, w_stack, host, need_source, need_w)
    else:
        grad = grad.contiguous()
        d_source = dw = None
        if need_w:
            dw = _outer(source.index_select(0, index), grad, counts, chosen)
        if need_source:  # rows past the last segment have a zero gradient: they add nothing
            d_source = torch.zeros_like(source).index_add_(0, index, _forward(grad, w_stack, counts, chosen, True))
    return (source.new_empty(0) if d_source is None else d_source,
            w_stack.new_empty(0) if dw is None else dw)


@_gather_grouped_mm_backward_op.register_fake
def _(grad, source, index, w_stack, counts, backend, need_source, need_w):
    return (source.new_empty(source.shape if need_source else (0,)),
            w_stack.new_empty(w_stack.shape if need_w else (0,)))


def _gather_setup(ctx, inputs, output) -> None:
    source, index, w_stack, counts, backend = inputs
    ctx.save_for_backward(source, index, w_stack, counts)
    ctx.backend = backend


def _gather_backward(ctx, grad: Tensor):
    source, index, w_stack, counts = ctx.saved_tensors
    need_source, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    d_source, dw = _gather_grouped_mm_backward_op(grad, source, index, w_stack, counts, ctx.backend,
                                                  need_source, need_w)
    return (d_source if need_source else None), None, (dw if need_w else None), None, None


_gather_grouped_mm_op.register_autograd(_gather_backward, setup_context=_gather_setup)


# The public functions.

def _device_counts(counts: Tensor | Sequence[int], x: Tensor, w_stack: Tensor, where: str) -> Tensor:
    """The segment sizes as an int64 tensor on the operands' device. A host list (tools and tests
    that build their own segments) is copied there: a blocking copy a GPU would wait on, which the
    layer never makes (it passes the device counts it computed)."""
    if not isinstance(counts, Tensor):
        counts = torch.tensor(list(counts), dtype=torch.long, device=x.device)
    if counts.dim() != 1 or counts.shape[0] != w_stack.shape[0] or counts.dtype.is_floating_point:
        raise ValueError(f"{where}: counts must be a 1-D integer tensor with one entry per expert "
                         f"({w_stack.shape[0]}), got {counts.dtype} of shape {tuple(counts.shape)}")
    return counts


def grouped_mm(x: Tensor, w_stack: Tensor, counts: Tensor | Sequence[int], backend: str = "auto") -> Tensor:
    """Row segment j of `x` (counts[j] rows, in order) times `w_stack[j]`; rows of `x` past
    `sum(counts)` give zero rows (and a zero gradient)."""
    check_choice("moe.expert_impl", backend, BACKENDS)
    return _grouped_mm_op(x, w_stack, _device_counts(counts, x, w_stack, "grouped_mm"), backend)


def gather_grouped_mm(source: Tensor, index: Tensor, w_stack: Tensor, counts: Tensor | Sequence[int],
                      backend: str = "auto") -> Tensor:
    """`grouped_mm(source[index], w_stack, counts)`, with the gather left to the backend. With
    top-k routing `source[index]` holds k copies of each kept row; the CPU backend keeps only
    (source, index) for the backward and regathers there, the portable ones gather first."""
    check_choice("moe.expert_impl", backend, BACKENDS)
    return _gather_grouped_mm_op(source, index, w_stack, _device_counts(counts, source, w_stack, "gather_grouped_mm"),
                                 backend)
