"""Rotary position embeddings (RoPE, Su et al. 2021), half-split layout as in GPT-NeoX/Llama.

`dim` is the rotated width of a head: the whole head, its first `partial_rotary_factor` part
(GLM-4.5), or latent attention's rotary part (`qk_rope_head_dim`). With `model.rope_scaling`
(YaRN, rope_scaling.py) the frequencies are YaRN's and cos/sin carry its attention factor.

Legend: moe_dist/moe/__init__.py.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_dist.model.rope_scaling import RopeScalingConfig, attention_factor, inverse_frequencies


def rotary_tables(seq_len: int, head_dim: int, theta: float, device: torch.device,
                  scaling: RopeScalingConfig | None = None) -> tuple[Tensor, Tensor]:
    """fp32 (cos_SR, sin_SR). Recomputed per call rather than stored as buffers: DeepSpeed's bf16
    mode casts every floating buffer to bf16, which would round the angles of late positions."""
    inv_freq_R = inverse_frequencies(head_dim, theta, scaling, device)
    angles_SR = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq_R)
    return _scaled(angles_SR.cos(), angles_SR.sin(), scaling)


def _scaled(cos: Tensor, sin: Tensor, scaling: RopeScalingConfig | None) -> tuple[Tensor, Tensor]:
    factor = attention_factor(scaling)
    return (cos, sin) if factor == 1.0 else (cos * factor, sin * factor)


def apply_rotary(x_BHSA: Tensor, cos_SR: Tensor, sin_SR: Tensor) -> Tensor:
    x1, x2 = x_BHSA.float().chunk(2, dim=-1)
    rotated = torch.cat([x1 * cos_SR - x2 * sin_SR, x1 * sin_SR + x2 * cos_SR], dim=-1)
    return rotated.to(x_BHSA.dtype)


def apply_partial_rotary(x_BHSA: Tensor, cos_SR: Tensor, sin_SR: Tensor) -> Tensor:
    """Rotary over each head's first 2R dims (R = cos_SR's width), the rest passed through."""
    rotary = 2 * cos_SR.shape[-1]
    if rotary == x_BHSA.shape[-1]:
        return apply_rotary(x_BHSA, cos_SR, sin_SR)
    return torch.cat([apply_rotary(x_BHSA[..., :rotary], cos_SR, sin_SR), x_BHSA[..., rotary:]], dim=-1)


def rotary_at(positions_BS: Tensor, head_dim: int, theta: float,
              scaling: RopeScalingConfig | None = None) -> tuple[Tensor, Tensor]:
    """fp32 (cos, sin) [B, 1, S, R] at each token's own position (generation: left-padded
    prompts, a KV cache, positions past max_seq_len). The same angles as `rotary_tables` at
    positions 0..S-1."""
    inv_freq_R = inverse_frequencies(head_dim, theta, scaling, positions_BS.device)
    angles_BSR = positions_BS.to(torch.float32)[..., None] * inv_freq_R
    return _scaled(angles_BSR.cos()[:, None], angles_BSR.sin()[:, None], scaling)
