"""Console progress: one line per logging interval with step, loss, throughput and ETA."""

from __future__ import annotations

import time


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
             sec_per_step: float) -> str:
        eta = format_duration((self.total_steps - step) * sec_per_step)
        grad = "n/a" if grad_norm is None else f"{grad_norm:.3f}"
        return (f"step {step}/{self.total_steps} | loss {loss:.4f} | lr {lr:.3e} | grad norm {grad} "
                f"| {tokens_per_s:,.0f} tokens/s | {sec_per_step:.2f} s/step | ETA {eta}")
