"""The portable backends: `torch._grouped_mm` where it takes the operands, else a loop of matmuls
over the same segments. Operands as in `moe_dist.kernels`; no autograd here (`ops` registers the
gradients), and rows of `x` past the last segment are zero in every result.

`torch._grouped_mm` takes the segments as device offsets, so it never reads the counts on the
host. The loop is a debugging fallback: it reads them, inside the op (`host_sync.allowed()`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_dist.common import host_sync


def torch_grouped_mm_supported(x: Tensor, w_stack: Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    # The kernel requires 16-byte aligned row strides of both operands and of the output.
    if any((width * x.element_size()) % 16 for width in (x.shape[-1], w_stack.shape[-1])):
        return False
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.bfloat16, torch.float16)
    if x.device.type == "cuda":  # the CUDA kernel is bf16-only on Hopper and newer
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (9, 0)
    return False


def _offsets(counts: Tensor) -> Tensor:
    return counts.cumsum(0).to(torch.int32)


def _zero_tail(y: Tensor, offs: Tensor) -> Tensor:
    """Rows past the last offset are left unwritten by `torch._grouped_mm`: make them zero, so
    that what follows (an activation, the combine's backward) never meets stale memory."""
    inside = torch.arange(y.shape[0], device=y.device) < offs[-1]
    return torch.where(inside[:, None], y, torch.zeros((), dtype=y.dtype, device=y.device))


def grouped(x: Tensor, w_stack: Tensor, counts: Tensor, transpose_w: bool = False) -> Tensor:
    """Segment j of `x` times `w_stack[j]` (or its transpose) by `torch._grouped_mm`."""
    offs = _offsets(counts)
    w = w_stack.transpose(-2, -1) if transpose_w else w_stack
    return _zero_tail(torch._grouped_mm(x, w, offs=offs), offs)


def grouped_outer(x: Tensor, grad: Tensor, counts: Tensor) -> Tensor:
    """`dw[j] = x[segment j].T @ grad[segment j]` (zero for an empty segment)."""
    return torch._grouped_mm(x.transpose(-2, -1), grad, offs=_offsets(counts))


def _host_segments(counts: Tensor, rows: int, experts: int) -> list[int]:
    with host_sync.allowed():
        host = counts.tolist()
    if len(host) != experts or sum(host) > rows or min(host, default=0) < 0:
        raise ValueError(f"counts {host} must have one entry >= 0 per expert ({experts}) and sum to at most "
                         f"the {rows} rows of x")
    return host


def loop(x: Tensor, w_stack: Tensor, counts: Tensor, transpose_w: bool = False) -> Tensor:
    """One matmul per segment (the reference the other backends are tested against)."""
    host = _host_segments(counts, x.shape[0], w_stack.shape[0])
    out_width = w_stack.shape[1] if transpose_w else w_stack.shape[2]
    y = x.new_zeros((x.shape[0], out_width))
    start = 0
    for j, c in enumerate(host):
        w = w_stack[j].t() if transpose_w else w_stack[j]
        torch.mm(x[start:start + c], w, out=y[start:start + c])
        start += c
    return y


def loop_outer(x: Tensor, grad: Tensor, counts: Tensor) -> Tensor:
    host = _host_segments(counts, x.shape[0], counts.shape[0])
    dw = x.new_zeros((len(host), x.shape[1], grad.shape[1]))
    start = 0
    for j, c in enumerate(host):
        torch.mm(x[start:start + c].t(), grad[start:start + c], out=dw[j])
        start += c
    return dw
