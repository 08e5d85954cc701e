"""Causal self-attention with rotary positions, through `F.scaled_dot_product_attention`
(flash / memory-efficient kernels where the device has them, the math kernel on CPU).

Multi-head by default; grouped-query (multi-query) with `n_kv_heads` < `n_heads`: query head h
reads key/value head h // (H / Y), as transformers' `repeat_kv` does. Optional q/k/v bias
(Qwen2) and q/k RMSNorm before rotary, per head (Qwen3-MoE) or over the whole projection
(OLMoE). Rotary over each head's first 2R dims where cos/sin are narrower than a head
(`model.partial_rotary_factor`, GLM-4.5), else over all of them.

The fused `qkv` weight's rows are [q (H*A); k (Y*A); v (Y*A)], each head-major (head h's rows
h*A:(h+1)*A). With Y = H and A = D / H this is the layout multi-head checkpoints always had.

Legend: moe_dist/moe/__init__.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_dist.model.norm import QKNorm
from moe_dist.model.rotary import apply_partial_rotary

# SDPA broadcasts key/value heads itself from torch 2.5 on; before, they are repeated here.
_SDPA_GQA = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, *, init_std: float, out_std: float,
                 n_kv_heads: int | None = None, head_dim: int | None = None, qk_norm: str = "none",
                 qkv_bias: bool = False, norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads or n_heads
        self.head_dim = head_dim or d_model // n_heads
        if n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
        if qk_norm not in ("none", "head", "full"):
            raise ValueError(f"qk_norm must be 'none', 'head' or 'full', got {qk_norm!r}")
        self.q_width, self.kv_width = n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.qkv = nn.Linear(d_model, self.q_width + 2 * self.kv_width, bias=qkv_bias)
        self.out = nn.Linear(self.q_width, d_model, bias=False)
        nn.init.normal_(self.qkv.weight, std=init_std)
        nn.init.normal_(self.out.weight, std=out_std)
        if qkv_bias:
            nn.init.zeros_(self.qkv.bias)
        self.qk_norm = qk_norm
        self.q_norm: QKNorm | None = None
        self.k_norm: QKNorm | None = None
        if qk_norm == "head":
            self.q_norm, self.k_norm = QKNorm(self.head_dim, norm_eps), QKNorm(self.head_dim, norm_eps)
        elif qk_norm == "full":
            self.q_norm, self.k_norm = QKNorm(self.q_width, norm_eps), QKNorm(self.kv_width, norm_eps)

    @property
    def cache_widths(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """(heads, width) of the keys and of the values a KV cache keeps per position."""
        return (self.n_kv_heads, self.head_dim), (self.n_kv_heads, self.head_dim)

    def project(self, x_BSD: Tensor, cos_SR: Tensor, sin_SR: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys and values with rotary applied: q [B, H, S, A], k and v [B, Y, S, A].
        `cos_SR`/`sin_SR` broadcast against [B, H, S, R] ([S, R] in training, [B, 1, S, R] at
        per-sequence positions in generation)."""
        B, S, _ = x_BSD.shape
        H, Y, A = self.n_heads, self.n_kv_heads, self.head_dim
        # q: [B, S, H*A], k and v: [B, S, Y*A]
        q, k, v = self.qkv(x_BSD).split([self.q_width, self.kv_width, self.kv_width], dim=-1)
        if self.qk_norm == "full":  # OLMoE: before the split into heads
            q, k = self.q_norm(q), self.k_norm(k)
        q_BSHA, k_BSYA, v_BSYA = q.view(B, S, H, A), k.view(B, S, Y, A), v.view(B, S, Y, A)
        if self.qk_norm == "head":  # Qwen3: each head's width, one weight for all heads
            q_BSHA, k_BSYA = self.q_norm(q_BSHA), self.k_norm(k_BSYA)
        # Rotary over each head's first 2R dims: all of them, or GLM-4.5's partial_rotary_factor.
        q_BHSA = apply_partial_rotary(q_BSHA.transpose(1, 2), cos_SR, sin_SR)
        k_BYSA = apply_partial_rotary(k_BSYA.transpose(1, 2), cos_SR, sin_SR)
        return q_BHSA, k_BYSA, v_BSYA.transpose(1, 2)

    def attend(self, q_BHSA: Tensor, k_BYWA: Tensor, v_BYWA: Tensor, mask_BSW: Tensor | None = None) -> Tensor:
        """Attention of S queries over W keys, then the output projection: causal (W = S) without
        a mask, else where the boolean `mask_BSW` ([B, 1, S, W]) is True."""
        H, Y = self.n_heads, self.n_kv_heads
        B, _, S, A = q_BHSA.shape
        mask = {"is_causal": True} if mask_BSW is None else {"attn_mask": mask_BSW}
        if Y == H:
            y_BHSA = F.scaled_dot_product_attention(q_BHSA, k_BYWA, v_BYWA, **mask)
        elif _SDPA_GQA:
            y_BHSA = F.scaled_dot_product_attention(q_BHSA, k_BYWA, v_BYWA, enable_gqa=True, **mask)
        else:
            y_BHSA = F.scaled_dot_product_attention(q_BHSA, k_BYWA.repeat_interleave(H // Y, dim=1),
                                                    v_BYWA.repeat_interleave(H // Y, dim=1), **mask)
        return self.out(y_BHSA.transpose(1, 2).reshape(B, S, H * A))

    def forward(self, x_BSD: Tensor, cos_SR: Tensor, sin_SR: Tensor) -> Tensor:
        return self.attend(*self.project(x_BSD, cos_SR, sin_SR))
