"""COMET's primitives (Shaier et al., arXiv 2410.08003; docs/routers/fixed_projection.md): a frozen
random projection and k-winners-take-all. The `fixed_projection` router selects experts with
them, and the neuron-level mask inside experts (`moe_dist/moe/expert_mask.py`) selects hidden
units with them.

Legend: moe_dist/moe/__init__.py. Both primitives are generic in their widths (`rows`, `cols`,
units: the expert hidden units F in the expert mask, the stream units D in the router) and, like
the kernels, spell them out instead of borrowing a letter.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

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


def kwta_mask(scores: Tensor, k: int) -> Tensor:
    """1.0 on the `k` largest scores of each row (`scores`: [rows, units]), 0.0 elsewhere.

    Exactly k winners even when scores tie: a threshold test (`s >= kth value`) would let ties
    activate more than k units, which COMET excludes.
    """
    winners = torch.topk(scores, k, dim=-1).indices  # [rows, k]
    return torch.zeros_like(scores).scatter_(-1, winners, 1.0)
