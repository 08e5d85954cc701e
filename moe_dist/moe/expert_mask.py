"""COMET's neuron-level mask inside experts (`moe.comet_active_fraction`,
docs/routers/fixed_projection.md, "Neuron-level COMET").

Legend: moe_dist/moe/__init__.py.

The mask is `m = kwta_k(V u)` over an expert's F hidden units, `k = round(active_fraction * F)`,
with `V` frozen and `u` the expert's input: similar inputs get similar masks, so units are shared
between similar inputs and specialised between dissimilar ones, without a trainable gate or aux
loss. Only the hidden layer is masked; the output projection never is.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_dist.common.seeding import init_generator
from moe_dist.kernels import grouped_mm
from moe_dist.routing.comet import EXPERT_MASK_KEY, active_units, frozen_projection, kwta_mask
from moe_dist.routing.fp32_buffers import FP32Buffers


def expert_mask_projections(num_local: int, first_expert: int, d_model: int, d_ff: int, *, seed: int,
                            layer_index: int) -> Tensor:
    """`V_eDF` for local experts `first_expert + j`, each drawn from its own (seed, layer, expert)
    generator: expert i's mask is the same whatever the expert-parallel size."""
    return torch.stack([
        frozen_projection(d_ff, d_model, init_generator(seed, layer_index, EXPERT_MASK_KEY, first_expert + j)).t()
        for j in range(num_local)])


def mask_expert_hidden(h_MF: Tensor, u_MD: Tensor, v_eDF: Tensor, counts_e: Tensor, k: int) -> Tensor:
    """COMET inside experts: row m of local expert j keeps the k hidden units of `kwta(u_m V_j)`.

    `h_MF` are the experts' hidden activations and `u_MD` the routed tokens' inputs, both grouped
    by expert as the grouped GEMM sees them; the mask is computed with the same segment layout.
    """
    scores_MF = grouped_mm(u_MD.detach().float(), v_eDF.float(), counts_e)
    return h_MF * kwta_mask(scores_MF, k).to(h_MF.dtype)


class ExpertCometMask(FP32Buffers):
    """COMET's neuron mask inside every local expert (`moe.comet_active_fraction`).

    Its projections stay fp32 under bf16 training (`FP32Buffers`), as the routers' do: the matrix
    the seed defines, so training, evaluation and the exports pick the same k winners.

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

    def forward(self, h_MF: Tensor, u_MD: Tensor, counts_e: Tensor) -> Tensor:
        return mask_expert_hidden(h_MF, u_MD, self.v_eDF, counts_e, self.k)
