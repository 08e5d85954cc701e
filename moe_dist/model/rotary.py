"""Rotary position embeddings (RoPE, Su et al. 2021), half-split layout as in GPT-NeoX/Llama.

Legend: moe_dist/moe/__init__.py.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rotary_tables(seq_len: int, head_dim: int, theta: float, device: torch.device) -> tuple[Tensor, Tensor]:
    """fp32 (cos_SR, sin_SR). Recomputed per call rather than stored as buffers: DeepSpeed's bf16
    mode casts every floating buffer to bf16, which would round the angles of late positions."""
    inv_freq_R = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles_SR = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq_R)
    return angles_SR.cos(), angles_SR.sin()


def apply_rotary(x_BHSA: Tensor, cos_SR: Tensor, sin_SR: Tensor) -> Tensor:
    x1, x2 = x_BHSA.float().chunk(2, dim=-1)
    rotated = torch.cat([x1 * cos_SR - x2 * sin_SR, x1 * sin_SR + x2 * cos_SR], dim=-1)
    return rotated.to(x_BHSA.dtype)


def rotary_at(positions_BS: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """fp32 (cos, sin) [B, 1, S, R] at each token's own position (generation: left-padded
    prompts, a KV cache, positions past max_seq_len). The same angles as `rotary_tables` at
    positions 0..S-1."""
    device = positions_BS.device
    inv_freq_R = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles_BSR = positions_BS.to(torch.float32)[..., None] * inv_freq_R
    return angles_BSR.cos()[:, None], angles_BSR.sin()[:, None]
