"""RMSNorm (Zhang & Sennrich 2019), computed in fp32 whatever the parameter dtype: the model's
norms (`RMSNorm`, weight `weight_D`) and attention's query/key norms (`QKNorm`, weight `weight`).

Legend: moe_dist/moe/__init__.py (`x_D`: any leading dims, width D last).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def rms_norm(x_D: Tensor, weight_D: Tensor, eps: float) -> Tensor:
    # fp32: in bf16 the mean of squares loses the precision the normalization relies on.
    x32 = x_D.float()
    y = x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + eps)
    return (y * weight_D.float()).to(x_D.dtype)


class RMSNorm(nn.Module):
    def __init__(self, d_model: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight_D = nn.Parameter(torch.ones(d_model))

    def forward(self, x_D: Tensor) -> Tensor:
        return rms_norm(x_D, self.weight_D, self.eps)


class QKNorm(nn.Module):
    """The same norm over the last dim of a query or key tensor. Its parameter is `weight`, no
    shape suffix: its width is one head's (`qk_norm: head`) or the whole projection's (`full`),
    and the name is the one Hugging Face models give their q_norm / k_norm."""

    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)
