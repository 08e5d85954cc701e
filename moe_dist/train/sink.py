"""One destination of the trainer's metrics (TensorBoard, W&B, MLflow): scalars, an expert-load
histogram, a figure. The trainer talks to all of them at once through `metrics_log.MetricsLogger`;
a sink only writes host values it is handed (never a tensor: no host read).

A failing sink (a full disk, a service that is down, a library that raises) must not end a
training run: its first failure prints one warning naming it and turns it off for the rest of the
run; the other sinks go on.
"""

from __future__ import annotations

import contextlib
import functools
import sys


def tolerant(method):
    """A sink method that never raises: the first exception disables the sink (one warning)."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if self.writer is None:
            return None
        try:
            return method(self, *args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any failure of a logging side channel
            self.disable(f"{method.__name__}: {type(e).__name__}: {e}")
            return None
    return wrapper


class Sink:
    """`writer` is the open destination (None: off). Subclasses implement `write_scalars`,
    `write_histogram`, `write_figure`, `write_flush` and `write_close`; the public methods
    wrap them in `tolerant`."""

    name = "metrics sink"

    def __init__(self, where: str | None) -> None:
        self.writer = None
        self.where = where

    def open_tolerantly(self, opener) -> None:
        """`self.writer = opener()`, or one warning and the sink off when it raises."""
        try:
            self.writer = opener()
        except Exception as e:  # noqa: BLE001 - as for every later write
            self.disable(f"opening: {type(e).__name__}: {e}")

    def disable(self, reason: str) -> None:
        writer, self.writer = self.writer, None
        print(f"warning: {self.name} writing to {self.where!r} failed ({reason}); {self.name} output is off "
              f"for the rest of this run, training goes on", file=sys.stderr, flush=True)
        if writer is not None:
            with contextlib.suppress(Exception):  # the writer is already broken
                self.write_close(writer)

    @property
    def active(self) -> bool:
        return self.writer is not None

    @tolerant
    def scalars(self, step: int, values: dict[str, float | None]) -> None:
        values = {tag: float(v) for tag, v in values.items() if v is not None}
        if values:
            self.write_scalars(step, values)

    @tolerant
    def histogram(self, tag: str, load_E: list[float], step: int) -> None:
        """The exact per-expert load: bucket e holds expert e's routed tokens."""
        self.write_histogram(tag, [float(v) for v in load_E], step)

    @tolerant
    def figure(self, tag: str, fig, step: int) -> None:
        self.write_figure(tag, fig, step)

    @tolerant
    def flush(self) -> None:
        self.write_flush()

    @tolerant
    def close(self) -> None:
        writer, self.writer = self.writer, None
        self.write_close(writer)

    # ---- what a sink implements ----------------------------------------------------------

    def write_scalars(self, step: int, values: dict[str, float]) -> None:
        raise NotImplementedError

    def write_histogram(self, tag: str, load: list[float], step: int) -> None:
        raise NotImplementedError

    def write_figure(self, tag: str, fig, step: int) -> None:
        raise NotImplementedError

    def write_flush(self) -> None:
        """Nothing to do unless the sink buffers."""

    def write_close(self, writer) -> None:
        """`writer`: the one to close (already detached from the sink)."""
