"""Routing auxiliary losses (unweighted): docs/routers/topk.md ("Losses emitted"),
docs/routers/sample_similarity.md and docs/training.md ("Balance-loss scopes"). Pure functions.

Legend: moe_dist/moe/__init__.py.

Data parallelism: every rank computes its loss on its own tokens and the engine averages
gradients over ranks. Each loss below is written so that the mean over ranks of the per-rank
values (and gradients) equals the loss of one process holding every rank's tokens. That is what
lets an EP=N run match a single-process reference exactly. The global, gradient-free parts come
from the counts the layer all-reduces for the weighted losses (`moe.stats.loss_counts`); a loss
that is only logged gets this rank's counts, and then is this rank's value.

Scopes (`aux_loss.switch_scope`, `aux_loss.importance_scope`): what the balance of the switch
and importance losses is measured over.

- `dp_global`: the fractions of this micro batch summed over the data-parallel ranks.
- `micro_batch`: this rank's own tokens (no collective); the reference (`num_groups` > 1) takes
  each group's own loss and their mean.
- `sequence`: each sequence (or packed document) its own loss, summed and divided by the number
  of non-empty sequences of every rank over the ranks (DeepSeek-V2/V3's sequence-wise loss).
- `global_batch`: the fractions of every micro batch of the optimizer step so far, summed over
  the ranks: a running count the trainer hands in (`MoESideInputs.step_counts`), as
  Megatron-Core's `global_aux_loss` keeps in a router buffer.

Masks: a token whose `valid_T` is False (padding) adds nothing to any loss, count or divisor.
"""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass

import torch
from torch import Tensor

from moe_dist.routing.base import RouterOutput
from moe_dist.routing.regularizers import sample_similarity_loss


@dataclass(frozen=True)
class Segments:
    """Tokens split into `count` segments (sequences, documents or capacity groups) that a
    segmented loss averages over: `key_T` is each token's segment, in [0, count). `count` is
    static (the most segments the shapes allow), so some segments may hold no token."""

    key_T: Tensor  # int64
    count: int


