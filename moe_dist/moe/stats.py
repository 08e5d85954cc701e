"""Per-layer routing statistics (docs/routers/statistics.md): this rank's own counts, on the device.

Legend: moe_dist/moe/__init__.py.

Everything here is detached. `route_statistics` runs in every forward and makes no collective
and no host read: it returns this rank's counts (float32, on the layer's device) and the ratios
of those counts. Whoever logs them (the trainer, evaluation) sums the summable counts over ranks
once per interval and takes the ratios of the sums (`interval_summary`). The one collective left
in the forward is `loss_counts`': the global counts a weighted loss is defined on. Padding
(`valid_T` False) is in no count.
`interval_summary` reads the host and runs once per log interval or evaluation.

Summable keys (sum over ranks = the counts of one process holding every rank's tokens):
`tokens_per_expert` [E] (routed pairs, before drops), `tokens_per_expert_kept` [E], `num_tokens`
[], `importance` [E] (sum of the probabilities; routers with probabilities), `entropy_token_sum`
[] (sum over tokens of H(probs_t); the same routers), `expert_label_counts` [E, L] (with labels);
with a receive budget (`moe.rank_capacity_factor`, moe/rank_budget.py) `pairs_over_budget`,
`pairs_spilled` and `pairs_budget_dropped` [] (`budget_statistics`).
`num_tokens` counts real tokens only; so do all the others.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Container
from dataclasses import dataclass

import torch
from torch import Tensor

from moe_dist.moe.capacity import SlotPlan
from moe_dist.routing.base import RouterOutput


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
    """Routed pairs per (expert, label), float32; tokens labelled -1 are ignored. By scatter_add:
    bincount would read the device to size its output."""
    K = idx_TK.shape[1]
    labels_Q = labels_T.reshape(-1, 1).expand(-1, K).reshape(-1)
    valid = (labels_Q >= 0).float()
    cell = idx_TK.reshape(-1) * num_labels + labels_Q.clamp_min(0)
    counts = torch.zeros(num_experts * num_labels, device=idx_TK.device).scatter_add_(0, cell, valid)
    return counts.view(num_experts, num_labels)


def route_statistics(route: RouterOutput, plan: SlotPlan, labels_T: Tensor | None = None,
                     num_labels: int = 0, valid_T: Tensor | None = None) -> dict[str, Tensor]:
    """This rank's statistics: the summable counts (module docstring) and their ratios.
    `valid_T`: False for padding, which no count includes (the plan's loads already leave it out:
    `assign_slots`' `valid_T`). None: every token is real."""
    E = plan.load_E.numel()
    T = route.idx_TK.shape[0]
    device = plan.load_E.device
    load_E, kept_E = plan.load_E.float(), plan.kept_E.float()
    valid_T = None if valid_T is None else valid_T.reshape(-1)
    num_tokens = (torch.full((), float(T), device=device) if valid_T is None
                  else valid_T.float().sum())
    stats = {"tokens_per_expert": load_E, "tokens_per_expert_kept": kept_E, "num_tokens": num_tokens}
    if route.probs_TE is not None:
        probs = route.probs_TE.detach().float()
        token_entropy_T = entropy(probs)
        if valid_T is not None:
            probs = torch.where(valid_T.unsqueeze(1), probs, torch.zeros_like(probs))
            token_entropy_T = torch.where(valid_T, token_entropy_T, torch.zeros_like(token_entropy_T))
        stats["importance"] = probs.sum(0)
        stats["entropy_token_sum"] = token_entropy_T.sum()
    if labels_T is not None and num_labels > 0:
        labels_T = labels_T.reshape(-1)
        if valid_T is not None:
            labels_T = torch.where(valid_T, labels_T, torch.full_like(labels_T, -1))
        stats["expert_label_counts"] = expert_label_counts(route.idx_TK, labels_T, E, num_labels)
    stats.update(count_ratios(stats))
    return stats


def budget_statistics(over_budget_TK: Tensor, spilled_TK: Tensor) -> dict[str, Tensor]:
    """This rank's receive-budget counts (summable, float32): pairs that had an expert slot but
    not within their destination rank's budget, those of them moved to another expert (spill),
    and those dropped (the difference)."""
    over = over_budget_TK.sum().float()
    spilled = spilled_TK.sum().float()
    return {"pairs_over_budget": over, "pairs_spilled": spilled, "pairs_budget_dropped": over - spilled}


def count_ratios(counts: dict[str, Tensor]) -> dict[str, Tensor]:
    """The ratios of summable counts (one rank's, or their sum over ranks), on their device."""
    load_E, kept_E = counts["tokens_per_expert"], counts["tokens_per_expert_kept"]
    E = load_E.numel()
    mean_load = load_E.mean().clamp_min(1e-12)
    ratios = {
        "dropped_fraction": 1.0 - kept_E.sum() / load_E.sum().clamp_min(1.0),
        "load_cv": load_E.std(unbiased=False) / mean_load,
        "load_max_over_mean": load_E.max() / mean_load,
        # Entropy of where slots went; equals H_u for routers without a probability matrix.
        "entropy_load": entropy(load_E / load_E.sum().clamp_min(1.0)),
    }
    if "importance" in counts:
        num_tokens = counts["num_tokens"].clamp_min(1.0)
        ratios["entropy_token"] = counts["entropy_token_sum"] / num_tokens  # H_s
        ratios["entropy_mean"] = entropy(counts["importance"] / num_tokens)  # H_u, at most log E
    if "expert_label_counts" in counts:
        ratios["mi_label"], ratios["mi_label_normalized"] = mutual_information(counts["expert_label_counts"])
    ratios["entropy_max"] = torch.full((), math.log(E), device=load_E.device)
    return ratios


# The counts each count-defined loss reads, by its scope (aux_loss.<loss>_scope), global over
# the data-parallel group when weighted. micro_batch reads this rank's own tokens only.
LOSS_COUNTS = {
    "switch": {"dp_global": ("tokens_per_expert", "num_tokens"), "global_batch": ("tokens_per_expert", "num_tokens"),
               "sequence": ("num_sequences",), "micro_batch": ()},
    "importance": {"dp_global": ("importance",), "global_batch": ("importance",),
                   "sequence": ("num_sequences",), "micro_batch": ()},
}


def loss_counts(stats: dict[str, Tensor], weighted: Container[str],
                all_reduce_sum: Callable[[Tensor], Tensor],
                scopes: dict[str, str] | None = None) -> dict[str, Tensor]:
    """The counts `routing.losses` reads: summed over the data-parallel group for the losses
    that are weighted (their gradient must be the global loss's), in ONE packed all-reduce;
    this rank's own for the losses that are only logged (no collective at all when none is
    weighted, or when every weighted one has the micro_batch scope). `scopes`: each loss's
    scope (None: dp_global)."""
    scopes = scopes or {}
    wanted = {key for loss, by_scope in LOSS_COUNTS.items() for key in by_scope[scopes.get(loss, "dp_global")]}
    names = sorted(key for key in wanted if key in stats
                   and any(loss in weighted and key in by_scope[scopes.get(loss, "dp_global")]
                           for loss, by_scope in LOSS_COUNTS.items()))
    out = {key: stats[key] for key in sorted(wanted) if key in stats}
    if names:
        packed = all_reduce_sum(torch.cat([stats[key].reshape(-1) for key in names]))
        for key, value in zip(names, packed.split([stats[key].numel() for key in names])):
            out[key] = value.view_as(stats[key])
    return out


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
