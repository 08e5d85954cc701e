"""The real `deepspeed` launcher as a live process for fault-injection tests: read its merged
output while it runs, find its ranks, signal them, and make sure nothing of it is left."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import psutil
from train_harness import REPO, free_port


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
    def __init__(self, config: str, *extra: str) -> None:
        exe = os.path.join(os.path.dirname(sys.executable), "deepspeed")
        self.config = config
        self.proc = subprocess.Popen(
            [exe, "--num_gpus", "2", "--master_port", str(free_port()), "launch/pretrain.py",
             "--config", config, *extra],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
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
