"""A dense FFN with COMET's neuron mask (Shaier et al., arXiv 2410.08003), the paper's own
setting, for the routing study's width sweep (`comet_width.py`). The library's mask lives inside
experts (`moe_dist/moe/expert_mask.py`); this dense form is research code only.

Legend: T inputs, D input width, F hidden units.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_dist.common.seeding import init_generator
from moe_dist.moe.experts import DenseFFN, ffn_activation
from moe_dist.routing.comet import FFN_MASK_KEY, FFN_WEIGHTS_KEY, active_units, frozen_projection, kwta_mask
from moe_dist.routing.fp32_buffers import FP32Buffers


class CometMask(FP32Buffers):
    """`u_TD -> kwta(u V^T)` with `V_FD` a frozen persistent buffer (no parameter, no gradient)."""

    def __init__(self, d_in: int, num_units: int, active_fraction: float, generator: torch.Generator) -> None:
        super().__init__()
        if not 0.0 < active_fraction <= 1.0:
            raise ValueError(f"active_fraction must be in (0, 1], got {active_fraction!r}")
        self.k = active_units(num_units, active_fraction)
        self.register_buffer("v_FD", frozen_projection(num_units, d_in, generator), persistent=True)

    def forward(self, u_TD: Tensor) -> Tensor:
        return kwta_mask(u_TD.detach().float() @ self.v_FD.t(), self.k)


class CometFFN(DenseFFN):
    """A dense FFN whose hidden units are gated by the COMET mask of its own input:
    `y = (act(x W1) * kwta(V x)) W2`."""

    def __init__(self, d_model: int, d_ff: int, activation: str, *, active_fraction: float, init_std: float,
                 seed: int = 0, layer_index: int = 0) -> None:
        super().__init__(d_model, d_ff, activation, init_std=init_std,
                         generator=init_generator(seed, layer_index, FFN_WEIGHTS_KEY))
        self.mask = CometMask(d_model, d_ff, active_fraction, init_generator(seed, layer_index, FFN_MASK_KEY))

    def forward(self, x_TD: Tensor) -> Tensor:
        h_TF = ffn_activation(x_TD @ self.w_in_DI.to(x_TD.dtype), self.activation)
        return (h_TF * self.mask(x_TD).to(h_TF.dtype)) @ self.w_out_FD.to(x_TD.dtype)
