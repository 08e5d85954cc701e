"""Timing of benchmark cases: interleaved rounds, the median per case."""

from __future__ import annotations

import statistics
import time
import traceback
from typing import Callable

import torch
from tqdm import tqdm


def time_cases(steps: dict[str, Callable[[], None]], warmup: int, repeats: int,
               progress: tqdm | None = None,
               failed: dict[str, str] | None = None) -> tuple[dict[str, float], dict[str, float]]:
    """Median wall and process-CPU milliseconds per step of each case; rounds interleave the cases.

    CPU time is a diagnostic for a shared machine: with one thread it excludes the time another
    process held the core; with several it also counts OpenMP threads spinning at barriers.

    `failed`: where given, a case whose step raises is recorded there (name -> "Type: first line
    of the message") and left out of the later rounds and of the result, and the other cases go
    on; where None, the exception propagates.
    """
    wall: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(warmup + repeats):
        for name, step in steps.items():
            if failed is not None and name in failed:
                continue
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                step()
                if torch.cuda.is_available() and torch.cuda.is_initialized():
                    torch.cuda.synchronize()  # kernels are asynchronous: time them, not their launch
            except Exception as e:
                if failed is None:
                    raise
                failed[name] = first_line(e)
                continue
            if r >= warmup:
                wall[name].append((time.perf_counter() - t0) * 1e3)
                cpu[name].append((time.process_time() - c0) * 1e3)
        if progress is not None:
            progress.update(1)
    med = statistics.median
    ran = [n for n in steps if failed is None or n not in failed]
    return {n: med(wall[n]) for n in ran}, {n: med(cpu[n]) for n in ran}


def first_line(e: BaseException) -> str:
    """"Type: first line of the message", how a failed case's row says why; a bare exception (an
    `assert` with no message, common in the references) names the line that raised it instead."""
    lines = str(e).strip().splitlines()
    if lines:
        return f"{type(e).__name__}: {lines[0]}"
    frames = traceback.extract_tb(e.__traceback__)
    if not frames:
        return type(e).__name__
    last = frames[-1]
    return f"{type(e).__name__} at {last.filename}:{last.lineno}: {last.line or ''}".rstrip(": ")


def cuda_peak_mb(step: Callable[[], None]) -> float:
    """Peak bytes allocated during one step over what was allocated before it (CUDA)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20
