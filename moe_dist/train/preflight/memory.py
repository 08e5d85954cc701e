"""Preflight's memory check: the per-rank estimate of moe_dist/train/memory_plan.py (what
`tools/estimate_memory.py` prints) against the memory the ranks will draw from, before any tensor
exists. Without it a model that cannot fit fails in its first allocation with a traceback
(`DefaultCPUAllocator: can't allocate memory`, exit 1), or the OOM killer ends a rank without a
word about memory.

On a GPU each rank has its device to itself: the estimate (with the CUDA context, NCCL buffers
and the fragmentation margin) is compared with the device's total memory. On CPU the ranks of a
host share its RAM: the estimate times the ranks on this host is compared with what the kernel
reports as available now (MemAvailable). The estimate counts tensors only (not Python, torch and
DeepSpeed themselves, nor the data pipeline), so a run it lets through can still be tight; a run
it refuses cannot fit. One term is trimmed on CPU: DeepSpeed allocates its gradient reduction
buckets at `reduce_bucket_size` (500M elements by default, 1.86 GiB in fp32) whatever the model's
size, but the host commits only the pages the gradients are written to, never more than the
rank's parameters; counted in full, a tiny test run would need 2 GiB per rank.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from moe_dist.common.config import ConfigError
from moe_dist.parallel import runtime
from moe_dist.train.config import RunConfig
from moe_dist.train.memory_plan import DTYPE_BYTES, GiB, MemoryPlan, ZeroSettings, estimate, mode_of

MEMINFO = "/proc/meminfo"


def host_available_bytes(path: str = MEMINFO) -> int | None:
    """MemAvailable of /proc/meminfo in bytes; None where the file or the field is missing."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the kernel reports kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def untouched_bucket_bytes(plan: MemoryPlan) -> int:
    """The part of the reduction buckets the plan counts that no gradient is ever written to."""
    zero = plan.zero
    if zero.stage < 1 or not zero.contiguous_gradients:
        return 0
    unused = max(0, zero.reduce_bucket_size - plan.dense_params - plan.expert_params)
    return unused * DTYPE_BYTES[zero.dtype] * (2 if zero.overlap_comm else 1)


def check_memory(cfg: RunConfig, ds_config: dict[str, Any], world_size: int, cuda: bool | None = None,
                 available: int | None = None) -> None:
    """Refuse a run whose estimated memory exceeds what its ranks have (`available`: bytes, read
    from the device or /proc/meminfo when None)."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    plan = estimate(cfg.model, ZeroSettings.from_deepspeed(ds_config), world_size=world_size,
                    micro_batch=cfg.train.micro_batch, seq_len=cfg.train.seq_len, gpu_experts=cuda,
                    gpu_runtime=cuda)
    mode = mode_of(cfg.model)
    per_rank = plan.total(mode) - (0 if cuda else untouched_bucket_bytes(plan))
    ranks = 1 if cuda else max(1, runtime.env_local_size())
    if available is None:
        if cuda:
            available = torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", "0"))).total_memory
        else:
            available = host_available_bytes()
    if available is None or per_rank * ranks <= available:
        return
    where = (f"the GPU's {available / GiB:.2f} GiB" if cuda else
             f"{available / GiB:.2f} GiB of host RAM available now (MemAvailable, {MEMINFO})")
    times = "" if ranks == 1 else f" x {ranks} ranks on this host = {per_rank * ranks / GiB:.2f} GiB"
    device = "cuda" if cuda else "cpu"
    raise ConfigError(
        f"the run does not fit in memory: the estimate is {per_rank / GiB:.2f} GiB per rank (weights "
        f"{plan.weights / GiB:.2f}, gradients {plan.gradients / GiB:.2f}, optimizer {plan.optimizer / GiB:.2f}, "
        f"activations {plan.activations[mode] / GiB:.2f} GiB at micro batch {plan.micro_batch} x {plan.seq_len} "
        f"tokens, {mode}){times}, more than {where}; shrink the model, train.micro_batch or the ranks per host, "
        f"or raise moe.ep_size or the ZeRO stage (see python tools/estimate_memory.py CONFIG --world-size "
        f"{world_size} --device {device})")

