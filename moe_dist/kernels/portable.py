"""The portable backend: `torch._grouped_mm` where it takes the operands, else a loop of matmuls
over the same segments. Operands as in `moe_dist.kernels`."""

from __future__ import annotations

import torch
from torch import Tensor


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


def torch_grouped_mm(x: Tensor, w_stack: Tensor, counts: list[int]) -> Tensor:
    offs = torch.tensor(counts, device=x.device).cumsum(0).to(torch.int32)
    return torch._grouped_mm(x, w_stack, offs=offs)


def loop_mm(x: Tensor, w_stack: Tensor, counts: list[int]) -> Tensor:
    return torch.cat([segment @ w_stack[j] for j, segment in enumerate(torch.split(x, counts))])
