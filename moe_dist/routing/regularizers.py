"""The sample-similarity regularizer L_s (Krishnamurthy, Watkins & Gärtner, arXiv 2302.14703),
docs/routers/sample_similarity.md: this project's production form (the paper's two-term form, for
the routing study, is `moe_dist/study/sample_similarity_paper.py`).

Legend: moe_dist/moe/__init__.py (G: one group's tokens, a rank's share; X: the tokens subsampled
from it; D is here the router input's width).

Both forms penalise sending far-apart tokens to the same experts: with `D_ij` the distance of
tokens i and j (Euclidean on the detached router input, divided by its max over the sample) and
`Q = sum_ij D_ij (p_i . p_j)`, the paper's loss is an affine function of Q (see
`moe_dist.study.sample_similarity_paper`) and the production loss is `Q / sum_ij D_ij`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_dist.common.seeding import init_generator

# Seed of the default subsample. The subsample is a fixed pseudo-random permutation of the token
# positions chosen by the token count alone: every rank with T tokens, and every capacity group of
# T tokens in a single-process reference, picks the same positions, and the global RNG is never
# touched (drawing from it would make the loss depend on unrelated code and break EP equivalence).
_SUBSAMPLE_SEED = 0x5A5


def normalized_distances(x_XD: Tensor) -> Tensor:
    """`D_ij = |x_i - x_j| / max_ij |x_i - x_j|` on the detached input, fp32 (all zero if the
    tokens are identical)."""
    x = x_XD.detach().float()
    d_XX = torch.cdist(x, x)
    return d_XX / d_XX.max().clamp_min(1e-12)


def subsample(num_tokens: int, sample_size: int, generator: torch.Generator | None = None) -> Tensor | None:
    """Positions of `sample_size` of `num_tokens` tokens, or None when every token is used.

    Without `generator`, the positions are a function of `num_tokens` only (see _SUBSAMPLE_SEED);
    pass a generator (for instance seeded by the step) to vary them between steps.
    """
    if num_tokens <= sample_size:
        return None
    g = generator if generator is not None else init_generator(_SUBSAMPLE_SEED, num_tokens)
    return torch.randperm(num_tokens, generator=g)[:sample_size]


def _normalized_similarity(probs_XE: Tensor, x_XD: Tensor) -> Tensor:
    """`mean_ij(D_ij p_i.p_j) / mean_ij(D_ij)`: 0 when only identical tokens share experts,
    1 when every token has the same routing distribution (collapse)."""
    dist_XX = normalized_distances(x_XD)
    overlap_XX = probs_XE.float() @ probs_XE.float().t()
    return (dist_XX * overlap_XX).mean() / dist_XX.mean().clamp_min(1e-12)


def sample_similarity_loss(probs_TE: Tensor, router_input_TD: Tensor, num_tokens: int = 512,
                           generator: torch.Generator | None = None, num_groups: int = 1) -> Tensor:
    """Production L_s (this project's form): on `num_tokens` tokens subsampled per rank,
    `mean_ij(D_ij p_i.p_j) / mean_ij(D_ij)`; the coefficient lambda is the config's
    `aux_loss.sample_similarity`.

    Pairs never cross ranks (that would need an all-gather of inputs and probabilities per layer).
    `num_groups` splits the T tokens into that many equal contiguous groups, each treated as one
    rank, and returns the mean over groups: a single process holding N ranks' tokens passes N and
    gets exactly the mean of the N ranks' losses, in value and in gradient.
    """
    T = probs_TE.shape[0]
    if T % num_groups:
        raise ValueError(f"num_groups ({num_groups}) must divide the number of tokens ({T})")
    losses = []
    for probs_GE, x_GD in zip(probs_TE.chunk(num_groups), router_input_TD.chunk(num_groups)):
        pick_X = subsample(probs_GE.shape[0], num_tokens, generator)
        probs_XE, x_XD = probs_GE, x_GD  # every token of the group when it has few enough
        if pick_X is not None:
            pick_X = pick_X.to(probs_GE.device)
            probs_XE, x_XD = probs_GE.index_select(0, pick_X), x_GD.index_select(0, pick_X)
        losses.append(_normalized_similarity(probs_XE, x_XD))
    return torch.stack(losses).mean()
