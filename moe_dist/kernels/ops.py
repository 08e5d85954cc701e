"""The backend choice behind `grouped_mm` and `gather_grouped_mm` (see `moe_dist.kernels`)."""

from __future__ import annotations

import torch
from torch import Tensor

from moe_dist.common.config import ConfigError, check_choice
from moe_dist.kernels import portable
from moe_dist.kernels.cpu import mkl_grouped

BACKENDS = ("auto", "mkl", "grouped_mm", "loop")

_GROUPED_MM = {"mkl": mkl_grouped.segment_matmul, "grouped_mm": portable.torch_grouped_mm,
               "loop": portable.loop_mm}


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


def grouped_mm(x: Tensor, w_stack: Tensor, counts: list[int], backend: str = "auto") -> Tensor:
    """Row segment j of `x` (counts[j] rows) times `w_stack[j]`."""
    return _GROUPED_MM[pick(x, w_stack, backend)](x, w_stack, counts)


def gather_grouped_mm(source: Tensor, index: Tensor, w_stack: Tensor, counts: list[int],
                      backend: str = "auto") -> Tensor:
    """`grouped_mm(source[index], w_stack, counts)`, with the gather left to the backend. With
    top-k routing `source[index]` holds k copies of each kept row; the CPU backend keeps only
    (source, index) for the backward and regathers there, the portable ones gather first."""
    chosen = pick(source, w_stack, backend)
    if chosen == "mkl":
        return mkl_grouped.gather_segment_matmul(source, index, w_stack, counts)
    return _GROUPED_MM[chosen](source.index_select(0, index), w_stack, counts)
