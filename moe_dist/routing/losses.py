"""Routing auxiliary losses (unweighted): docs/routers/topk.md ("Losses emitted") and
docs/routers/sample_similarity.md. Pure functions.

Legend: moe_dist/moe/__init__.py.

Data parallelism: every rank computes its loss on its own tokens and the engine averages
gradients over ranks. Each loss below is written so that the mean over ranks of the per-rank
values (and gradients) equals the loss of one process holding every rank's tokens. That is what
lets an EP=N run match a single-process reference exactly. The global, gradient-free parts come
from the counts the layer all-reduces for the weighted losses (`moe.stats.loss_counts`); a loss
that is only logged gets this rank's counts, and then is this rank's value.
"""

from __future__ import annotations

from collections.abc import Container

import torch
from torch import Tensor

from moe_dist.routing.base import RouterOutput
from moe_dist.routing.regularizers import sample_similarity_loss


def switch_loss(probs_TE: Tensor, global_load_E: Tensor) -> Tensor:
    """Switch load balance `E * sum_e f_e * P_e` (1 at perfect balance).

    f_e, the fraction of routed slots (pre-drop, no gradient), is global; P_e, the mean
    probability, stays local: the loss is linear in P, so the mean of the per-rank losses is the
    global loss.
    """
    E = probs_TE.shape[1]
    f_E = global_load_E / global_load_E.sum().clamp_min(1.0)
    return E * (f_E.to(probs_TE.dtype) * probs_TE.mean(dim=0)).sum()


def z_loss(logits_TE: Tensor) -> Tensor:
    """ST-MoE z-loss `mean_t (logsumexp_e logits_te)^2`: keeps router logits small."""
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()


def global_sum(local: Tensor, global_value: Tensor, dp_size: int) -> Tensor:
    """The global (all-reduced) value, differentiable through this rank's term.

    Gradient: `dp_size` times the local one, because the engine then averages gradients over
    ranks and each rank's loss holds the same global value.
    """
    if dp_size == 1:
        return local
    scaled = local * dp_size
    return scaled + (global_value.to(local.dtype) - scaled.detach())


def importance_cv2(probs_TE: Tensor, global_importance_E: Tensor, dp_size: int) -> Tensor:
    """Shazeer et al. importance loss `(std(I)/mean(I))^2`, `I_e = sum_t probs_te` over all ranks."""
    I_E = global_sum(probs_TE.sum(dim=0), global_importance_E, dp_size)
    return I_E.var(unbiased=False) / I_E.mean().square().clamp_min(1e-12)


def routing_losses(route: RouterOutput, stats: dict[str, Tensor], dp_size: int,
                   sample_similarity_tokens: int = 512, with_sample_similarity: bool = False,
                   num_groups: int = 1, weighted: Container[str] | None = None) -> dict[str, Tensor]:
    """Every unweighted loss this router's output supports, by name. `stats` are the counts the
    losses read (`moe.stats.loss_counts`): global over the data-parallel group for the weighted
    losses, which supply their no-gradient global parts.
    `num_groups`: the tokens stand for that many ranks (the layer's `capacity_groups`); only the
    per-rank sample-similarity loss needs to know. Losses not named in `weighted` (None: all) are
    computed without autograd: they are only logged, and their graph would keep [T, E] tensors
    and gradients alive through the whole backward."""
    def tracked(name: str):
        return torch.set_grad_enabled(torch.is_grad_enabled() and (weighted is None or name in weighted))

    losses: dict[str, Tensor] = {}
    if route.probs_TE is not None:
        with tracked("switch"):
            losses["switch"] = switch_loss(route.probs_TE, stats["tokens_per_expert"])
        with tracked("importance"):
            losses["importance"] = importance_cv2(route.probs_TE, stats["importance"], dp_size)
        if with_sample_similarity and route.router_input_TD is not None:
            with tracked("sample_similarity"):
                losses["sample_similarity"] = sample_similarity_loss(
                    route.probs_TE, route.router_input_TD, num_tokens=sample_similarity_tokens,
                    num_groups=num_groups)
    if route.logits_TE is not None:
        with tracked("z_loss"):
            losses["z_loss"] = z_loss(route.logits_TE)
    losses.update(route.extra_aux)
    return losses


def weighted_total(losses: dict[str, Tensor], coefficients: dict[str, float]) -> Tensor | None:
    """`sum coef * loss` over the losses that have a non-zero coefficient (None if there are none)."""
    terms = [coefficients[name] * value for name, value in losses.items() if coefficients.get(name, 0.0)]
    return torch.stack(terms).sum() if terms else None
