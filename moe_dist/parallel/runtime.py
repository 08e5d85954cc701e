"""Process-level distributed runtime for the trainer: start-up, rank facts, barrier, reductions.

The trainer never imports torch.distributed itself; it calls these. Everything works without a
process group too (one process), so the same trainer code runs single-process references. The
collectives go through `parallel.collectives`, which runs them on the device the group serves.
"""

from __future__ import annotations

import contextlib
import datetime
import os

import torch
import torch.distributed as dist

from moe_dist.parallel import collectives


def env_world_size() -> int:
    """World size the launcher announced (WORLD_SIZE), readable before any process group exists,
    so configs can be validated against it first."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def env_local_size() -> int:
    """Processes on this node (the deepspeed launcher sets LOCAL_SIZE; torchrun LOCAL_WORLD_SIZE)."""
    return int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))


def skip_shared_memory_allreduce() -> None:
    """Keep DeepSpeed's CPU accelerator from building and starting its shared-memory all-reduce.

    DeepSpeed starts it in `init_distributed` on CPU for `inference_all_reduce` (its inference
    tensor parallelism), which training never calls. Starting it costs a C++ build on a machine's
    first run, under a lock file that a process killed mid-build leaves behind, after which every
    later start waits on it for ever; under the `deepspeed` launcher, 66 MiB of /dev/shm per rank
    that nothing unlinks, so each run leaks them; and a wait for every local peer's segment with
    no timeout and the GIL held, which neither the watchdog nor a signal handler can interrupt.
    On GPUs DeepSpeed has no such op and this changes nothing. Call before the first start-up."""
    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    # DeepSpeed caches its op-compatibility table in the module and reads it at start-up.
    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


def init_distributed(timeout_s: float | None = None) -> None:
    """DeepSpeed's process-group start-up (gloo on its CPU accelerator, NCCL on GPUs). On GPUs the
    rank's device is selected first, so that groups and buffers created before the engine exists
    do not all land on GPU 0. `timeout_s`: the WORLD group's collective timeout (None: DeepSpeed's
    default, `DEEPSPEED_TIMEOUT` minutes); a group that already exists gets it set."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        accelerator.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        skip_shared_memory_allreduce()
    if timeout_s is None:
        deepspeed.init_distributed()
        return
    already = is_initialized()
    deepspeed.init_distributed(timeout=datetime.timedelta(seconds=timeout_s))
    if already:  # started by someone else (a test harness): the timeout must still apply
        dist.distributed_c10d._set_pg_timeout(datetime.timedelta(seconds=timeout_s), dist.group.WORLD)


@contextlib.contextmanager
def groups_created_with_timeout(timeout_s: float | None):
    """Every process group created inside gets `timeout_s` unless its creator passes one.

    DeepSpeed creates its expert, expert-data-parallel and data-parallel groups with
    `torch.distributed.new_group(ranks)` and no timeout (torch's default: 30 minutes on gloo),
    whatever timeout WORLD has; it looks `new_group` up on the module at each call, so wrapping
    the module attribute reaches every such call."""
    if timeout_s is None or not is_initialized():
        yield
        return
    original = dist.new_group
    timeout = datetime.timedelta(seconds=timeout_s)

    def new_group(*args, **kwargs):
        if kwargs.get("timeout") is None and len(args) < 2:
            kwargs["timeout"] = timeout
        return original(*args, **kwargs)

    dist.new_group = new_group
    try:
        yield
    finally:
        dist.new_group = original


def group_timeouts() -> dict[str, datetime.timedelta]:
    """Collective timeout of every process group this process belongs to, by group name (WORLD
    included): what the run's hang protection actually got."""
    if not is_initialized():
        return {}
    c10d = dist.distributed_c10d
    out = {}
    for group, name in c10d._world.pg_names.items():
        if c10d._rank_not_in_group(group):
            continue
        backend = group._get_backend(collectives.collective_device(group))
        out[name] = backend.options._timeout
    return out


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def barrier() -> None:
    collectives.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean over all ranks of a detached tensor (a new tensor on `t`'s device; the input is
    untouched)."""
    out = collectives.all_reduce(t, "sum")
    return out / world_size() if is_initialized() else out


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """Maximum over all ranks of a detached tensor (a new tensor on `t`'s device)."""
    return collectives.all_reduce(t, "max")


def enforce_group_timeouts(timeout_s: float) -> int:
    """Set `timeout_s` on any group of this process that has another (one created outside
    `groups_created_with_timeout`); returns how many groups the process belongs to."""
    timeout = datetime.timedelta(seconds=timeout_s)
    groups = {name: group for group, name in dist.distributed_c10d._world.pg_names.items()} if is_initialized() else {}
    for name, current in group_timeouts().items():
        if current != timeout:
            dist.distributed_c10d._set_pg_timeout(timeout, groups[name])
    return len(group_timeouts())


def all_gather_row(row: torch.Tensor) -> torch.Tensor:
    """[world, n] float64 on `row`'s device: every rank's `row` (n equal on all ranks), by one
    all-reduce, so a step's per-rank facts (flags, times, the grad norm) cost a single small
    collective and, read once, a single host sync."""
    return collectives.all_gather_row(row, rank(), world_size())


def default_store():
    """The key-value store the process group was started with (TCPStore under the deepspeed
    launcher), or None without a process group."""
    if not is_initialized():
        return None
    return dist.distributed_c10d._get_default_store()


def broadcast_object(obj, src: int = 0):
    """`obj` from rank `src` on every rank (e.g. one rank's decision to stop)."""
    return collectives.broadcast_object(obj, src)


def destroy() -> None:
    if is_initialized():
        dist.destroy_process_group()
