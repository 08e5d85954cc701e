"""Causal multi-head self-attention with rotary positions, through `F.scaled_dot_product_attention`
(flash / memory-efficient kernels where the device has them, the math kernel on CPU).

Legend: moe_dist/moe/__init__.py.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from moe_dist.model.rotary import apply_rotary


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, *, init_std: float, out_std: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        nn.init.normal_(self.qkv.weight, std=init_std)
        nn.init.normal_(self.out.weight, std=out_std)

    def forward(self, x_BSD: Tensor, cos_SR: Tensor, sin_SR: Tensor) -> Tensor:
        B, S, D = x_BSD.shape
        qkv = self.qkv(x_BSD).view(B, S, 3, self.n_heads, D // self.n_heads)
        q_BHSA, k_BHSA, v_BHSA = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        q_BHSA = apply_rotary(q_BHSA, cos_SR, sin_SR)
        k_BHSA = apply_rotary(k_BHSA, cos_SR, sin_SR)
        y_BHSA = F.scaled_dot_product_attention(q_BHSA, k_BHSA, v_BHSA, is_causal=True)
        return self.out(y_BHSA.transpose(1, 2).reshape(B, S, D))
