"""Rotary position embeddings (RoPE, Su et al. 2021), half-split layout as in GPT-NeoX/Llama.

Legend: B batch, H heads, S sequence positions, Dh head width, F = Dh/2 frequencies.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rotary_tables(seq_len: int, head_dim: int, theta: float, device: torch.device) -> tuple[Tensor, Tensor]:
    """fp32 (cos_SF, sin_SF). Recomputed per call rather than stored as buffers: DeepSpeed's bf16
    mode casts every floating buffer to bf16, which would round the angles of late positions."""
    inv_freq_F = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles_SF = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq_F)
    return angles_SF.cos(), angles_SF.sin()


def apply_rotary(x_BHSDh: Tensor, cos_SF: Tensor, sin_SF: Tensor) -> Tensor:
    x1, x2 = x_BHSDh.float().chunk(2, dim=-1)
    rotated = torch.cat([x1 * cos_SF - x2 * sin_SF, x1 * sin_SF + x2 * cos_SF], dim=-1)
    return rotated.to(x_BHSDh.dtype)
