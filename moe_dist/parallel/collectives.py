"""The one way moe_dist issues a collective: every torch.distributed call that moves data (all-reduce,
all-to-all, the per-step row, object broadcast, barrier) is made here, on the device the group's
backend serves.

Why a seam: a backend serves only the device types it was registered for. NCCL serves CUDA and
nothing else, so a CPU tensor handed to an NCCL group fails (`No backend type associated with
device type cpu`), while gloo, the only backend CPU tests have, accepts it; reducing a tensor
where it lies therefore passes every CPU test and dies on the first GPU run. Here the device is
derived from the group itself (`ProcessGroup._device_types`, what `init_process_group` and
`new_group` registered: `nccl` -> cuda, `gloo` -> cpu, `cpu:gloo,cuda:nccl` -> both), never from a
global guess, and a tensor on a device the group does not serve is moved there and its result
moved back to where the caller had it (reductions), or refused with the caller's line (the
all-to-all, whose tokens must already live on the layer's device: a silent copy there would hide a
misplaced model).

`tests/harness/collective_guard.py` holds every launch of a test to this: a torch.distributed
collective called from any other moe_dist module fails there, and each one made here is checked
against its group's device types.
"""

from __future__ import annotations

import os
import traceback

import torch
import torch.distributed as dist
from torch import Tensor

_TORCH_DIR = os.path.dirname(torch.__file__).replace("\\", "/") + "/"
_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
_BACKEND_DEVICE = {"nccl": "cuda", "gloo": "cpu", "mpi": "cpu", "ucc": "cpu", "xccl": "xpu"}


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def served_device_types(group=None) -> list[str]:
    """Device types the backend(s) of `group` (None: WORLD) serve, as registered with the group."""
    pg = group if group is not None else dist.group.WORLD
    types = getattr(pg, "_device_types", None)
    if types:
        return [torch.device(t).type for t in types]
    # Torch versions without the registry: the backend string ("nccl", "cpu:gloo,cuda:nccl").
    out = []
    for part in str(dist.get_backend(pg)).split(","):
        device, _, backend = part.rpartition(":")
        out.append(device or _BACKEND_DEVICE.get(backend, "cpu"))
    return out


def _device_of_type(kind: str) -> torch.device:
    if kind == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(kind)


def collective_device(group=None, prefer: torch.device | None = None) -> torch.device:
    """Where a collective over `group` runs: `prefer` (the tensor's own device) when the group
    serves it, else the CPU when it serves the CPU (gloo registers itself for CPU and CUDA), else
    the accelerator it serves (for CUDA the rank's current GPU)."""
    types = served_device_types(group)
    if prefer is not None and prefer.type in types:
        return prefer
    return _device_of_type("cpu" if "cpu" in types else types[0])


def _caller() -> str:
    """The first frame outside moe_dist/parallel/ and torch (whose `torch.compiler.disable` wraps
    the seam's functions): whose collective this is."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        name = frame.filename.replace("\\", "/")
        if "/moe_dist/parallel/" not in name and not name.startswith(_TORCH_DIR):
            return f"{name.split('/moe_dist/', 1)[-1]}:{frame.lineno} ({frame.name})"
    return "moe_dist/parallel"


def check_served(what: str, tensors: list[Tensor], group=None) -> None:
    """ValueError naming the caller when a tensor is on a device type `group` does not serve."""
    types = served_device_types(group)
    for t in tensors:
        if t.device.type not in types:
            raise ValueError(f"{what} from {_caller()}: a tensor on {t.device} for a process group whose backend "
                             f"{dist.get_backend(group)!r} serves only {types}; put it on the group's device "
                             f"(moe_dist.parallel.collectives.collective_device)")


# Collectives run eagerly between compiled regions (`train.compile`, moe_dist/model/compile.py):
# dynamo breaks the graph at them instead of tracing torch.distributed's Python and the caller
# lookup above.
_not_traced = torch.compiler.disable


def _check_op(what: str, op: str) -> None:
    if op not in _OPS:
        raise ValueError(f"{what}: op {op!r} is not one of {sorted(_OPS)}")


@_not_traced
def all_reduce(t: Tensor, op: str = "sum", group=None) -> Tensor:
    """`op` ("sum", "max", "min") of a detached tensor over `group` (None: WORLD): a new tensor on
    `t`'s device (the input is untouched); reduced on the group's device. Without a process group:
    a copy of `t`."""
    _check_op("all_reduce", op)
    out = t.detach().clone()
    if not is_initialized():
        return out
    work = out.to(collective_device(group, prefer=t.device))
    check_served("all_reduce", [work], group)
    dist.all_reduce(work, op=_OPS[op], group=group)
    return work.to(t.device)


@_not_traced
def all_reduce_(t: Tensor, op: str = "sum", group=None) -> Tensor:
    """In place (gradients): `t` must be on a device `group` serves."""
    _check_op("all_reduce_", op)
    if is_initialized():
        check_served("all_reduce_", [t], group)
        dist.all_reduce(t, op=_OPS[op], group=group)
    return t


@_not_traced
def all_to_all_single(out: Tensor, inp: Tensor, out_splits: list[int] | None = None,
                      in_splits: list[int] | None = None, group=None) -> Tensor:
    """torch.distributed.all_to_all_single into `out`, both on a device `group` serves."""
    check_served("all_to_all_single", [out, inp], group)
    dist.all_to_all_single(out, inp, output_split_sizes=out_splits, input_split_sizes=in_splits, group=group)
    return out


def all_gather_row(row: Tensor, rank: int, world: int, group=None) -> Tensor:
    """[world, n] float64 on `row`'s device: every rank's `row` (n equal on all ranks), by one
    all-reduce of a table in which each rank fills its own line."""
    row = row.detach().to(torch.float64).flatten()
    table = row.new_zeros(world, row.numel())
    table[rank] = row
    return all_reduce(table, "sum", group) if world > 1 else table


def broadcast_object(obj, src: int = 0, group=None):
    """`obj` from rank `src` on every rank."""
    if not is_initialized():
        return obj
    box = [obj]
    # torch places the pickled bytes itself (`_get_object_coll_device`: the current GPU for NCCL).
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def barrier(group=None) -> None:
    if is_initialized():
        dist.barrier(group=group)
