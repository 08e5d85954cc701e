"""What the trainer does at the end of every step to protect the run, in one place, so the loop
only calls hooks: one all-reduced report per step (this rank's stop wish, step time and
non-finite flags), the skip accounting, the LR schedule kept on the step count, the watchdog's
heartbeat, and per-rank step times for the log line and TensorBoard.

The report is a single small all-reduce over WORLD (`runtime.all_gather_row`): every rank learns
every rank's facts, so all of them take the same decision (skip, stop, save) in the same step,
which is what keeps their collectives in step with each other. The row is built on the device
(the non-finite flags never leave it before; the stop wish and the step time enter by fills, not
copies) with the step's gradient norm in it, and read once: the step's one host read.
"""

from __future__ import annotations

import math
import time

import torch

from moe_dist.parallel import runtime
from moe_dist.train.config import TrainSection
from moe_dist.train.progress import StepTimes
from moe_dist.train.safety.nonfinite import NonFiniteWatch, refuse_nonfinite_save
from moe_dist.train.safety.signals import StopRequest
from moe_dist.train.safety.watchdog import Watchdog


class RunSafety:
    def __init__(self, train: TrainSection, moe_layer_ids: list[int], skipped_before: int = 0,
                 device: torch.device | None = None) -> None:
        self.device = device
        self.collective_timeout = train.collective_timeout
        self.nonfinite = NonFiniteWatch(moe_layer_ids, train.max_consecutive_skips)
        self.nonfinite.skipped = skipped_before
        self.stop = StopRequest()
        self.watchdog = Watchdog(train.watchdog_timeout)
        self.times = StepTimes(runtime.world_size())
        self.stop_reason: str | None = None
        self.grad_norm: float | None = None  # the last step's, from its row (None: not computed or not finite)
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
        self.stop.uninstall(stopping=self.stop_reason is not None)

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
        flags = self.nonfinite.take_flags(norm, applied, self.device)
        device = flags.device
        norm_t = torch.full((1,), float("nan"), dtype=torch.float64, device=device) if norm is None else \
            (norm.detach().to(device, torch.float64).reshape(1) if isinstance(norm, torch.Tensor)
             else torch.full((1,), float(norm), dtype=torch.float64, device=device))
        seconds = time.perf_counter() - self._t
        row = torch.cat([torch.full((1,), float(self.stop.requested), dtype=torch.float64, device=device),
                         torch.full((1,), seconds, dtype=torch.float64, device=device), norm_t, flags])
        table = runtime.all_gather_row(row).tolist()  # the step's one host read
        self._t = time.perf_counter()
        norm_value = table[0][2]
        self.grad_norm = norm_value if math.isfinite(norm_value) else None
        self.times.add([r[1] for r in table])
        if not applied:
            # DeepSpeed leaves the LR scheduler behind on a skipped step; the schedule follows the
            # step count, as it does on resume.
            scheduler.step()
        warning = self.nonfinite.after_step(step, [self.nonfinite.mask(r[3:]) for r in table], applied)
        if warning and runtime.rank() == 0:
            print(f"warning: {warning}", flush=True)
        self.watchdog.progress(step)
        stopping = [r for r, row in enumerate(table) if row[0]]
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
