"""A run folder that explains itself (`train.run_dir`, written by rank 0 at start): what was
trained, with which DeepSpeed settings, launched how, and what rank 0 printed.

    config.yaml               the resolved config (every default filled in, --set applied)
    deepspeed_config.json     the DeepSpeed JSON as reconciled with `train` (train/ds_config.py)
    launch.json               the rank's argv, the launcher's command lines (deepspeed, job.py),
                              the launch environment (WORLD_SIZE, MASTER_ADDR, ...), host, time,
                              run id, attempt, whether it resumed
    train.log                 rank 0's stdout and stderr (and DeepSpeed's log lines), appended

Every start is an attempt: the first writes the names above; attempt k >= 2 (a `--resume`, or a
new start in the same folder) writes `config.attempt<k>.yaml`, `deepspeed_config.attempt<k>.json`
and `launch.attempt<k>.json` beside them, never over them, and appends to train.log after a
header line `==== attempt k ...`. The files are written atomically (common/atomic.py). A failing
write of train.log later (a full disk) warns once and stops the copy; the console goes on.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import socket
import sys
from typing import Any

import yaml

from moe_dist.common.atomic import write_text_atomic
from moe_dist.common.config import ConfigError

LOG_FILE = "train.log"
# What the launcher and the scheduler set that says how the job ran.
LAUNCH_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_SIZE", "CROSS_RANK", "CROSS_SIZE", "MASTER_ADDR",
              "MASTER_PORT", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "PYTHONPATH", "SLURM_JOB_ID",
              "SLURM_RESTART_COUNT")
LAUNCHERS = ("deepspeed", "launch/job.py", "torchrun")


def attempt_names(attempt: int) -> dict[str, str]:
    suffix = "" if attempt == 1 else f".attempt{attempt}"
    return {"config": f"config{suffix}.yaml", "deepspeed": f"deepspeed_config{suffix}.json",
            "launch": f"launch{suffix}.json"}


def next_attempt(run_dir: str) -> int:
    found = [1 if name == "launch.json" else int(m.group(1)) for name in os.listdir(run_dir)
             if name == "launch.json" or (m := re.fullmatch(r"launch\.attempt(\d+)\.json", name))]
    return max(found, default=0) + 1


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def launcher_commands(max_depth: int = 4) -> list[list[str]]:
    """The command lines of this process's ancestors that are launchers (nearest first)."""
    out, pid = [], os.getppid()
    for _ in range(max_depth):
        if not pid or pid <= 1:
            break
        cmd = _cmdline(pid)
        if any(marker in " ".join(cmd) for marker in LAUNCHERS):
            out.append(cmd)
        pid = _parent(pid)
    return out


class RunLog:
    """Rank 0's stdout and stderr copied into train.log while the run lasts (`close` restores)."""

    def __init__(self, path: str, header: str) -> None:
        self.path = path
        self.file = open(path, "a", buffering=1)
        self.file.write(header + "\n")
        self.streams = (sys.stdout, sys.stderr)
        sys.stdout, sys.stderr = _Tee(sys.stdout, self), _Tee(sys.stderr, self)
        self.handler = logging.StreamHandler(_Tee(None, self))
        self.handler.setFormatter(logging.Formatter("[%(asctime)s] [%(levelname)s] %(message)s"))
        logging.getLogger("DeepSpeed").addHandler(self.handler)

    def write(self, text: str) -> None:
        if self.file is None:
            return
        try:
            self.file.write(text)
        except Exception as e:  # noqa: BLE001 - a copy of the console must not stop training
            file, self.file = self.file, None
            try:
                file.close()
            except Exception:  # noqa: BLE001 - already broken
                pass
            self.streams[1].write(f"warning: writing {self.path!r} failed ({type(e).__name__}: {e}); the run "
                                  f"log is off for the rest of this run, training goes on\n")

    def close(self) -> None:
        logging.getLogger("DeepSpeed").removeHandler(self.handler)
        if isinstance(sys.stdout, _Tee) and sys.stdout.log is self:
            sys.stdout = self.streams[0]
        if isinstance(sys.stderr, _Tee) and sys.stderr.log is self:
            sys.stderr = self.streams[1]
        if self.file is not None:
            try:
                self.file.close()
            except Exception:  # noqa: BLE001 - as for a write
                pass
            self.file = None


class _Tee:
    def __init__(self, stream, log: RunLog) -> None:
        self.stream, self.log = stream, log

    def write(self, text: str) -> int:
        self.log.write(text)
        return self.stream.write(text) if self.stream is not None else len(text)

    def flush(self) -> None:
        if self.stream is not None:
            self.stream.flush()

    def __getattr__(self, name: str):  # fileno, isatty, encoding: the console's
        return getattr(self.stream, name)


def write_run_record(run_dir: str, run_config: dict[str, Any], ds_config: dict[str, Any], *, resume: bool,
                     run_id: str | None) -> RunLog:
    """Write this attempt's files and start copying rank 0's output; -> the log to close at the end.
    A folder that cannot be written is a ConfigError naming it (before any process group exists)."""
    try:
        os.makedirs(run_dir, exist_ok=True)
        attempt = next_attempt(run_dir)
        names = attempt_names(attempt)
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        launch = {"attempt": attempt, "time_utc": now, "host": socket.gethostname(), "cwd": os.getcwd(),
                  "resume": resume, "run_id": run_id, "executable": sys.executable, "argv": sys.argv,
                  "launchers": launcher_commands(),
                  "env": {k: os.environ[k] for k in LAUNCH_ENV if k in os.environ}}
        write_text_atomic(os.path.join(run_dir, names["config"]),
                          yaml.safe_dump(run_config, sort_keys=False, default_flow_style=None))
        write_text_atomic(os.path.join(run_dir, names["deepspeed"]), json.dumps(ds_config, indent=2) + "\n")
        write_text_atomic(os.path.join(run_dir, names["launch"]), json.dumps(launch, indent=2) + "\n")
        header = (f"==== attempt {attempt} {now} on {launch['host']}{' (--resume)' if resume else ''}: "
                  f"{' '.join(sys.argv)}")
        return RunLog(os.path.join(run_dir, LOG_FILE), header)
    except OSError as e:
        raise ConfigError(f"train.run_dir {run_dir!r}: cannot write the run's record there "
                          f"({type(e).__name__}: {e}); expected a folder this process can create files in") from None
