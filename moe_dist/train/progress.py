"""Console progress: one line per logging interval with step, loss, throughput, ETA, the per-rank
step time range (stragglers show here before they hang) and the count of skipped steps."""

from __future__ import annotations

import time
from dataclasses import dataclass


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Progress:
    """Rate over the last interval (so a slow first step of compilation or warm-up does not
    distort it for long) and ETA from that rate."""

    def __init__(self, total_steps: int, tokens_per_step: int, start_step: int = 0) -> None:
        self.total_steps = total_steps
        self.tokens_per_step = tokens_per_step
        self.last_step = start_step
        self.last_time = time.perf_counter()

    def interval(self, step: int) -> tuple[float, float]:
        """(tokens per second, seconds per step) since the previous call."""
        now = time.perf_counter()
        steps = max(step - self.last_step, 1)
        elapsed = max(now - self.last_time, 1e-9)
        self.last_step, self.last_time = step, now
        return steps * self.tokens_per_step / elapsed, elapsed / steps

    def line(self, step: int, loss: float, lr: float, grad_norm: float | None, tokens_per_s: float,
             sec_per_step: float, rank_times: RankTimes | None = None, skipped: int = 0) -> str:
        eta = format_duration((self.total_steps - step) * sec_per_step)
        grad = "n/a" if grad_norm is None else f"{grad_norm:.3f}"
        out = (f"step {step}/{self.total_steps} | loss {loss:.4f} | lr {lr:.3e} | grad norm {grad} "
               f"| {tokens_per_s:,.0f} tokens/s | {sec_per_step:.2f} s/step | ETA {eta}")
        if rank_times is not None:
            out += (f" | rank step {rank_times.min:.2f}-{rank_times.max:.2f} s "
                    f"(slowest rank {rank_times.max_rank})")
        if skipped:
            out += f" | skipped {skipped}"
        return out


@dataclass
class RankTimes:
    """Mean step time per rank over an interval, reduced to what the log shows."""

    min: float
    max: float
    max_rank: int


class StepTimes:
    """Each rank's own step time (from the end of its previous step report to its arrival at this
    one), summed over a logging interval. Ranks wait for each other inside collectives, so the
    spread shows work a rank does outside them (its data loading, host-side stalls) and the
    slowest rank is the one the others wait for at the report."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.reset()

    def reset(self) -> None:
        self.total = [0.0] * self.world
        self.steps = 0

    def add(self, seconds: list[float]) -> None:
        self.total = [t + s for t, s in zip(self.total, seconds)]
        self.steps += 1

    def take(self) -> RankTimes | None:
        if not self.steps:
            return None
        means = [t / self.steps for t in self.total]
        slowest = max(range(self.world), key=means.__getitem__)
        self.reset()
        return RankTimes(min=min(means), max=means[slowest], max_rank=slowest)
