"""Per-layer routing statistics (docs/routers/statistics.md), global over the data-parallel group.

Legend: moe_dist/moe/__init__.py.

Everything here is detached. One all-reduce per layer carries all counts, so statistics cost one
small collective whatever is logged. `route_statistics` runs in every forward and stays on the
device; `interval_summary` reads the host and runs once per log interval or evaluation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from moe_dist.moe.capacity import SlotPlan
from moe_dist.routing.base import RouterOutput, RoutingContext


def entropy(p: Tensor, dim: int = -1) -> Tensor:
    """Shannon entropy in nats, with 0 log 0 = 0."""
    return -(p * torch.log(p.clamp_min(1e-30))).sum(dim)


def mutual_information(joint_EL: Tensor) -> tuple[Tensor, Tensor]:
    """I(expert; label) from a count table, and I / H(label) (1: experts determine the label)."""
    total = joint_EL.sum().clamp_min(1e-12)
    p_EL = joint_EL / total
    p_E, p_L = p_EL.sum(1), p_EL.sum(0)
    mi = (p_EL * (torch.log(p_EL.clamp_min(1e-30)) - torch.log((p_E[:, None] * p_L[None, :]).clamp_min(1e-30)))).sum()
    h_L = entropy(p_L)
    # torch.where, not a Python branch: route_statistics calls this in every labelled forward,
    # where reading h_L on the host would wait for the device.
    return mi, torch.where(h_L > 0, mi / h_L, torch.zeros_like(mi))


def expert_label_counts(idx_TK: Tensor, labels_T: Tensor, num_experts: int, num_labels: int) -> Tensor:
    """Routed pairs per (expert, label); tokens labelled -1 are ignored."""
    K = idx_TK.shape[1]
    labels_Q = labels_T.reshape(-1, 1).expand(-1, K).reshape(-1)
    valid = labels_Q >= 0
    cell = idx_TK.reshape(-1) * num_labels + labels_Q.clamp_min(0)
    return torch.bincount(cell, weights=valid.float(), minlength=num_experts * num_labels).view(num_experts, num_labels)


def route_statistics(route: RouterOutput, plan: SlotPlan, ctx: RoutingContext,
                     labels_T: Tensor | None = None, num_labels: int = 0) -> dict[str, Tensor]:
    E = plan.load_E.numel()
    T = route.idx_TK.shape[0]
    parts = [plan.load_E.float(), plan.kept_E.float(), torch.tensor([float(T)], device=plan.load_E.device)]
    if route.probs_TE is not None:
        probs = route.probs_TE.detach().float()
        parts += [probs.sum(0), entropy(probs).sum().reshape(1)]
    if labels_T is not None and num_labels > 0:
        parts.append(expert_label_counts(route.idx_TK, labels_T.reshape(-1), E, num_labels).flatten())
    packed = ctx.all_reduce_sum(torch.cat(parts))

    load_E, kept_E, total_tokens = packed[:E], packed[E:2 * E], packed[2 * E]
    rest = packed[2 * E + 1:]
    mean_load = load_E.mean().clamp_min(1e-12)
    stats = {
        "tokens_per_expert": load_E,
        "tokens_per_expert_kept": kept_E,
        "dropped_fraction": 1.0 - kept_E.sum() / load_E.sum().clamp_min(1.0),
        "load_cv": load_E.std(unbiased=False) / mean_load,
        "load_max_over_mean": load_E.max() / mean_load,
        # Entropy of where slots went; equals H_u for routers without a probability matrix.
        "entropy_load": entropy(load_E / load_E.sum().clamp_min(1.0)),
    }
    if route.probs_TE is not None:
        probs_sum_E, entropy_sum = rest[:E], rest[E]
        rest = rest[E + 1:]
        stats["importance"] = probs_sum_E
        stats["entropy_token"] = entropy_sum / total_tokens  # H_s
        stats["entropy_mean"] = entropy(probs_sum_E / total_tokens)  # H_u, at most log E
    if labels_T is not None and num_labels > 0:
        joint_EL = rest.view(E, num_labels)
        stats["expert_label_counts"] = joint_EL
        stats["mi_label"], stats["mi_label_normalized"] = mutual_information(joint_EL)
    stats["entropy_max"] = torch.tensor(math.log(E))
    return stats


@dataclass(frozen=True)
class IntervalSummary:
    """Load balance and I(expert; domain) of counts summed over a log interval or an evaluation."""
    dropped_fraction: float
    load_cv: float  # std / mean of the pre-drop load, population std
    load_max_over_mean: float
    entropy_load: float  # of where the routed pairs went
    mi_domain: float | None = None  # None: no label table, or no labelled pair in it
    mi_domain_normalized: float | None = None


def interval_summary(load_E: Tensor, kept_E: Tensor, joint_EL: Tensor | None = None) -> IntervalSummary:
    """Ratios of the summed counts, not means of per-batch ratios (which would weight a small batch
    like a large one). Computed in the counts' dtype: the trainer sums in float32, evaluation in
    float64."""
    mean_load = float(load_E.mean().clamp_min(1e-12))
    mi = mi_norm = None
    if joint_EL is not None and float(joint_EL.sum()) > 0:
        mi, mi_norm = (float(v) for v in mutual_information(joint_EL))
    return IntervalSummary(
        dropped_fraction=float(1.0 - kept_E.sum() / load_E.sum().clamp_min(1.0)),
        load_cv=float(load_E.std(unbiased=False)) / mean_load,
        load_max_over_mean=float(load_E.max()) / mean_load,
        entropy_load=float(entropy(load_E / load_E.sum().clamp_min(1.0))),
        mi_domain=mi, mi_domain_normalized=mi_norm)
