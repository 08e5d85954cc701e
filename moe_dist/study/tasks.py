"""Run the study's independent runs (one arm, one seed each) in worker processes, with progress
lines and an ETA.

A task is a module-level function and its keyword arguments; it returns a JSON-ready dict and
depends on nothing else (its seed is an argument), so the results are the same for any number of
workers and any completion order. Each worker uses one intra-op thread: on a small shared
machine several single-threaded runs side by side beat one run fighting for every core.
"""

from __future__ import annotations

import concurrent.futures as futures
import multiprocessing
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from moe_dist.train.progress import format_duration


@dataclass(frozen=True)
class Task:
    part: str  # experiment name, e.g. "common_mode"
    name: str  # arm and seed, for progress lines
    fn: Callable[..., dict[str, Any]]  # module-level (picklable) pure function
    kwargs: dict[str, Any] = field(default_factory=dict)
    cost: float = 1.0  # relative run time: orders the queue (longest first) and weights the ETA


def _single_thread() -> None:
    torch.set_num_threads(1)


class _Progress:
    """One line per finished task at most every `every_s` seconds (and always for the last), with
    the ETA from the cost done so far."""

    def __init__(self, tasks: list[Task], log: Callable[[str], None], every_s: float) -> None:
        self.total_cost = sum(t.cost for t in tasks) or 1.0
        self.count, self.done, self.done_cost = len(tasks), 0, 0.0
        self.log, self.every_s = log, every_s
        self.start = self.last_line = time.perf_counter()

    def finished(self, task: Task, seconds: float) -> None:
        self.done += 1
        self.done_cost += task.cost
        now = time.perf_counter()
        if now - self.last_line < self.every_s and self.done < self.count:
            return
        self.last_line = now
        elapsed = now - self.start
        eta = elapsed * (self.total_cost - self.done_cost) / max(self.done_cost, 1e-9)
        self.log(f"[{self.done}/{self.count}] {task.part} {task.name} ({seconds:.1f}s) | "
                 f"elapsed {format_duration(elapsed)} | ETA {format_duration(eta)}")


def _timed(task: Task) -> tuple[dict[str, Any], float, float]:
    """The result, wall seconds and CPU seconds of the process that ran it."""
    start, cpu_start = time.perf_counter(), time.process_time()
    result = task.fn(**task.kwargs)
    return result, time.perf_counter() - start, time.process_time() - cpu_start


def run_tasks(tasks: list[Task], workers: int, log: Callable[[str], None] = print,
              progress_every_s: float = 10.0, cpu_seconds: list[float] | None = None) -> list[dict[str, Any]]:
    """Results in the order of `tasks`; `cpu_seconds`, when given, is filled with each task's CPU
    seconds in the same order (what sizes a budget: wall time on a shared machine does not).
    `workers` 1 runs in this process (no start-up cost), with one intra-op thread like a worker for
    the duration (the caller's setting is restored: idle intra-op threads spin, which on a busy
    machine slows the quick run down many times); more use spawned processes (a forked copy of a
    process that has run torch's thread pools can deadlock)."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    progress = _Progress(tasks, log, progress_every_s)
    results: list[dict[str, Any] | None] = [None] * len(tasks)
    cpu = [0.0] * len(tasks)
    order = sorted(range(len(tasks)), key=lambda i: -tasks[i].cost)  # long runs first: no straggler tail
    if workers == 1:
        threads = torch.get_num_threads()
        _single_thread()
        try:
            for i in order:
                results[i], seconds, cpu[i] = _timed(tasks[i])
                progress.finished(tasks[i], seconds)
        finally:
            torch.set_num_threads(threads)
    else:
        context = multiprocessing.get_context("spawn")
        with futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_single_thread) as pool:
            pending = {pool.submit(_timed, tasks[i]): i for i in order}
            for future in futures.as_completed(pending):
                i = pending[future]
                results[i], seconds, cpu[i] = future.result()
                progress.finished(tasks[i], seconds)
    if cpu_seconds is not None:
        cpu_seconds[:] = cpu
    return results  # type: ignore[return-value]
