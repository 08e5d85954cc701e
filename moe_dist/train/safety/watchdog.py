"""The hang watchdog: when no step completes within `train.watchdog_timeout` seconds, every rank
that can still run prints all its threads' Python stacks (faulthandler) and a message naming the
last completed step and the slowest rank, and the process exits with `exits.HUNG`.

Who is slowest: a rank stopped by SIGSTOP, a dead host or a wedged driver cannot say where it is,
so the live ranks must name it. Each rank publishes a heartbeat `<last completed step>:<beat
count>` into the process group's key-value store (the launcher's TCPStore; no shared filesystem
needed, whatever node the rank is on) from a thread of its own, once a poll interval, whatever
its main thread is doing. When the watchdogs fire, one of them (the first to increment a claim
key) reads every rank's heartbeat twice, a poll interval apart, on its own clock (no cross-host
clock comparison): a rank whose beat count did not move is not running; otherwise the rank with
the lowest step is the slowest. It publishes that verdict under one key, which every other
firing rank waits for and prints. So a hang costs O(W) store reads in all, not the W x W of every
rank reading every key, which at a few hundred ranks no longer fits the reads' bound. If the store
does not answer at all, the rank hosting it (rank 0) is the one not running. Store calls run in a
helper thread with a bounded wait, so a dead store cannot stop the watchdog from exiting.
"""

from __future__ import annotations

import datetime
import faulthandler
import os
import sys
import threading
import time

from moe_dist.parallel import runtime
from moe_dist.train.safety.exits import HUNG

KEY = "moe_dist/heartbeat/{rank}"
CLAIM_KEY = "moe_dist/hang_report/claim"  # the first rank to increment it writes the report
REPORT_KEY = "moe_dist/hang_report"
READ_BOUND_S = 5.0  # one reading of every heartbeat, or one store call, gives up after this long
STORE_DEAD = "rank 0 (it hosts the key-value store, which does not answer: stopped or dead)"


def _bounded(fn, seconds: float):
    """fn() in a daemon thread; its value, or None if it did not return (or raised) within `seconds`."""
    box: list = []

    def run():
        try:
            box.append(fn())
        except Exception:  # noqa: BLE001 - a store that errors is a store that did not answer
            pass
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    return box[0] if box else None


def _get_many(store, keys: list[str]) -> list[bytes]:
    if hasattr(store, "multi_get"):  # one round trip to the TCPStore for all of them
        return list(store.multi_get(keys))
    return [store.get(k) for k in keys]


def read_heartbeats(store, world: int) -> dict[int, tuple[int, int]] | None:
    """{rank: (last completed step, beat count)} from the store; ranks with no heartbeat yet are
    left out. None if the store does not answer. O(world) keys read."""
    def read():
        keys = [KEY.format(rank=r) for r in range(world)]
        # One check for all keys in the common case; a rank that never published costs a check per key.
        present = list(range(world)) if store.check(keys) else [r for r in range(world) if store.check([keys[r]])]
        out = {}
        for r, value in zip(present, _get_many(store, [keys[r] for r in present])):
            step, beats = value.decode().split(":")
            out[r] = (int(step), int(beats))
        return out
    return _bounded(read, READ_BOUND_S)


def hang_report(store, world: int, poll_s: float) -> str:
    """Which rank holds the job up, as one rank found it: the first caller reads the heartbeats
    and publishes its verdict, every later caller waits for that verdict (bounded)."""
    claim = _bounded(lambda: store.add(CLAIM_KEY, 1), READ_BOUND_S)
    if claim is None:
        return STORE_DEAD
    if claim == 1:
        before = read_heartbeats(store, world)
        time.sleep(3 * poll_s)
        after = read_heartbeats(store, world)
        culprit = slowest_rank(before, after, world)
        _bounded(lambda: store.set(REPORT_KEY, culprit), READ_BOUND_S)
        return culprit
    # The reporter needs two readings and three poll intervals; give it that and a reading more.
    wait_s = 3 * READ_BOUND_S + 3 * poll_s

    def wait_and_get():
        store.wait([REPORT_KEY], datetime.timedelta(seconds=wait_s))
        return store.get(REPORT_KEY).decode()
    report = _bounded(wait_and_get, wait_s + READ_BOUND_S)
    if report is None:
        return (f"unknown (the rank reading the heartbeats did not publish its report within {wait_s:g}s: "
                f"stopped, dead or its store calls hang)")
    return report


def slowest_rank(before: dict[int, tuple[int, int]] | None, after: dict[int, tuple[int, int]] | None,
                 world: int) -> str:
    """Which rank holds the job up, from two heartbeat readings a poll interval apart."""
    if before is None or after is None:
        return STORE_DEAD
    silent = [r for r in range(world) if r not in after or before.get(r) == after.get(r)]
    if silent:
        return "rank(s) " + ", ".join(map(str, silent)) + " (heartbeat silent: stopped, dead or wedged)"
    low = min(step for step, _ in after.values())
    behind = [r for r, (step, _) in sorted(after.items()) if step == low]
    if len(behind) == len(after):
        return (f"none behind: every rank is alive and has completed step {low} (a deadlock, or one "
                f"step slower than the watchdog)")
    return "rank(s) " + ", ".join(map(str, behind)) + f" (still at step {low}, the others are ahead)"


class Watchdog:
    def __init__(self, timeout_s: float, poll_s: float | None = None) -> None:
        self.timeout_s = timeout_s
        self.poll_s = poll_s or min(1.0, max(timeout_s / 10, 0.05))
        self.rank, self.world = runtime.rank(), runtime.world_size()
        self.store = runtime.default_store()
        self.step = 0
        self.beats = 0
        self.last_progress = time.monotonic()
        self.what = "start-up"
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self, step: int) -> Watchdog:
        self.progress(step, "start")
        if self.timeout_s > 0:
            self._spawn(self._watch, "moe_dist-watchdog")
            if self.store is not None:
                self._spawn(self._publish, "moe_dist-heartbeat")
        return self

    def _spawn(self, target, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def progress(self, step: int, what: str = "step") -> None:
        """Called by the main thread after each completed step, evaluation and save."""
        self.step, self.what = step, what
        self.last_progress = time.monotonic()

    def stop(self) -> None:
        self._stop.set()

    def _publish(self) -> None:
        # Under its own key per rank; a set that blocks (stopped store) only stops this thread.
        while not self._stop.wait(self.poll_s):
            self.beats += 1
            try:
                self.store.set(KEY.format(rank=self.rank), f"{self.step}:{self.beats}")
            except (RuntimeError, OSError):  # the store went away (job ending): nothing left to publish to
                return

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            idle = time.monotonic() - self.last_progress
            if idle > self.timeout_s:
                self.fire(idle)

    def fire(self, idle: float) -> None:
        world = self.world
        if self.store is not None:
            culprit = hang_report(self.store, world, self.poll_s)
        else:
            culprit = "unknown (no process group store)"
        last = {"step": f"step {self.step}", "start": f"none since the start at step {self.step}"}.get(
            self.what, f"step {self.step} and its {self.what}")
        print(f"watchdog: rank {self.rank}: no step completed for {idle:.0f}s (train.watchdog_timeout "
              f"{self.timeout_s:g}s); last completed: {last}; slowest: {culprit}. Python stacks of "
              f"rank {self.rank} follow.", file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        os._exit(HUNG)
