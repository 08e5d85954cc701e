"""The job's exit status and who waits for whom: `launch/job.py` starts DeepSpeed's runner, waits for
every process of the job, and exits with a status a scheduler can trust (docs/launch.md).

DeepSpeed 0.19.8's single-node chain is `deepspeed` (runner.py) -> launch.py -> ranks, and the
runner's status misreports a stop: it passes on only a positive status of launch.py (a SIGKILL of
launch.py gives 0 while the ranks are still saving), dies of a SIGTERM at once (143) and of a
Ctrl-C with a traceback, in both cases before the ranks have saved. The wrapper instead
    - becomes the child subreaper (PR_SET_CHILD_SUBREAPER), so a rank or launch.py whose parent
      died is re-parented to it and it can wait until no process of the job is left;
    - hears from each rank directly: a rank started under it (`MOE_DIST_JOB_DIR` in its
      environment) writes its pid once its stop handlers are in place (`register_rank`) and its
      exit status at the end (`report_exit`) into that folder, whoever reaps it;
    - exits 75 when every rank exited 75 (each committed its stop checkpoint), whichever process
      got the signal (`job_status` has the whole rule);
    - starts the runner in a process group of its own, so a Ctrl-C (SIGINT to the terminal's
      foreground group) reaches only the wrapper, which passes it to the ranks: no runner traceback
      and no launch.py that SIGKILLs ranks still saving after its fixed 30 s. A signal to the
      wrapper is passed on the same way (SIGTERM, SIGINT, SIGUSR1); before any rank has registered
      there is nothing to save and the whole job gets a SIGTERM.
Across nodes (pdsh) the ranks do not see the folder; the wrapper then reports the runner's status,
with a death by signal as 128 + the signal's number instead of DeepSpeed's 0.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile

from moe_dist.train.safety.exits import PREEMPTED

JOB_DIR_ENV = "MOE_DIST_JOB_DIR"
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def register_rank() -> None:
    """In a rank, first thing: tell the wrapper (if any) which pid to signal."""
    folder = os.environ.get(JOB_DIR_ENV)
    if folder and os.path.isdir(folder):
        _write(os.path.join(folder, f"rank{_rank()}.pid"), str(os.getpid()))


def report_exit(code: int) -> int:
    """In a rank, last thing: record its exit status for the wrapper; returns `code`."""
    folder = os.environ.get(JOB_DIR_ENV)
    if folder and os.path.isdir(folder):
        _write(os.path.join(folder, f"rank{_rank()}.exit"), f"{code} {os.environ.get('WORLD_SIZE', '1')}")
        try:
            os.remove(os.path.join(folder, f"rank{_rank()}.pid"))  # no signal to a pid reused later
        except FileNotFoundError:
            pass
    return code


def _write(path: str, text: str) -> None:
    # Written aside and renamed: the wrapper never reads half a file.
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def read_reports(folder: str) -> tuple[dict[int, int], int | None]:
    """({rank: exit status}, world size) of the ranks that reported; world None if none did."""
    codes: dict[int, int] = {}
    world = None
    for name in os.listdir(folder):
        if name.startswith("rank") and name.endswith(".exit"):
            with open(os.path.join(folder, name)) as f:
                code, size = f.read().split()
            codes[int(name[4:-5])] = int(code)
            world = int(size)
    return codes, world


def as_status(returncode: int) -> int:
    """A Popen returncode as a shell reports it: killed by signal N -> 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def job_status(runner: int, codes: dict[int, int], world: int | None, signalled: int = 0) -> tuple[int, str]:
    """The job's exit status from the runner's returncode, the ranks' reports and the first signal
    the wrapper passed on (0: none), and why."""
    missing = sorted(set(range(world)) - set(codes)) if world else []
    failed = {r: c for r, c in sorted(codes.items()) if c not in (0, PREEMPTED)}
    if failed:
        rank, code = next(iter(failed.items()))
        return code, f"rank {rank} exited {code}"
    if codes and not missing:
        if all(c == PREEMPTED for c in codes.values()):
            return PREEMPTED, f"every rank ({len(codes)}) checkpointed and exited {PREEMPTED}"
        if all(c == 0 for c in codes.values()):
            return 0, "every rank finished"
        return 1, f"ranks disagree: {codes}"  # some finished, some stopped: not one state to resume
    if not codes and signalled:
        return 128 + signalled, "stopped during start-up, nothing to save"
    if missing:
        status = as_status(runner)
        return (status if status not in (0, PREEMPTED) else 1), \
            f"rank(s) {missing} ended without an exit status (killed?); runner status {status}"
    return as_status(runner), f"no rank reported; the runner's status {as_status(runner)}"


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _runner_preexec() -> None:
    # The runner dies with the wrapper (its ranks then stop as on a dead runner: signals.py).
    _libc().prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class Job:
    def __init__(self, argv: list[str]) -> None:
        self.folder = tempfile.mkdtemp(prefix="moe_dist_job_")
        self.signalled = 0  # the first signal passed on
        if sys.platform.startswith("linux"):
            _libc().prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        self.runner = subprocess.Popen([sys.executable, "-m", "deepspeed.launcher.runner", *argv],
                                       env={**os.environ, JOB_DIR_ENV: self.folder}, process_group=0,
                                       preexec_fn=_runner_preexec if sys.platform.startswith("linux") else None)
        for sig in FORWARDED:
            signal.signal(sig, self._forward)

    def rank_pids(self) -> list[int]:
        pids = []
        for name in os.listdir(self.folder):
            if name.endswith(".pid"):
                with open(os.path.join(self.folder, name)) as f:
                    pids.append(int(f.read()))
        return pids

    def _forward(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        pids = self.rank_pids()
        if pids:
            print(f"job: received {name}: passed to the ranks (pids {pids}), waiting for their checkpoint",
                  file=sys.stderr, flush=True)
            targets = [(pid, signum) for pid in pids]
        else:
            print(f"job: received {name} during start-up: nothing to save, ending the job", file=sys.stderr,
                  flush=True)
            targets = [(-self.runner.pid, signal.SIGTERM)]  # the runner's group: launch.py and ranks too
        self.signalled = self.signalled or signum
        for target, sig in targets:
            try:
                os.kill(target, sig) if target > 0 else os.killpg(-target, sig)
            except (ProcessLookupError, PermissionError):
                pass  # gone already: its status is what counts

    def wait(self) -> int:
        """Reap every process of the job (children, and orphans re-parented here) until none is
        left; then the job's status."""
        runner_rc = None
        while True:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            if pid == self.runner.pid:
                runner_rc = os.waitstatus_to_exitcode(status)
                self.runner.returncode = runner_rc
        codes, world = read_reports(self.folder)
        status, why = job_status(runner_rc if runner_rc is not None else 1, codes, world, self.signalled)
        print(f"job: exit {status}: {why}", file=sys.stderr, flush=True)
        shutil.rmtree(self.folder, ignore_errors=True)
        return status


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.split("\n")[0] + "\n\nusage: python launch/job.py [deepspeed's arguments] SCRIPT [its arguments]",
              file=sys.stderr)
        return 0 if argv else 2
    return Job(argv).wait()
