"""`model.rope_scaling`: YaRN (Peng et al. 2023) as DeepSeek-V2/V3 and transformers compute it:
per-frequency interpolation between the original and the `factor`-stretched rotary frequencies,
cos/sin times an attention factor, and (for latent attention, `mscale_all_dim`) the softmax
scale times mscale². The formulas follow transformers' `_compute_yarn_parameters` and
`yarn_apply_mscale` (modeling_rope_utils.py), so imported DeepSeek checkpoints with a YaRN
config compute what transformers computes.

Legend: moe_dist/moe/__init__.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from moe_dist.common.config import check, check_choice

ROPE_SCALINGS = ("yarn",)


@dataclass
class RopeScalingConfig:
    type: str
    factor: float
    # The context length the model was pretrained with (DeepSeek's original_max_position_embeddings).
    original_max_seq_len: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    # 0: no scaling of the softmax constant; else mscale(factor, mscale_all_dim)² multiplies it and
    # divides the rotary attention factor (DeepSeek-V3: mscale = mscale_all_dim = 1).
    mscale_all_dim: float = 0.0
    # None: from factor, mscale and mscale_all_dim, as YaRN's paper and transformers infer it.
    attention_factor: float | None = None
    truncate: bool = True  # round the correction range outwards to whole dimensions

    def __post_init__(self) -> None:
        check_choice("model.rope_scaling.type", self.type, ROPE_SCALINGS)
        check(isinstance(self.factor, (int, float)) and self.factor >= 1,
              f"model.rope_scaling.factor must be a number >= 1, got {self.factor!r}")
        check(isinstance(self.original_max_seq_len, int) and self.original_max_seq_len >= 1,
              f"model.rope_scaling.original_max_seq_len must be an integer >= 1, got {self.original_max_seq_len!r}")
        check(self.beta_fast > 0 and self.beta_slow > 0,
              f"model.rope_scaling.beta_fast / beta_slow must be > 0, got {self.beta_fast!r} / {self.beta_slow!r}")


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def attention_factor(cfg: RopeScalingConfig | None) -> float:
    """What cos and sin are multiplied by (1 without scaling)."""
    if cfg is None:
        return 1.0
    if cfg.attention_factor is not None:
        return float(cfg.attention_factor)
    if cfg.mscale and cfg.mscale_all_dim:
        return yarn_mscale(cfg.factor, cfg.mscale) / yarn_mscale(cfg.factor, cfg.mscale_all_dim)
    return yarn_mscale(cfg.factor)


def softmax_scale(qk_head_dim: int, cfg: RopeScalingConfig | None) -> float:
    """1/sqrt(qk_head_dim), times mscale(factor, mscale_all_dim)² where that is set."""
    scale = qk_head_dim ** -0.5
    if cfg is not None and cfg.mscale_all_dim:
        scale *= yarn_mscale(cfg.factor, cfg.mscale_all_dim) ** 2
    return scale


def inverse_frequencies(dim: int, theta: float, cfg: RopeScalingConfig | None, device=None) -> Tensor:
    """fp32 [dim / 2]: RoPE's theta^(-2i/dim), or YaRN's blend of them with theta^(-2i/dim) / factor."""
    pos_freqs_R = theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
    if cfg is None:
        return 1.0 / pos_freqs_R

    def correction_dim(rotations: float) -> float:
        return dim * math.log(cfg.original_max_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(cfg.beta_fast), correction_dim(cfg.beta_slow)
    if cfg.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a ramp of zero width would divide by zero
    ramp_R = ((torch.arange(dim // 2, device=device, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation_R = 1 - ramp_R
    return (1.0 / (cfg.factor * pos_freqs_R)) * (1 - extrapolation_R) + (1.0 / pos_freqs_R) * extrapolation_R
