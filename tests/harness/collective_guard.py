"""Holds a process's collectives to the rule NCCL enforces and gloo does not: a collective runs on a
device its group's backend serves, and moe_dist issues every collective through its one seam,
`moe_dist/parallel/collectives.py`, which places tensors on that device.

Why this shape, on machines without a GPU: on CPU every tensor is a CPU tensor and gloo serves the
CPU, so no collective of a CPU run can be on the wrong device by itself; a test that only checked
devices would pass on the code that dies under NCCL. The failure that code has is real and
structural: its reductions hand the tensor to torch.distributed wherever it lies, from a module
that never asks the group what it serves. So the guard, installed by the test (it is not part of
moe_dist, so it holds any version of the library to the rule):

- wraps torch.distributed's collectives (DeepSpeed and moe_dist look them up on the module at
  each call) and records each one whose immediate caller is a moe_dist module other than the seam
  (`bypasses`): such a call reduces where the tensor lies;
- checks every collective the seam makes against the device types its group registered
  (`ProcessGroup._device_types`, what NCCL's "No backend type associated with device type cpu"
  comes from) and records misplaced tensors (`misplaced`); unit tests prove the same check refuses a
  CPU tensor for a group registered for CUDA only;
- records, for every seam call, the moe_dist site outside parallel/ that asked for it (`sites`), so
  a test can show which code paths it covered.

Calls are recorded, not refused, so one run lists every offender; the test asserts the lists.
DeepSpeed's own collectives (immediate caller outside moe_dist) are its business and unchecked.
"""

from __future__ import annotations

import functools
import json
import os
import sys

import torch
import torch.distributed as dist

SEAM = "moe_dist/parallel/collectives.py"
NAMES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
         "broadcast", "reduce", "gather", "scatter", "all_to_all", "all_to_all_single", "barrier",
         "monitored_barrier", "broadcast_object_list", "all_gather_object", "gather_object", "scatter_object_list",
         "send", "recv", "isend", "irecv", "batch_isend_irecv")


def _rel(filename: str) -> str | None:
    name = filename.replace("\\", "/")
    return "moe_dist/" + name.split("/moe_dist/", 1)[1] if "/moe_dist/" in name else None


def _site(frame) -> str:
    """The first moe_dist frame outside parallel/ (the code that wanted the collective)."""
    while frame is not None:
        rel = _rel(frame.f_code.co_filename)
        if rel is not None and not rel.startswith("moe_dist/parallel/"):
            return f"{rel}:{frame.f_lineno} ({frame.f_code.co_qualname})"
        frame = frame.f_back
    return "outside moe_dist"


def _tensors(args, kwargs) -> list[torch.Tensor]:
    out = []
    for value in [*args, *kwargs.values()]:
        if isinstance(value, torch.Tensor):
            out.append(value)
        elif isinstance(value, (list, tuple)):
            out += [v for v in value if isinstance(v, torch.Tensor)]
    return out


def _group(args, kwargs, name: str):
    if "group" in kwargs:
        return kwargs["group"]
    # positional group: all_reduce(tensor, op, group), broadcast(tensor, src, group), barrier(group)
    position = {"all_reduce": 2, "broadcast": 2, "barrier": 0, "all_to_all_single": 4}.get(name)
    if position is not None and len(args) > position and not isinstance(args[position], (int, torch.Tensor)):
        return args[position]
    return None


class CollectiveGuard:
    def __init__(self) -> None:
        self.bypasses: list[str] = []
        self.misplaced: list[str] = []
        self.sites: list[str] = []
        self._originals: dict[str, object] = {}

    def install(self) -> CollectiveGuard:
        for name in NAMES:
            original = getattr(dist, name, None)
            if original is None:
                continue
            self._originals[name] = original
            setattr(dist, name, self._wrap(name, original))
        return self

    def uninstall(self) -> None:
        for name, original in self._originals.items():
            setattr(dist, name, original)
        self._originals.clear()

    def _wrap(self, name: str, original):
        @functools.wraps(original)
        def guarded(*args, **kwargs):
            caller = sys._getframe(1)
            rel = _rel(caller.f_code.co_filename)
            if rel is not None:
                where = f"{name} at {rel}:{caller.f_lineno} ({caller.f_code.co_qualname}) for {_site(caller)}"
                if rel != SEAM:
                    self.bypasses.append(where)
                else:
                    self.sites.append(f"{name} for {_site(caller)}")
                    group = _group(args, kwargs, name)
                    served = served_types(group)
                    for t in _tensors(args, kwargs):
                        if t.device.type not in served:
                            self.misplaced.append(f"{where}: tensor on {t.device}, group serves {served}")
            return original(*args, **kwargs)
        return guarded

    def dump(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump({"bypasses": self.bypasses, "misplaced": self.misplaced, "sites": self.sites}, f)


def served_types(group) -> list[str]:
    """Device types a group's backend serves, read from torch's registry (not from moe_dist)."""
    pg = group if group is not None else dist.group.WORLD
    return [torch.device(t).type for t in pg._device_types]


def report(path_pattern: str, world: int) -> dict[str, list[str]]:
    """The dumps of ranks 0..world-1 (`path_pattern` with {rank}) merged."""
    merged: dict[str, list[str]] = {"bypasses": [], "misplaced": [], "sites": []}
    for rank in range(world):
        path = path_pattern.format(rank=rank)
        if os.path.exists(path):
            with open(path) as f:
                for key, values in json.load(f).items():
                    merged[key] += [f"rank {rank}: {v}" for v in values]
    return merged
