"""Process-level distributed runtime for the trainer: start-up, rank facts, barrier, reductions.

The trainer never imports torch.distributed itself; it calls these. Everything works without a
process group too (one process), so the same trainer code runs single-process references.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def env_world_size() -> int:
    """World size the launcher announced (WORLD_SIZE), readable before any process group exists,
    so configs can be validated against it first."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def env_local_size() -> int:
    """Processes on this node (the deepspeed launcher sets LOCAL_SIZE; torchrun LOCAL_WORLD_SIZE)."""
    return int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))


def init_distributed() -> None:
    """DeepSpeed's process-group start-up (gloo on its CPU accelerator, NCCL on GPUs). On GPUs the
    rank's device is selected first, so that groups and buffers created before the engine exists
    do not all land on GPU 0."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        accelerator.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    deepspeed.init_distributed()


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean over all ranks of a detached tensor (a new tensor; the input is untouched)."""
    out = t.detach().clone()
    if is_initialized():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        out /= dist.get_world_size()
    return out


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    out = t.detach().clone()
    if is_initialized():
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out


def broadcast_object(obj, src: int = 0):
    """`obj` from rank `src` on every rank (e.g. one rank's decision to stop)."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def destroy() -> None:
    if is_initialized():
        dist.destroy_process_group()
