"""The sample-similarity regularizer L_s in the paper's two-term form (Krishnamurthy, Watkins &
Gärtner, arXiv 2302.14703; docs/routers/sample_similarity.md), on a whole batch: the routing
study's digits experiment uses it, and a test proves that the library's production form
(`moe_dist/routing/regularizers.py`) is the same function of Q up to an offset without gradient.

Legend: B inputs in the batch, D input width, E experts.
"""

from __future__ import annotations

from torch import Tensor

from moe_dist.routing.regularizers import normalized_distances


def sample_similarity_paper(probs_BE: Tensor, x_BD: Tensor, beta_s: float, beta_d: float) -> Tensor:
    """The paper's two-term L_s on a whole batch, as the paper writes it:

        S  = (1/E) sum_e sum_ij p_ie p_je D_ij                   (same expert, far apart)
        Dd = (1/(E^2-E)) sum_{e!=e'} sum_ij p_ie p_je' D_ij       (different experts)
        L_s = beta_s * S - beta_d * Dd / B^2

    Since `sum_{e!=e'} p_ie p_je' = 1 - p_i.p_j`, with `Q = sum_ij D_ij p_i.p_j` and
    `Sigma = sum_ij D_ij`: `L_s = (beta_s/E + beta_d/(B^2 E(E-1))) Q - beta_d Sigma/(B^2 E(E-1))`,
    an affine function of Q whose offset has no gradient.
    """
    B, E = probs_BE.shape
    if E < 2:
        raise ValueError(f"sample_similarity_paper needs at least 2 experts, got {E}")
    dist_BB = normalized_distances(x_BD)
    p = probs_BE.float()
    same = (dist_BB * (p @ p.t())).sum() / E
    mass_B = p.sum(dim=1)
    every_pair = mass_B @ dist_BB @ mass_B  # sum over all (e, e'), e == e' included
    different = (every_pair - same * E) / (E * E - E)
    return beta_s * same - beta_d * different / B**2
