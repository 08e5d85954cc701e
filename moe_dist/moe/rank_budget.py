"""Bounded dispatch: a receive budget per (source rank, destination EP rank) in front of the experts.

Legend: moe_dist/moe/__init__.py (Q = T*K pairs, numbered choice-major `q = k*T + t` as in
capacity.py; P destination ranks; G tokens of one source group).

Without it a dropless layer's receive buffer is as large as the step's worst routing: every
source rank may send all of its T*K pairs to one rank, P*T*K rows. `moe.rank_capacity_factor`
(cf > 0) lets each source rank send at most

    B = max(1, ceil(cf * T * K / P))

rows to each destination EP rank (`rank_budget`): cf times that rank's fair share of this rank's
pairs. B is a function of the local shape and the config only, the same on every rank and every
step, so no rank needs to hear from the others to know it (no extra collective), and a rank
receives at most P*B rows whatever the routing. It sits after the per-expert capacity (capacity.py):
a pair competes for the budget only if its expert gave it a slot.

Pairs past a destination's budget are "over budget" and `moe.overflow` decides their fate
(`apply_rank_budget`):

- `drop`: inside each (source, destination) queue the pairs are ranked by routing weight, highest
  first (ties: position order, `q`); the first B keep their slot, the rest are dropped (they add
  nothing to the token's output, as a capacity drop).
- `spill`: an over-budget pair moves to the token's next-ranked expert, by the router's
  probabilities `probs_TE` (never by a selection bias), among the experts the token did not
  choose, whose destination rank still has budget and, under a capacity, whose queue still has
  a slot. One candidate per round, `moe.spill_choices` rounds (at most E - K): in round j each
  token with a pair still waiting offers its lowest-k waiting pair its j-th best unchosen expert;
  the offers to one destination are taken in order of the waiting pair's weight (ties: token
  order) while it has room. A pair still waiting after the last round is dropped. Weights: the
  spilled pair's weight becomes the new expert's probability `probs_TE[t, e']`, then the
  token's K weights (kept, spilled and dropped alike) are rescaled so that their sum is the sum
  of the router's K weights; a token with no spilled pair keeps its weights bit for bit.
  Routers without a probability matrix (`fixed_projection`) have no next choice to spill to:
  the config refuses `overflow: spill` for them by name.
- `error`: the run stops with `BudgetOverflowError` naming the layer, the source and destination
  ranks, the hottest expert there and the loads. Deciding it needs the counts on the host: the
  only host read the budget makes, and only under `error`. At EP > 1 it rides on the dispatch's
  own count exchange and split read (moe/dispatch.py, `report_R`), so every rank learns of an
  overflow anywhere in the same forward and all of them stop together: no rank is left waiting
  in an all-to-all.

All of it is vectorised over pairs, with a fixed number of sorts per round and no host read
(`drop`, `spill`), and deterministic: every sort is stable and every tie has a stated order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from moe_dist.moe.capacity import SlotPlan

OVERFLOW_POLICIES = ("drop", "spill", "error")
# Routers whose output has no probability matrix: nothing ranks the experts a token did not pick.
ROUTERS_WITHOUT_SCORES = ("fixed_projection", "hash")


class BudgetOverflowError(RuntimeError):
    """A pair went over the receive budget under `moe.overflow: error`."""


def rank_budget(num_tokens: int, top_k: int, ranks: int, factor: float) -> int | None:
    """Rows one source rank of `num_tokens` tokens may send each of `ranks` destination ranks:
    `max(1, ceil(factor * T * K / ranks))`; None (no budget) when `factor` is 0."""
    if factor <= 0:
        return None
    return max(1, math.ceil(factor * num_tokens * top_k / ranks))


@dataclass
class BudgetedRoute:
    """The routing the experts serve after the budget: `plan.keep_TK` says which pairs got a slot,
    `plan.spilled_TK` which of those were moved to `idx_TK`'s new expert."""

    idx_TK: Tensor  # int64: the router's choices, a spilled pair's replaced by its new expert
    w_TK: Tensor  # combine weights (carry the router's gradient); renormalised where a pair spilled
    plan: SlotPlan
    over_budget_TK: Tensor  # bool: had an expert slot, but not within its destination's budget
    budget: int


def _count(ids: Tensor, size: int, weights: Tensor) -> Tensor:
    """Integer counts of `ids` (< size) weighted by `weights`, by scatter_add (no host read)."""
    return torch.zeros(size, dtype=torch.long, device=ids.device).scatter_add_(0, ids, weights.long())


