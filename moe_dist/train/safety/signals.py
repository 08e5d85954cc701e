"""Preemption: SIGTERM, SIGINT or SIGUSR1 to any rank, or the death of the launcher, asks the run
to stop after the current step; the ranks agree on it in the step's all-reduced report
(`step_report.py`), save a checkpoint and exit with `exits.PREEMPTED`.

The launcher chain is `deepspeed` (runner.py) -> `python -m deepspeed.launcher.launch` -> ranks.
DeepSpeed 0.19.8's runner installs no signal handler on one node: a SIGTERM kills it at once and
leaves launch.py and the ranks running (re-parented to init). launch.py does handle SIGTERM and
SIGINT: it sends SIGTERM to every rank, waits up to 30 s for each, then SIGKILLs. So each rank
    - asks the kernel for SIGTERM when its parent (launch.py) dies (PR_SET_PDEATHSIG, Linux), and
    - watches the runner (its grandparent, when that is DeepSpeed's runner) from a thread, and
      treats its death like a SIGTERM;
either way the rank finishes its step, saves and exits, so no rank outlives its launcher by more
than a step and a save (during start-up, before there is anything to save, it simply ends).
`launch/pretrain.py` sets this up first thing. A second signal while stopping changes nothing
(SIGKILL aborts).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

from moe_dist.train.safety.job import register_rank

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
PR_SET_PDEATHSIG = 1


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _stat(pid: int) -> list[str]:
    """/proc/<pid>/stat after the command name: [state, ppid, ...]; [] if there is no such pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return []


def _parent_of(pid: int) -> int | None:
    fields = _stat(pid)
    return int(fields[1]) if fields else None


def _identity(pid: int) -> str | None:
    """The start time (field 22, which tells a process from a later one reusing its pid) of a
    running process; None once it is gone or a zombie (dead, not yet reaped by its parent)."""
    fields = _stat(pid)
    return fields[19] if fields and fields[0] not in ("Z", "X") else None


def launcher_chain() -> list[int]:
    """Pids this rank must not outlive: the parent if it is DeepSpeed's launch.py, and its parent
    if that is DeepSpeed's runner. Empty when not started by the deepspeed launcher."""
    parent = os.getppid()
    if "deepspeed.launcher.launch" not in _cmdline(parent):
        return []
    chain = [parent]
    runner = _parent_of(parent)
    if runner and runner > 1 and "deepspeed" in _cmdline(runner):
        chain.append(runner)
    return chain


_guarded = False


def guard_launcher(poll_s: float = 1.0) -> None:
    """Tie this rank's life to its launcher, first thing in the process: a SIGTERM when launch.py
    dies (PR_SET_PDEATHSIG) or when the runner dies (a watcher thread sends it). Until the trainer
    installs its handlers, SIGTERM's default action ends the rank at once (nothing to save yet);
    afterwards it is a stop request. Idempotent."""
    global _guarded
    if _guarded:
        return
    _guarded = True
    chain = launcher_chain()
    if not chain:
        return
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    links = [(pid, _identity(pid), child) for pid, child in zip(chain, [os.getpid(), *chain])]
    threading.Thread(target=_watch, args=(links, poll_s), name="moe_dist-launcher-watch", daemon=True).start()


def _watch(links: list[tuple[int, str | None, int]], poll_s: float) -> None:
    # A launcher is gone when it is not running (dead, or a zombie its parent has not reaped) or
    # when its child was re-parented away from it; this also covers a launch.py that died before
    # PR_SET_PDEATHSIG was set.
    while True:
        time.sleep(poll_s)
        for pid, identity, child in links:
            if _identity(pid) != identity or _parent_of(child) != pid:
                print(f"rank {os.environ.get('RANK', '0')}: launcher process {pid} is gone: treated as "
                      f"SIGTERM", file=sys.stderr, flush=True)
                os.kill(os.getpid(), signal.SIGTERM)
                return


class StopRequest:
    """This rank's wish to stop, set by a signal handler, read by the main thread once per step."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.reason is not None

    def request(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
            print(f"rank {os.environ.get('RANK', '0')}: {reason}: stopping after the current step "
                  f"with a checkpoint", file=sys.stderr, flush=True)

    def _handler(self, signum, frame) -> None:
        self.request(f"received {signal.Signals(signum).name}")

    def install(self) -> StopRequest:
        if threading.current_thread() is not threading.main_thread():
            return self  # handlers can only be set from the main thread (e.g. under a test runner)
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handler)
        guard_launcher()
        register_rank()  # from now on a signal is a stop request: launch/job.py may pass one on
        return self

    def uninstall(self, stopping: bool = False) -> None:
        """Restore the handlers from before `install`; with `stopping` (the run stops on a signal)
        ignore the stop signals instead until the process exits: once the first rank exits 75,
        launch.py SIGTERMs the others, and the launcher watcher signals its own rank when the runner
        is gone; either would otherwise kill a rank between its commit and its exit status."""
        for sig, previous in self._previous.items():
            signal.signal(sig, signal.SIG_IGN if stopping else previous)
        self._previous.clear()
