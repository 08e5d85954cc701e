"""What the trainer does at the end of every step to protect the run, in one place, so the loop
only calls hooks: one all-reduced report per step (this rank's stop wish, step time and
non-finite flags), the skip accounting, the LR schedule kept on the step count, the watchdog's
heartbeat, and per-rank step times for the log line and TensorBoard.

The report is a single small all-reduce over WORLD (`runtime.all_gather_row`): every rank learns
every rank's facts, so all of them take the same decision (skip, stop, save) in the same step,
which is what keeps their collectives in step with each other.
"""

from __future__ import annotations

import time

import torch

from moe_dist.parallel import runtime
from moe_dist.train.config import TrainSection
from moe_dist.train.progress import StepTimes
from moe_dist.train.safety.nonfinite import NonFiniteWatch, refuse_nonfinite_save
from moe_dist.train.safety.signals import StopRequest
from moe_dist.train.safety.watchdog import Watchdog


class RunSafety:
    def __init__(self, train: TrainSection, moe_layer_ids: list[int], skipped_before: int = 0) -> None:
        self.collective_timeout = train.collective_timeout
        self.nonfinite = NonFiniteWatch(moe_layer_ids, train.max_consecutive_skips)
        self.nonfinite.skipped = skipped_before
        self.stop = StopRequest()
        self.watchdog = Watchdog(train.watchdog_timeout)
        self.times = StepTimes(runtime.world_size())
        self.stop_reason: str | None = None
        self._t = time.perf_counter()

    def start(self, step: int) -> RunSafety:
        groups = runtime.enforce_group_timeouts(self.collective_timeout)
        if runtime.rank() == 0 and groups:
            watchdog = f"{self.watchdog.timeout_s:g}s" if self.watchdog.timeout_s else "off"
            print(f"collective timeout {self.collective_timeout:g}s on all {groups} process groups of "
                  f"rank 0; watchdog {watchdog}", flush=True)
        self.stop.install()
        self.watchdog.start(step)
        self._t = time.perf_counter()
        return self

    def close(self) -> None:
        self.watchdog.stop()
        self.stop.uninstall()

    @property
    def skipped(self) -> int:
        return self.nonfinite.skipped

    def observe(self, out) -> None:
        """Every micro batch's ModelOutput."""
        self.nonfinite.observe(out)

    def end_step(self, step: int, engine, scheduler) -> bool:
        """After optimizer step `step`: agree with every rank; returns True when any rank asked to
        stop (all ranks return the same). Raises RunStopped for the non-finite policy."""
        norm = engine.get_global_grad_norm()
        applied = bool(engine.was_step_applied())
        mask = self.nonfinite.take_mask(None if norm is None else float(norm), applied)
        seconds = time.perf_counter() - self._t
        table = runtime.all_gather_row(torch.tensor([float(self.stop.requested), seconds, float(mask)]))
        self._t = time.perf_counter()
        self.times.add(table[:, 1].tolist())
        if not applied:
            # DeepSpeed leaves the LR scheduler behind on a skipped step; the schedule follows the
            # step count, as it does on resume.
            scheduler.step()
        warning = self.nonfinite.after_step(step, [int(m) for m in table[:, 2].tolist()], applied)
        if warning and runtime.rank() == 0:
            print(f"warning: {warning}", flush=True)
        self.watchdog.progress(step)
        stopping = [r for r, flag in enumerate(table[:, 0].tolist()) if flag]
        if stopping:
            self.stop_reason = (f"rank(s) {stopping} asked to stop"
                                + (f" (here: {self.stop.reason})" if self.stop.requested else ""))
        return bool(stopping)

    def progress(self, step: int, what: str) -> None:
        """After an evaluation or a save: long, but not a hang."""
        self.watchdog.progress(step, what)
        self._t = time.perf_counter()

    def before_save(self, module, step: int) -> None:
        refuse_nonfinite_save(module, step)
