"""COMET's primitives (Shaier et al., arXiv 2410.08003): a frozen random projection and
k-winners-take-all, and the neuron-level mask they make for a dense FFN or inside experts
(ROUTERS.md §3, last paragraph).

Legend: T tokens, D input width, F FFN hidden units, e local experts, N rows routed to this
rank's experts (grouped by expert, `counts_e[j]` rows for local expert j).

The mask is `m = kwta_k(V u)` over the F hidden units, `k = round(active_fraction * F)`, with `V`
frozen and `u` the FFN's input: similar inputs get similar masks, so units are shared between
similar inputs and specialised between dissimilar ones, without a trainable gate or aux loss.
Only the hidden layer is masked; the output projection never is.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from moe_dist.moe.experts import DenseFFN, ffn_activation, grouped_matmul, init_generator
from moe_dist.routing.fp32_buffers import FP32Buffers

# Keys of init_generator for frozen projections, apart from the layer's expert/router/shared keys
# so that a projection is never the same random stream as a weight of the same layer.
FIXED_ROUTING_KEY, FFN_MASK_KEY, EXPERT_MASK_KEY, FFN_WEIGHTS_KEY = -101, -102, -103, -104


def frozen_projection(rows: int, cols: int, generator: torch.Generator) -> Tensor:
    """`[rows, cols]` with entries U(-1/sqrt(cols), 1/sqrt(cols)) (COMET's initialisation),
    drawn on CPU from `generator` so every rank and every parallel layout gets the same matrix."""
    bound = 1.0 / math.sqrt(cols)
    return (torch.rand(rows, cols, generator=generator) * 2.0 - 1.0) * bound


def active_units(width: int, active_fraction: float) -> int:
    """k of k-WTA: `round(active_fraction * width)`, at least 1."""
    return max(1, round(active_fraction * width))


def kwta_mask(scores_TF: Tensor, k: int) -> Tensor:
    """1.0 on the `k` largest scores of each row, 0.0 elsewhere.

    Exactly k winners even when scores tie: a threshold test (`s >= kth value`) would let ties
    activate more than k units, which COMET excludes.
    """
    idx_Tk = torch.topk(scores_TF, k, dim=-1).indices
    return torch.zeros_like(scores_TF).scatter_(-1, idx_Tk, 1.0)


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
        h_TF = ffn_activation(x_TD @ self.w_in_DF.to(x_TD.dtype), self.activation)
        return (h_TF * self.mask(x_TD).to(h_TF.dtype)) @ self.w_out_FD.to(x_TD.dtype)


def expert_mask_projections(num_local: int, first_expert: int, d_model: int, d_ff: int, *, seed: int,
                            layer_index: int) -> Tensor:
    """`V_eDF` for local experts `first_expert + j`, each drawn from its own (seed, layer, expert)
    generator: expert i's mask is the same whatever the expert-parallel size."""
    return torch.stack([
        frozen_projection(d_ff, d_model, init_generator(seed, layer_index, EXPERT_MASK_KEY, first_expert + j)).t()
        for j in range(num_local)])


def mask_expert_hidden(h_NF: Tensor, u_ND: Tensor, v_eDF: Tensor, counts_e: list[int], k: int) -> Tensor:
    """COMET inside experts: row n of local expert j keeps the k hidden units of `kwta(u_n V_j)`.

    `h_NF` are the experts' hidden activations and `u_ND` the routed tokens' inputs, both grouped
    by expert as the grouped GEMM sees them; the mask is computed with the same segment layout.
    """
    scores_NF = grouped_matmul(u_ND.detach().float(), v_eDF.float(), counts_e)
    return h_NF * kwta_mask(scores_NF, k).to(h_NF.dtype)


class ExpertCometMask(torch.nn.Module):
    """COMET's neuron mask inside every local expert (`moe.comet_active_fraction`).

    The projections are a non-persistent buffer: they are a function of (seed, layer, global
    expert id), rebuilt identically at construction, so checkpoints need not carry them, and a
    rank never loads another EP rank's copy from a shared module file.
    """

    def __init__(self, num_local: int, first_expert: int, d_model: int, d_ff: int, active_fraction: float, *,
                 seed: int, layer_index: int) -> None:
        super().__init__()
        if not 0.0 < active_fraction <= 1.0:
            raise ValueError(f"active_fraction must be in (0, 1], got {active_fraction!r}")
        self.k = active_units(d_ff, active_fraction)
        self.register_buffer("v_eDF", expert_mask_projections(num_local, first_expert, d_model, d_ff, seed=seed,
                                                              layer_index=layer_index), persistent=False)

    def forward(self, h_NF: Tensor, u_ND: Tensor, counts_e: list[int]) -> Tensor:
        return mask_expert_hidden(h_NF, u_ND, self.v_eDF, counts_e, self.k)