def _place_in_queue(queue_X: Tensor, num_queues: int, priority_X: Tensor) -> Tensor:
    """Each item's place in its queue (0 first), highest `priority_X` first, ties by index.
    Items in queue `num_queues` (a sentinel past the real ones) get places there too."""
    by_priority = torch.sort(priority_X, descending=True, stable=True).indices
    order = by_priority[torch.sort(queue_X[by_priority], stable=True).indices]
    sizes = _count(queue_X, num_queues + 1, torch.ones_like(queue_X))
    start = torch.cumsum(sizes, 0) - sizes
    place_X = torch.empty_like(queue_X)
    place_X[order] = torch.arange(queue_X.numel(), device=queue_X.device) - start[queue_X[order]]
    return place_X


def overflow_report(idx_TK: Tensor, keep_TK: Tensor, num_experts: int, ranks: int, num_groups: int = 1) -> Tensor:
    """int64 [num_groups, 4] per source group: (rows asked of its most asked destination rank,
    that rank, the expert there asked for most by this group, that expert's rows). Ties: the
    lowest rank, the lowest expert. What `moe.overflow: error` reads to name the overflow."""
    T, K = idx_TK.shape
    E, e = num_experts, num_experts // ranks
    group_T = torch.arange(T, device=idx_TK.device) // (T // num_groups)
    cell_TK = group_T[:, None] * E + idx_TK
    rows_gE = _count(cell_TK.reshape(-1), num_groups * E, keep_TK.reshape(-1)).view(num_groups, E)
    rows_gP = rows_gE.view(num_groups, ranks, e).sum(-1)
    asked_g, dest_g = rows_gP.max(-1)  # max returns the first maximal index
    dest_rows_ge = rows_gE.view(num_groups, ranks, e).gather(1, dest_g[:, None, None].expand(-1, 1, e))[:, 0]
    hot_rows_g, hot_local_g = dest_rows_ge.max(-1)
    return torch.stack([asked_g, dest_g, dest_g * e + hot_local_g, hot_rows_g], dim=1)


def raise_on_overflow(reports_g4: list[list[int]], budget: int, *, layer: int, factor: float,
                      first_rank: int = 0) -> None:
    """`overflow_report`'s rows, read to the host (one per source rank, rank `first_rank + i`):
    raise `BudgetOverflowError` for the first that asks more than `budget` of a rank."""
    for i, (asked, dest, expert, rows) in enumerate(reports_g4):
        if asked > budget:
            raise BudgetOverflowError(
                f"MoE layer {layer}: EP rank {first_rank + i} routed {asked} rows to EP rank {dest}, over its "
                f"receive budget of {budget} rows (moe.rank_capacity_factor {factor:g}, moe.overflow: error); "
                f"expert {expert} alone got {rows} of them. Raise moe.rank_capacity_factor, or set "
                f"moe.overflow: drop or spill")