def groups_of(num_tokens: int, num_groups: int, device) -> Segments:
    """The layer's `capacity_groups`: equal contiguous groups, each one rank's tokens."""
    if num_tokens % num_groups:
        raise ValueError(f"num_groups ({num_groups}) must divide the number of tokens ({num_tokens})")
    return Segments(torch.arange(num_tokens, device=device) // (num_tokens // num_groups), num_groups)


def _weights(valid_T: Tensor | None, like_T: Tensor) -> Tensor:
    """1 for a real token, 0 for padding ([T], `like_T`'s dtype and device; T its first dim)."""
    if valid_T is None:
        return torch.ones(like_T.shape[0], dtype=like_T.dtype, device=like_T.device)
    return valid_T.reshape(-1).to(like_T.dtype)


def _masked_probs(probs_TE: Tensor, valid_T: Tensor | None) -> Tensor:
    # where, not a product: padding may carry any value (even a non-finite one) without reaching a loss.
    if valid_T is None:
        return probs_TE
    return torch.where(valid_T.reshape(-1, 1), probs_TE, torch.zeros_like(probs_TE))


def segment_sums(probs_TE: Tensor, idx_TK: Tensor, valid_T: Tensor | None,
                 segments: Segments) -> tuple[Tensor, Tensor, Tensor]:
    """Per segment: routed pairs per expert (float32, no gradient), the sum of the probabilities
    (with gradient) and the number of real tokens (float32)."""
    O, E, K = segments.count, probs_TE.shape[1], idx_TK.shape[1]
    key_T = segments.key_T
    w_T = _weights(valid_T, probs_TE.detach().float())
    cell_Q = (key_T.reshape(-1, 1) * E + idx_TK).reshape(-1)
    load_OE = torch.zeros(O * E, device=probs_TE.device).scatter_add_(
        0, cell_Q, w_T.reshape(-1, 1).expand(-1, K).reshape(-1)).view(O, E)
    probs_OE = probs_TE.new_zeros(O, E).index_add(0, key_T, _masked_probs(probs_TE, valid_T))
    tokens_O = torch.zeros(O, device=probs_TE.device).scatter_add_(0, key_T, w_T)
    return load_OE, probs_OE, tokens_O


def switch_loss(probs_TE: Tensor, global_load_E: Tensor, token_share: Tensor | float | None = None,
                valid_T: Tensor | None = None) -> Tensor:
    """Switch load balance `E * sum_e f_e * P_e` (1 at perfect balance).

    f_e, the fraction of routed slots (pre-drop, no gradient), is global; P_e, the mean
    probability, stays local: the loss is linear in P, so the mean of the per-rank losses is the
    global loss. `token_share`: the real tokens of every rank divided by the number of ranks (the
    divisor that makes the mean over ranks the global mean when ranks hold different numbers of
    real tokens); None: this rank's real tokens.
    """
    E = probs_TE.shape[1]
    f_E = global_load_E / global_load_E.sum().clamp_min(1.0)
    if token_share is None:
        token_share = _weights(valid_T, probs_TE).sum()
    if isinstance(token_share, Tensor):
        token_share = token_share.to(probs_TE.dtype).clamp_min(1.0)
    P_E = _masked_probs(probs_TE, valid_T).sum(dim=0) / token_share
    return E * (f_E.to(probs_TE.dtype) * P_E).sum()


def segmented_switch_loss(probs_TE: Tensor, idx_TK: Tensor, valid_T: Tensor | None, segments: Segments,
                          divisor: Tensor | float) -> Tensor:
    """`sum_o E * sum_e f_oe P_oe / divisor`, f and P taken over segment o's real tokens alone
    (an empty segment adds 0)."""
    E = probs_TE.shape[1]
    load_OE, probs_OE, tokens_O = segment_sums(probs_TE, idx_TK, valid_T, segments)
    f_OE = load_OE / load_OE.sum(1, keepdim=True).clamp_min(1.0)
    P_OE = probs_OE / tokens_O.clamp_min(1.0).to(probs_OE.dtype).unsqueeze(1)
    per_segment_O = E * (f_OE.to(P_OE.dtype) * P_OE).sum(1)
    return per_segment_O.sum() / divisor


def _cv2(I_E: Tensor) -> Tensor:
    return I_E.var(dim=-1, unbiased=False) / I_E.mean(dim=-1).square().clamp_min(1e-12)


def segmented_importance_cv2(probs_TE: Tensor, idx_TK: Tensor, valid_T: Tensor | None, segments: Segments,
                             divisor: Tensor | float) -> Tensor:
    """`sum_o CV^2(I_o) / divisor`, `I_oe` the sum of segment o's real tokens' probabilities."""
    _, probs_OE, _ = segment_sums(probs_TE, idx_TK, valid_T, segments)
    return _cv2(probs_OE).sum() / divisor


def z_loss(logits_TE: Tensor, valid_T: Tensor | None = None, num_groups: int = 1) -> Tensor:
    """ST-MoE z-loss `mean_t (logsumexp_e logits_te)^2` over the real tokens: keeps router logits
    small. Per rank (a reference holding `num_groups` ranks' tokens returns the mean of the
    groups' losses)."""
    sq_T = torch.logsumexp(logits_TE.float(), dim=-1).square()
    if valid_T is None and num_groups == 1:
        return sq_T.mean()
    w_T = _weights(valid_T, sq_T)
    sq_T = torch.where(w_T > 0, sq_T, torch.zeros_like(sq_T))
    per_group = sq_T.view(num_groups, -1).sum(1) / w_T.view(num_groups, -1).sum(1).clamp_min(1.0)
    return per_group.mean()


def global_sum(local: Tensor, global_value: Tensor, dp_size: int) -> Tensor:
    """The global (all-reduced) value, differentiable through this rank's term.

    Gradient: `dp_size` times the local one, because the engine then averages gradients over
    ranks and each rank's loss holds the same global value.
    """
    if dp_size == 1:
        return local
    scaled = local * dp_size
    return scaled + (global_value.to(local.dtype) - scaled.detach())


def importance_cv2(probs_TE: Tensor, global_importance_E: Tensor, dp_size: int,
                   valid_T: Tensor | None = None, prior_importance_E: Tensor | None = None) -> Tensor:
    """Shazeer et al. importance loss `(std(I)/mean(I))^2`, `I_e = sum_t probs_te` over all ranks'
    real tokens, plus `prior_importance_E` (no gradient: the optimizer step's earlier micro
    batches, for the global_batch scope)."""
    I_E = global_sum(_masked_probs(probs_TE, valid_T).sum(dim=0), global_importance_E, dp_size)
    if prior_importance_E is not None:
        I_E = I_E + prior_importance_E.to(I_E.dtype)
    return _cv2(I_E)


def routing_losses(route: RouterOutput, stats: dict[str, Tensor], dp_size: int,
                   sample_similarity_tokens: int = 512, with_sample_similarity: bool = False,
                   num_groups: int = 1, weighted: Container[str] | None = None,
                   scopes: dict[str, str] | None = None, valid_T: Tensor | None = None,
                   sequences: Segments | None = None) -> dict[str, Tensor]:
    """Every unweighted loss this router's output supports, by name. `stats` are the counts the
    losses read (`moe.stats.loss_counts`): global over the data-parallel group for the weighted
    losses, which supply their no-gradient global parts; with a global_batch scope also
    `step_prior_<count>`, the optimizer step's earlier micro batches' global counts.
    `num_groups`: the tokens stand for that many ranks (the layer's `capacity_groups`); the
    per-rank losses (sample similarity, z-loss, the micro_batch scope) need to know.
    `scopes`: each balance loss's scope (module docstring; None: dp_global). `valid_T`: False
    for padding (None: every token is real). `sequences`: the tokens' sequences or documents,
    needed by a sequence scope. Losses not named in `weighted` (None: all) are
    computed without autograd: they are only logged, and their graph would keep [T, E] tensors
    and gradients alive through the whole backward."""
    def tracked(name: str):
        return torch.set_grad_enabled(torch.is_grad_enabled() and (weighted is None or name in weighted))

    def ranks(name: str) -> int:
        # Only the weighted losses' counts were reduced over the data-parallel ranks.
        return dp_size if weighted is None or name in weighted else 1

    scopes = scopes or {}
    losses: dict[str, Tensor] = {}
    if route.probs_TE is not None:
        probs_TE, idx_TK = route.probs_TE, route.idx_TK
        T = probs_TE.shape[0]
        for name in ("switch", "importance"):
            scope = scopes.get(name, "dp_global")
            with tracked(name):
                if scope in ("micro_batch", "sequence"):
                    if scope == "micro_batch":
                        segments, divisor = groups_of(T, num_groups, probs_TE.device), num_groups
                    else:
                        if sequences is None:
                            raise ValueError(f"aux_loss.{name}_scope 'sequence' needs the tokens' sequences")
                        # num_sequences is reduced when either loss reading it is weighted.
                        shared = max(ranks(other) for other in ("switch", "importance")
                                     if scopes.get(other, "dp_global") == "sequence")
                        segments, divisor = sequences, (stats["num_sequences"] / shared).clamp_min(1.0)
                    segmented = segmented_switch_loss if name == "switch" else segmented_importance_cv2
                    losses[name] = segmented(probs_TE, idx_TK, valid_T, segments, divisor)
                elif name == "switch":
                    load_E = stats["tokens_per_expert"]
                    if scope == "global_batch":
                        load_E = load_E + stats["step_prior_tokens_per_expert"]
                    losses[name] = switch_loss(probs_TE, load_E, stats["num_tokens"] / ranks(name), valid_T)
                else:
                    prior = stats["step_prior_importance"] if scope == "global_batch" else None
                    losses[name] = importance_cv2(probs_TE, stats["importance"], ranks(name), valid_T, prior)
        if with_sample_similarity and route.router_input_TD is not None:
            with tracked("sample_similarity"):
                losses["sample_similarity"] = sample_similarity_loss(
                    route.probs_TE, route.router_input_TD, num_tokens=sample_similarity_tokens,
                    num_groups=num_groups, valid_T=valid_T)
    if route.logits_TE is not None:
        with tracked("z_loss"):
            losses["z_loss"] = z_loss(route.logits_TE, valid_T, num_groups)
    losses.update(route.extra_aux)
    return losses


def weighted_total(losses: dict[str, Tensor], coefficients: dict[str, float]) -> Tensor | None:
    """`sum coef * loss` over the losses that have a non-zero coefficient (None if there are none)."""
    terms = [coefficients[name] * value for name, value in losses.items() if coefficients.get(name, 0.0)]
    return torch.stack(terms).sum() if terms else None
