"""Process groups for expert parallelism, built once and passed explicitly (never WORLD by default).

Layout (the same as DeepSpeed's `_create_expert_and_data_parallel`, so its engine and ours agree
on who holds which expert), for world size W and expert-parallel size P:
    expert-parallel (EP) groups:       [0..P-1], [P..2P-1], ...    all-to-all of tokens
    expert-data-parallel (EDP) groups: {r : r % P == i}            all-reduce of expert grads
    data-parallel (DP) group:          all W ranks                 all-reduce of dense grads
Rank r holds global experts [(r % P) * E/P, (r % P + 1) * E/P).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from moe_dist.common.config import ConfigError
from moe_dist.parallel import collectives


def expert_group_name(ep_size: int) -> str:
    """DeepSpeed's name for the expert groups of this EP size (`param.group_name`)."""
    return f"ep_size_{ep_size}"


def validate_parallel_sizes(world_size: int, ep_size: int, num_experts: int | None = None) -> None:
    if ep_size < 1:
        raise ConfigError(f"ep_size must be >= 1, got {ep_size}")
    if world_size % ep_size:
        raise ConfigError(f"world size ({world_size}) must be divisible by ep_size ({ep_size})")
    if num_experts is not None and num_experts % ep_size:
        raise ConfigError(f"num_experts ({num_experts}) must be divisible by ep_size ({ep_size})")


@dataclass(frozen=True)
class ParallelGroups:
    world_size: int
    rank: int
    ep_size: int
    ep_group: Any = None  # None: a single-member group, no collective needed
    edp_group: Any = None
    dp_group: Any = None

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep_size

    @property
    def edp_size(self) -> int:
        return self.world_size // self.ep_size

    @property
    def dp_size(self) -> int:
        return self.world_size

    @property
    def group_name(self) -> str:
        return expert_group_name(self.ep_size)

    @classmethod
    def single(cls) -> "ParallelGroups":
        return cls(world_size=1, rank=0, ep_size=1)

    @classmethod
    def build(cls, ep_size: int, num_experts: int | None = None) -> "ParallelGroups":
        """Create the groups; every rank must call this with the same arguments."""
        if not dist.is_initialized():
            validate_parallel_sizes(1, ep_size, num_experts)
            return cls.single()
        world, rank = dist.get_world_size(), dist.get_rank()
        validate_parallel_sizes(world, ep_size, num_experts)
        ep_group = edp_group = None
        # new_group is collective over WORLD: all ranks create every group in the same order.
        for start in range(0, world, ep_size):
            ranks = list(range(start, start + ep_size))
            group = dist.new_group(ranks)
            if rank in ranks:
                ep_group = group
        for i in range(ep_size):
            ranks = list(range(i, world, ep_size))
            group = dist.new_group(ranks)
            if rank in ranks:
                edp_group = group
        return cls(world_size=world, rank=rank, ep_size=ep_size, ep_group=ep_group,
                   edp_group=edp_group, dp_group=dist.new_group(list(range(world))))

    @classmethod
    def from_deepspeed(cls, ep_size: int, num_experts: int | None = None) -> "ParallelGroups":
        """Adopt (creating if needed) DeepSpeed's expert groups, so its engine reduces our expert
        gradients over exactly the groups our all-to-all uses."""
        from deepspeed.utils import groups as ds_groups

        world, rank = dist.get_world_size(), dist.get_rank()
        validate_parallel_sizes(world, ep_size, num_experts)
        name = expert_group_name(ep_size)
        if name not in ds_groups._get_expert_parallel_group_dict():
            ds_groups._create_expert_and_data_parallel(ep_size)
        return cls(world_size=world, rank=rank, ep_size=ep_size,
                   ep_group=ds_groups._get_expert_parallel_group(name),
                   edp_group=ds_groups._get_expert_data_parallel_group(name),
                   dp_group=ds_groups._get_data_parallel_group())

    def all_reduce_sum_dp(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of a detached tensor over the data-parallel group (a new tensor on `t`'s device, reduced
        on the device the group serves; input untouched)."""
        if self.dp_size == 1:
            return t
        return collectives.all_reduce(t, "sum", self.dp_group)