def apply_rank_budget(idx_TK: Tensor, w_TK: Tensor, plan: SlotPlan, *, num_experts: int, ranks: int,
                      budget: int, policy: str, probs_TE: Tensor | None = None, spill_choices: int = 1,
                      num_groups: int = 1) -> BudgetedRoute:
    """The routing after the receive budget (module docstring). `plan` is the capacity's slot plan
    of `idx_TK`; `num_groups` equal contiguous token groups are the source ranks (1 on an EP
    rank; the single-process reference passes its `capacity_groups`), `ranks` the destination EP
    ranks (expert x lives on rank x // (E / ranks)). Under `error` the pairs past the budget are
    dropped as under `drop`; the caller raises (`overflow_report`, `raise_on_overflow`)."""
    if policy not in OVERFLOW_POLICIES:
        raise ValueError(f"overflow policy must be one of {OVERFLOW_POLICIES}, got {policy!r}")
    T, K = idx_TK.shape
    E, P = num_experts, ranks
    e = E // P
    device = idx_TK.device
    if T % num_groups or E % P:
        raise ValueError(f"num_groups ({num_groups}) must divide the tokens ({T}) and ranks ({P}) the experts ({E})")
    group_T = torch.arange(T, device=device) // (T // num_groups)
    num_queues = num_groups * P

    # Budget queues over the pairs that have an expert slot; the others wait in the sentinel queue.
    keep_Q = plan.keep_TK.t().reshape(-1)
    idx_Q = idx_TK.t().reshape(-1)
    queue_Q = torch.where(keep_Q, group_T.repeat(K) * P + idx_Q // e, num_queues)
    within_Q = _place_in_queue(queue_Q, num_queues, w_TK.detach().t().reshape(-1).float()) < budget
    over_TK = (keep_Q & ~within_Q).view(K, T).t()
    keep_TK = plan.keep_TK & ~over_TK
    spilled_TK = torch.zeros_like(keep_TK)

    if policy == "spill":
        if probs_TE is None:
            raise ValueError("overflow 'spill' needs the router's probabilities (probs_TE); this router gives "
                             "none: use moe.overflow 'drop' or 'error'")
        idx_TK, w_TK, keep_TK, spilled_TK = _spill(
            idx_TK, w_TK, keep_TK, over_TK, probs_TE, plan.capacity, group_T, E=E, P=P, budget=budget,
            rounds=min(spill_choices, E - K), num_groups=num_groups)

    kept_E = _count(idx_TK.reshape(-1), E, keep_TK.reshape(-1))
    slot_TK = plan.slot_TK
    if policy == "spill":
        # A spilled pair's place in its new expert's queue: after every pair that kept a slot there.
        cell_TK = group_T[:, None] * E + idx_TK
        stay_TK = keep_TK & ~spilled_TK
        before = _count(cell_TK.reshape(-1), num_groups * E, stay_TK.reshape(-1))
        sp_Q = spilled_TK.t().reshape(-1)
        cell_Q = torch.where(sp_Q, cell_TK.t().reshape(-1), num_groups * E)
        place_Q = _place_in_queue(cell_Q, num_groups * E, torch.zeros(cell_Q.shape, device=device))
        new_slot_Q = torch.cat([before, before.new_zeros(1)])[cell_Q] + place_Q
        slot_TK = torch.where(spilled_TK, new_slot_Q.view(K, T).t(), slot_TK)
    new_plan = replace(plan, slot_TK=slot_TK, keep_TK=keep_TK, kept_E=kept_E, spilled_TK=spilled_TK)
    return BudgetedRoute(idx_TK=idx_TK, w_TK=w_TK, plan=new_plan, over_budget_TK=over_TK, budget=budget)


def _spill(idx_TK: Tensor, w_TK: Tensor, keep_TK: Tensor, over_TK: Tensor, probs_TE: Tensor,
           capacity: int | None, group_T: Tensor, *, E: int, P: int, budget: int, rounds: int,
           num_groups: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    T, K = idx_TK.shape
    e = E // P
    device = idx_TK.device
    # Candidates: the experts the token did not choose, best probability first (ties: lower id).
    unchosen_TE = torch.ones(T, E, dtype=torch.bool, device=device).scatter_(1, idx_TK, False)
    scores_TE = torch.where(unchosen_TE, probs_TE.detach().float(), -math.inf)
    cand_TR = torch.sort(scores_TE, dim=1, descending=True, stable=True).indices[:, :rounds]

    rank_queue_T = group_T * P
    expert_queue_T = group_T * E
    used_rank = _count((group_T[:, None] * P + idx_TK // e).reshape(-1), num_groups * P, keep_TK.reshape(-1))
    used_expert = _count((expert_queue_T[:, None] + idx_TK).reshape(-1), num_groups * E, keep_TK.reshape(-1))
    waiting_TK = over_TK
    spilled_TK = torch.zeros_like(over_TK)
    w_priority_TK = w_TK.detach().float()
    k_K = torch.arange(K, device=device)
    for j in range(rounds):
        offers_T = waiting_TK.any(1)
        # The lowest k still waiting (argmax returns the first maximum).
        k_T = waiting_TK.to(torch.int8).argmax(1)
        pick_TK = offers_T[:, None] & (k_K[None, :] == k_T[:, None])
        cand_T = cand_TR[:, j]
        priority_T = w_priority_TK.gather(1, k_T[:, None])[:, 0]
        ok_T = offers_T
        if capacity is not None:
            eq_T = torch.where(ok_T, expert_queue_T + cand_T, num_groups * E)
            room = capacity - used_expert
            ok_T = ok_T & (_place_in_queue(eq_T, num_groups * E, priority_T)
                           < torch.cat([room, room.new_zeros(1)])[eq_T])
        rq_T = torch.where(ok_T, rank_queue_T + cand_T // e, num_groups * P)
        room = budget - used_rank
        ok_T = ok_T & (_place_in_queue(rq_T, num_groups * P, priority_T) < torch.cat([room, room.new_zeros(1)])[rq_T])

        moved_TK = pick_TK & ok_T[:, None]
        idx_TK = torch.where(moved_TK, cand_T[:, None], idx_TK)
        spilled_TK = spilled_TK | moved_TK
        waiting_TK = waiting_TK & ~moved_TK
        used_rank = used_rank + _count(rank_queue_T + cand_T // e, num_groups * P, ok_T)
        used_expert = used_expert + _count(expert_queue_T + cand_T, num_groups * E, ok_T)

    keep_TK = keep_TK | spilled_TK
    new_w_TK = torch.where(spilled_TK, probs_TE.gather(1, idx_TK).to(w_TK.dtype), w_TK)
    scale_T1 = w_TK.sum(1, keepdim=True) / new_w_TK.sum(1, keepdim=True)
    w_TK = torch.where(spilled_TK.any(1, keepdim=True), new_w_TK * scale_T1, w_TK)
    return idx_TK, w_TK, keep_TK, spilled_TK
