"""RMSNorm (Zhang & Sennrich 2019), computed in fp32 whatever the parameter dtype.

Legend: moe_dist/moe/__init__.py (`x_D`: any leading dims, width D last).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RMSNorm(nn.Module):
    def __init__(self, d_model: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight_D = nn.Parameter(torch.ones(d_model))

    def forward(self, x_D: Tensor) -> Tensor:
        # fp32: in bf16 the mean of squares loses the precision the normalization relies on.
        x32 = x_D.float()
        y = x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps)
        return (y * self.weight_D.float()).to(x_D.dtype)
