"""Data-parallel gradient reduction for a model with expert-parallel parameters.

Each rank back-propagates its own mean loss; the target is the gradient of the mean over ranks.
Dense parameters: sum over all W ranks, divide by W. Expert parameters: the all-to-all backward
already summed the contributions of the P ranks of the EP group into the expert's owner, so sum
over the W/P expert-data-parallel replicas and divide by W as well (not by W/P: dividing by the
EDP size is the classic bug that scales expert gradients by P).

DeepSpeed's engine performs this reduction itself (tests prove it agrees); this function serves
plain-PyTorch training loops and is the reference those tests compare against.
"""

from __future__ import annotations

from torch import nn

from moe_dist.parallel import collectives
from moe_dist.parallel.groups import ParallelGroups


def is_expert_param(p: nn.Parameter) -> bool:
    """DeepSpeed's marker for parameters that are sharded over the EP group."""
    return getattr(p, "allreduce", True) is False


def reduce_gradients(model: nn.Module, groups: ParallelGroups) -> None:
    if groups.world_size == 1:
        return
    for p in model.parameters():
        if p.grad is None:
            continue
        group = groups.edp_group if is_expert_param(p) else groups.dp_group
        collectives.all_reduce_(p.grad, "sum", group)
        p.grad.div_(groups.world_size)
