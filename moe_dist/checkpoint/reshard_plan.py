"""The optimizer param groups a run at another EP size builds, derived from a checkpoint's.

moe_dist's trainer builds its groups as `optimizer_param_groups` does (moe_dist/train/engine.py):
dense groups, then DeepSpeed's `split_params_into_different_moe_groups_for_optimizer` moves the
expert parameters of each group into a copy named `ep_size_<P>` with `moe: True` and cuts it into
chunks of at most `max_group_size` elements of *local* parameters. At another EP size the local
sizes change, so the chunks can too; dense groups never change. A resharded checkpoint must list
exactly the groups the resumed run will build, or DeepSpeed's load fails.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

from moe_dist.checkpoint.zero import ZeroGroup
from moe_dist.parallel.groups import expert_group_name


@dataclass
class PlannedGroup:
    source: int  # the checkpoint group whose hyperparameters and unpartitioned state it takes
    hyper: dict[str, Any]
    names: list[str]
    is_moe: bool


def max_moe_group_size() -> int:
    """The chunk size the installed DeepSpeed splits expert groups at (its default argument)."""
    return inspect.signature(split_params_into_different_moe_groups_for_optimizer).parameters["max_group_size"].default


def _chunks(names: list[str], numel: Callable[[str], int], max_size: int) -> list[list[str]]:
    """DeepSpeed's greedy split; it can emit an empty first chunk, which the engine drops."""
    chunks, current, size = [], [], 0
    for name in names:
        n = numel(name)
        if size + n <= max_size:
            current.append(name)
            size += n
        else:
            chunks.append(current)
            current, size = [name], n
    if current:
        chunks.append(current)
    return [c for c in chunks if c]


def plan_groups(groups: list[ZeroGroup], local_numel: Callable[[str], int], ep_size: int,
                max_group_size: int | None = None) -> list[PlannedGroup]:
    """Groups for EP size `ep_size`, in the checkpoint's order. Consecutive expert groups with
    equal hyperparameters are the chunks of one split group (the trainer derives at most one
    expert group per dense group, and dense groups differ in weight decay) and are re-chunked
    together with the new local sizes (`max_group_size`: DeepSpeed's default unless given)."""
    max_group_size = max_group_size or max_moe_group_size()
    out: list[PlannedGroup] = []
    i = 0
    while i < len(groups):
        first = groups[i]
        if not first.is_moe:
            out.append(PlannedGroup(source=i, hyper=dict(first.hyper), names=list(first.names), is_moe=False))
            i += 1
            continue
        names, j = [], i
        while j < len(groups) and groups[j].is_moe and groups[j].hyper == first.hyper:
            names += groups[j].names
            j += 1
        hyper = {**first.hyper, "name": expert_group_name(ep_size)}
        for chunk in _chunks(names, local_numel, max_group_size):
            out.append(PlannedGroup(source=i, hyper=hyper, names=chunk, is_moe=True))
        i = j
    return out


def remap_per_group(state: dict[str, Any], n_old: int, sources: list[int]) -> dict[str, Any]:
    """An LR scheduler state with every per-group list (length `n_old`) re-indexed to the new
    groups: new group k takes old group `sources[k]`'s entry."""
    return {key: [value[s] for s in sources] if isinstance(value, list) and len(value) == n_old else value
            for key, value in state.items()}
