"""The launch's world size against the config's expert parallelism, with the hint a CPU user
needs: without `--num_gpus`, the `deepspeed` launcher starts one process per GPU, and on a machine
without GPUs one per NUMA node, so a 2-way expert-parallel config on a one-node CPU machine gets
world size 1. Light (no DeepSpeed, no Megatron-Core): launch/pretrain.py checks it before those
imports, preflight again for callers that do not go through the launcher script.
"""

from __future__ import annotations

import glob

from moe_dist.common.config import ConfigError
from moe_dist.model.config import ModelConfig
from moe_dist.parallel.groups import validate_parallel_sizes


def numa_nodes() -> int:
    """NUMA nodes of this machine (0 where the kernel does not say)."""
    return len(glob.glob("/sys/devices/system/node/node[0-9]*"))


def check_world_size(model: ModelConfig, world_size: int) -> None:
    moe = model.moe
    if moe is None:
        return
    try:
        validate_parallel_sizes(world_size, moe.ep_size, moe.num_experts)
    except ConfigError as e:
        if moe.ep_size < 1 or world_size % moe.ep_size == 0:
            raise
        nodes = numa_nodes()
        here = f" (this machine has {nodes})" if nodes else ""
        raise ConfigError(f"{e} (moe.ep_size); without --num_gpus the deepspeed launcher starts one process "
                          f"per GPU, and on a machine without GPUs one per NUMA node{here}: pass --num_gpus N "
                          f"with N a multiple of {moe.ep_size}, e.g. deepspeed --num_gpus {moe.ep_size} "
                          f"launch/pretrain.py ...") from None
