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


def subsample(num_tokens: int, sample_size: int, generator: torch.Generator | None = None,
              valid_T: Tensor | None = None) -> Tensor | None:
    """Positions of `sample_size` of `num_tokens` tokens, or None when every token is used.

    Without `generator`, the positions are a function of `num_tokens` only (see _SUBSAMPLE_SEED);
    pass a generator (for instance seeded by the step) to vary them between steps. `valid_T`
    (False: padding): real tokens come first in the same permutation, so padding is drawn only
    when there are fewer real tokens than `sample_size` (and then weighs nothing); with every
    token real the positions are those without it. On `valid_T`'s device, with no host read.
    """
    if num_tokens <= sample_size:
        return None
    g = generator if generator is not None else init_generator(_SUBSAMPLE_SEED, num_tokens)
    if valid_T is None:
        return torch.randperm(num_tokens, generator=g)[:sample_size]
    perm_T = torch.randperm(num_tokens, generator=g).to(valid_T.device)
    padding_first_T = (~valid_T[perm_T]).to(torch.uint8)
    return perm_T[torch.argsort(padding_first_T, stable=True)[:sample_size]]


def _normalized_similarity(probs_XE: Tensor, x_XD: Tensor, w_X: Tensor | None = None) -> Tensor:
    """`mean_ij(D_ij p_i.p_j) / mean_ij(D_ij)`: 0 when only identical tokens share experts,
    1 when every token has the same routing distribution (collapse). `w_X` (1 real, 0 padding):
    the means over pairs of real tokens only (the ratio does not depend on D's scale, so the max
    that normalises D may include padding)."""
    dist_XX = normalized_distances(x_XD)
    overlap_XX = probs_XE.float() @ probs_XE.float().t()
    if w_X is None:
        return (dist_XX * overlap_XX).mean() / dist_XX.mean().clamp_min(1e-12)
    pairs_XX = dist_XX * (w_X[:, None] * w_X[None, :])
    return (pairs_XX * overlap_XX).sum() / pairs_XX.sum().clamp_min(1e-12)


def sample_similarity_loss(probs_TE: Tensor, router_input_TD: Tensor, num_tokens: int = 512,
                           generator: torch.Generator | None = None, num_groups: int = 1,
                           valid_T: Tensor | None = None) -> Tensor:
    """Production L_s (this project's form): on `num_tokens` tokens subsampled per rank,
    `mean_ij(D_ij p_i.p_j) / mean_ij(D_ij)`; the coefficient lambda is the config's
    `aux_loss.sample_similarity`.

    Pairs never cross ranks (that would need an all-gather of inputs and probabilities per layer).
    `num_groups` splits the T tokens into that many equal contiguous groups, each treated as one
    rank, and returns the mean over groups: a single process holding N ranks' tokens passes N and
    gets exactly the mean of the N ranks' losses, in value and in gradient. `valid_T` (False:
    padding): pairs with a padding token count for nothing, so a padded batch has the loss of
    the same batch without its padding (when both fit the sample).
    """
    T = probs_TE.shape[0]
    if T % num_groups:
        raise ValueError(f"num_groups ({num_groups}) must divide the number of tokens ({T})")
    valids = [None] * num_groups if valid_T is None else valid_T.reshape(-1).chunk(num_groups)
    losses = []
    for probs_GE, x_GD, valid_G in zip(probs_TE.chunk(num_groups), router_input_TD.chunk(num_groups), valids):
        pick_X = subsample(probs_GE.shape[0], num_tokens, generator, valid_G)
        probs_XE, x_XD, valid_X = probs_GE, x_GD, valid_G  # every token of the group when it has few enough
        if pick_X is not None:
            pick_X = pick_X.to(probs_GE.device)
            probs_XE, x_XD = probs_GE.index_select(0, pick_X), x_GD.index_select(0, pick_X)
            valid_X = None if valid_G is None else valid_G.index_select(0, pick_X)
        w_X = None if valid_X is None else valid_X.to(torch.float32)
        losses.append(_normalized_similarity(probs_XE, x_XD, w_X))
    return torch.stack(losses).mean()
