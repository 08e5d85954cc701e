"""Expert capacity and slot assignment: which routed (token, choice) pairs an expert accepts.

Legend: moe_dist/moe/__init__.py (Q = T*K routed (token, choice) pairs, the "slots").

Pairs are numbered choice-major, `q = k*T + t`, so a stable sort by expert keeps "every first
choice before any second choice, then token order" inside each expert: the `position` policy
falls out of the numbering, and `probs` is a stable sort by weight before the sort by expert.
Pure functions of tensors: the layer, the tests and the single-process reference all call them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float,
                    min_capacity: int, dropless: bool = False) -> int | None:
    """Slots per expert for one source rank: `max(ceil(cf*T*K/E), min_capacity)`, at most T.

    None means no limit (dropless, or `capacity_factor` 0; the config refuses negative ones). The cap at T changes nothing
    (a token never picks the same expert twice) but keeps buffers bounded.
    """
    if dropless or capacity_factor <= 0:
        return None
    capacity = max(math.ceil(capacity_factor * num_tokens * top_k / num_experts), min_capacity)
    return min(capacity, num_tokens)


@dataclass
class SlotPlan:
    slot_TK: Tensor  # int64: this pair's place in its expert's queue (0 = served first)
    keep_TK: Tensor  # bool: the pair got a slot (slot < capacity)
    load_E: Tensor  # int64: pairs that chose each expert (before drops)
    kept_E: Tensor  # int64: pairs each expert accepted (after drops)
    capacity: int | None  # per expert and per capacity group; None = no limit
    # bool: the pair got its slot at another expert than the router chose (moe.overflow: spill,
    # moe/rank_budget.py); False everywhere without a receive budget. keep_TK & ~spilled_TK: kept
    # where routed; ~keep_TK: dropped.
    spilled_TK: Tensor


def _count(ids: Tensor, size: int, weights: Tensor | None = None) -> Tensor:
    """`torch.bincount(ids, weights, minlength=size)` for ids known to be below `size`, as int64,
    without reading the device (integer adds: the same result in any order)."""
    ones = torch.ones_like(ids) if weights is None else weights
    return torch.zeros(size, dtype=torch.long, device=ids.device).scatter_add_(0, ids, ones)


def assign_slots(idx_TK: Tensor, num_experts: int, capacity: int | None, policy: str = "position",
                 priority_TK: Tensor | None = None, num_groups: int = 1,
                 valid_T: Tensor | None = None) -> SlotPlan:
    """Queue every (token, choice) pair at its expert and keep the first `capacity` of each queue.

    `policy="position"`: first choices before second choices, then token order.
    `policy="probs"`: highest `priority_TK` first (ties: position order).
    `num_groups` splits the T tokens into equal contiguous groups, each with its own queues and
    `capacity`: a single process holding the tokens of n ranks uses `num_groups=n` to drop
    exactly what each rank of an expert-parallel run drops.
    `valid_T` (bool, False = padding): padding pairs are dropped before slots are handed out (they
    queue behind every expert, in a queue of their own), so they never take a real token's slot,
    never reach an expert and are in neither load.
    """
    T, K = idx_TK.shape
    E = num_experts
    if T % num_groups:
        raise ValueError(f"num_groups ({num_groups}) must divide the number of tokens ({T})")
    idx_Q = idx_TK.t().reshape(-1)  # choice-major pair order
    group_Q = (torch.arange(T, device=idx_TK.device) // (T // num_groups)).repeat(K)
    queue_Q = group_Q * E + idx_Q  # one queue per (group, expert)
    valid_Q = None
    if valid_T is not None:
        valid_Q = valid_T.reshape(-1).repeat(K)
        queue_Q = torch.where(valid_Q, queue_Q, num_groups * E)  # padding's own queue, served last

    if policy == "probs":
        if priority_TK is None:
            raise ValueError("drop policy 'probs' needs priority_TK")
        by_priority = torch.sort(priority_TK.t().reshape(-1).detach(), descending=True, stable=True).indices
        order = by_priority[torch.sort(queue_Q[by_priority], stable=True).indices]
    elif policy == "position":
        order = torch.sort(queue_Q, stable=True).indices
    else:
        raise ValueError(f"drop policy must be 'position' or 'probs', got {policy!r}")

    # Counts by scatter_add, never bincount: bincount sizes its output by the largest value, which
    # on a GPU is a read of the device (a host sync) even with `minlength`.
    queue_sizes = _count(queue_Q, num_groups * E + 1)
    queue_start = torch.cumsum(queue_sizes, 0) - queue_sizes
    sorted_queue = queue_Q[order]
    slot_Q = torch.empty_like(idx_Q)
    slot_Q[order] = torch.arange(idx_Q.numel(), device=idx_Q.device) - queue_start[sorted_queue]

    keep_Q = torch.ones_like(idx_Q, dtype=torch.bool) if capacity is None else slot_Q < capacity
    load_E = _count(idx_Q, E)
    if valid_Q is not None:
        keep_Q = keep_Q & valid_Q
        load_E = _count(idx_Q, E, valid_Q.long())
    kept_E = _count(idx_Q, E, keep_Q.long())
    return SlotPlan(slot_TK=slot_Q.view(K, T).t(), keep_TK=keep_Q.view(K, T).t(), load_E=load_E,
                    kept_E=kept_E, capacity=capacity, spilled_TK=torch.zeros_like(keep_Q).view(K, T).t())
