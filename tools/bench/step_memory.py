"""Peak memory of one training step on CPU, measured in a fresh child process.

CPU torch has no max_memory_allocated. Two measures, both over what was resident before the step:
- tensors: the profiler's allocation events summed in time order
  (moe_dist/common/tensor_memory.py), exact and repeatable; the number a GPU's caching allocator
  would report;
- RSS: the kernel's resident-set high-water mark (VmHWM) over a few steps, i.e. what the process
  really took from the OS, allocator fragmentation and caching included (with glibc keeping
  freed memory the heap grows for a step or two before it settles).
A fresh process per measurement keeps one case's freed-but-cached memory from hiding another
case's allocations. Children come from a forkserver that has imported the heavy modules but never
run an op (forking after OpenMP has started is unsafe).
"""

from __future__ import annotations

import ctypes
import gc
import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Callable

from moe_dist.common.tensor_memory import peak_tensor_mb

StepBuilder = Callable[..., Callable[[], None]]


def start_server(preload: list[str]) -> None:
    """Start the forkserver the children fork from, before this process runs any op; `preload`
    is imported there once, so each child starts in well under a second."""
    from multiprocessing import forkserver

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(preload)
    forkserver.ensure_running()


def measure_peak_mb(build_step: StepBuilder, args: tuple, steps: int = 3) -> tuple[float, float | None]:
    """(peak tensor MiB, peak RSS MiB or None where the kernel cannot reset its high-water mark)
    of `build_step(*args)()`, in a fresh child process.
    `build_step` must be a module-level function (it is pickled by reference)."""
    # An executor, not a Pool: a child that dies (killed for memory, a crash in a kernel) raises
    # BrokenProcessPool here, where Pool.apply would wait for its result for ever.
    with ProcessPoolExecutor(1, mp_context=mp.get_context("forkserver")) as pool:  # one fresh worker
        try:
            return pool.submit(_child, build_step, args, steps).result()
        except BrokenProcessPool:
            raise RuntimeError(f"the memory-measuring child process died running {build_step.__name__}{args} "
                               f"(killed for memory, or a crash)") from None


def _child(build_step: StepBuilder, args: tuple, steps: int) -> tuple[float, float | None]:
    step = build_step(*args)
    # One unmeasured step first: lazy one-time setup (thread pools, kernel workspaces) is not the
    # step's memory. Then hand everything freed back to the OS, so later steps cannot reuse it
    # unseen, and restart the high-water mark at the current RSS (Linux >= 4.0: "5" > clear_refs).
    step()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # a sandbox that hides it: the high-water mark would include set-up's peak
        return peak_tensor_mb(step), None
    base_kb = _status_kb("VmRSS")
    for _ in range(steps):
        step()
    rss_mb = (_status_kb("VmHWM") - base_kb) / 1024.0
    return peak_tensor_mb(step), rss_mb


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")
