"""Helpers of the fault-injection tests: the real `deepspeed` launcher as a live process (read its
merged output while it runs, find its ranks, signal them, make sure nothing of it is left), and the
ENOSPC shim (tests/harness/enospc.c) built on demand with the environment that makes launched
processes see a full disk for chosen paths."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
from tests.harness.train import REPO, free_port

SHIM_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "enospc.c")


def enospc_shim(tmp_dir: str) -> str:
    """Path of the compiled shim (skips the test where no C compiler exists)."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the ENOSPC shim")
    out = os.path.join(tmp_dir, "enospc.so")
    subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", out, SHIM_SOURCE, "-ldl"], check=True,
                   capture_output=True, text=True)
    return out


def full_disk_env(shim: str, *path_parts: str) -> dict[str, str]:
    """Environment under which writes to any path containing one of `path_parts` fail with ENOSPC."""
    return {"LD_PRELOAD": shim, "MOE_DIST_FAULT_ENOSPC": ":".join(path_parts)}


def run_processes(marker: str) -> list[psutil.Process]:
    """Every process whose command line contains `marker` (a run's unique config path): the
    runner, launch.py and the ranks, whoever their parent is now."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if proc.pid != os.getpid() and marker in " ".join(proc.info["cmdline"] or []):
                found.append(proc)
        except psutil.Error:
            pass
    return found


class LiveLaunch:
    def __init__(self, config: str, *extra: str, job: bool = False, new_session: bool = False) -> None:
        """The bare `deepspeed` runner, or with `job` moe_dist's wrapper `launch/job.py` around it;
        `new_session`: in a session (and process group) of its own, to be signalled as a group."""
        exe = [sys.executable, "launch/job.py"] if job else [os.path.join(os.path.dirname(sys.executable), "deepspeed")]
        self.config = config
        self.proc = subprocess.Popen(
            [*exe, "--num_gpus", "2", "--master_port", str(free_port()), "launch/pretrain.py",
             "--config", config, *extra],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=new_session)
        self.lines: list[str] = []
        self.eof = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        # EOF only when every process holding the pipe (runner, launch.py, ranks) has exited.
        for line in self.proc.stdout:
            self.lines.append(line)
        self.eof.set()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, self.output, re.MULTILINE)
            if match:
                return match
            if self.eof.is_set():
                break
            time.sleep(0.2)
        raise AssertionError(f"{pattern!r} not seen within {timeout}s; output:\n{self.output[-6000:]}")

    def rank_pid(self, rank: int) -> int:
        for proc in run_processes(self.config):
            cmd = " ".join(proc.cmdline())
            if "launch/pretrain.py" in cmd and f"--local_rank={rank}" in cmd:  # only ranks get it
                return proc.pid
        raise AssertionError(f"rank {rank} of {self.config} not found")

    def pid_of(self, marker: str) -> int:
        """The one process of the run whose command line holds `marker` ("deepspeed.launcher.launch")."""
        found = [p.pid for p in run_processes(self.config) if marker in " ".join(p.cmdline())]
        assert len(found) == 1, f"{marker}: {found}"
        return found[0]

    def wait_gone(self, timeout: float) -> float:
        """Seconds until no process of the run is left (pipe closed and none found)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.eof.is_set() and not run_processes(self.config):
                return time.monotonic() - t0
            time.sleep(0.2)
        left = [(p.pid, " ".join(p.cmdline())[:120]) for p in run_processes(self.config)]
        raise AssertionError(f"processes of the run still alive after {timeout}s: {left}")

    def cleanup(self) -> None:
        """Teardown: continue stopped processes and kill whatever of this run is left."""
        for proc in run_processes(self.config):
            try:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
            except psutil.Error:
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
