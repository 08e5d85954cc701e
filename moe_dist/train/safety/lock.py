"""One writer per checkpoint directory: `<checkpoint_dir>/run.lock`.

Two jobs writing one directory mix one run's weights with the other's optimizer state in the same
tag. The first process of a job (global rank 0: under the deepspeed launcher every rank runs
preflight, and the others write nothing before rank 0 has joined the process group) creates the
lock before anything else is written; a second job's rank 0 finds it and exits with status 2,
which makes its launcher end the job.

The lock is created whole and at once: its JSON (host, pid, start time, run id, the launcher's
job identity) is written to a temporary file that is then hard-linked onto `run.lock`, which fails
if the name exists (atomic on local filesystems and NFS; O_EXCL where links are not allowed).
It is removed when the run ends. A lock left by a process that died (SIGKILL, a crash of the
machine, an exit that skipped the release) stays. The next start breaks it by itself, saying so,
when the holder is provably dead: it ran on this host, in this pid namespace (a container with
the same host name sees other pids) and since this boot, and its pid is gone or now belongs to a
process with another start time; or this host has rebooted since. A scheduler's requeue then
needs no `--break_lock`. A holder on another host cannot be judged from here (nor a lock written
before the pid namespace was recorded): only `--break_lock` removes it. A live holder on this
host is never broken.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import socket
import uuid
from dataclasses import dataclass
from typing import Any

from moe_dist.common.atomic import temporary_sibling
from moe_dist.common.config import ConfigError

LOCK_NAME = "run.lock"


class RunDirLocked(ConfigError):
    """Another run holds (or a dead run left) the checkpoint directory's lock."""


def _proc_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (clock ticks since boot), which a reused pid does not share."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _read_first_line(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.readline().strip() or None
    except OSError:
        return None


def _boot_id() -> str | None:
    """Differs after every boot of this machine."""
    return _read_first_line("/proc/sys/kernel/random/boot_id")


def _pid_namespace() -> str | None:
    """'pid:[4026531836]': pids mean the same process only within one namespace."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def provably_dead(holder: dict[str, Any]) -> bool:
    """True only for a holder that ran on this host and is certainly gone: this machine rebooted
    since, or (same boot, same pid namespace) its pid no longer exists or is another process."""
    pid = holder.get("pid")
    if "unreadable" in holder or holder.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return False
    boot = _boot_id()
    if holder.get("boot_id") is not None and boot is not None and holder["boot_id"] != boot:
        return True
    if holder.get("pid_ns") is None or holder.get("pid_ns") != _pid_namespace():
        return False
    if holder.get("boot_id") != boot:
        return False
    return holder_alive(holder) is False


def holder_alive(holder: dict[str, Any]) -> bool | None:
    """True/False for a holder on this host, None for one on another host or in another pid
    namespace (cannot tell)."""
    if holder.get("host") != socket.gethostname():
        return None
    if holder.get("pid_ns") is not None and holder["pid_ns"] != _pid_namespace():
        return None
    pid = int(holder.get("pid", -1))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    recorded = holder.get("proc_start")
    return recorded is None or _proc_start(pid) in (None, recorded)


def describe(holder: dict[str, Any]) -> str:
    return (f"pid {holder.get('pid')} on host {holder.get('host')!r} since {holder.get('start_time')} "
            f"(run id {holder.get('run_id')}, job {holder.get('job')})")


def read_holder(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"unreadable": path}


def _job_identity() -> str:
    """What every rank of one launch shares: its rendezvous address (MASTER_ADDR:MASTER_PORT)."""
    return f"{os.environ.get('MASTER_ADDR', 'local')}:{os.environ.get('MASTER_PORT', '-')}"


def _create_exclusive(path: str, text: str) -> bool:
    """Create `path` holding `text` unless it exists; True if this call created it."""
    tmp = temporary_sibling(path, "new")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        try:  # a filesystem without hard links: O_EXCL, and the content right after
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


@dataclass
class RunLock:
    path: str
    token: str  # unique to this acquisition: release removes only our own lock
    holder: dict[str, Any]

    def release(self) -> None:
        held = read_holder(self.path)
        if held is not None and held.get("token") == self.token:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)


def _break(path: str, holder: dict[str, Any]) -> None:
    """Move the judged-stale lock aside; put it back if it changed in between (a new holder)."""
    aside = temporary_sibling(path, "broken")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    if read_holder(aside) != holder:
        os.rename(aside, path)
        raise RunDirLocked(f"the lock {path!r} changed while it was being broken; start again")
    os.remove(aside)


def acquire(checkpoint_dir: str, run_id: str, break_lock: bool = False) -> RunLock:
    """Take the directory's lock or raise RunDirLocked naming the holder."""
    os.makedirs(checkpoint_dir, exist_ok=True)
    path = os.path.join(checkpoint_dir, LOCK_NAME)
    token = uuid.uuid4().hex
    me = {"host": socket.gethostname(), "pid": os.getpid(), "proc_start": _proc_start(os.getpid()),
          "boot_id": _boot_id(), "pid_ns": _pid_namespace(),
          "start_time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "run_id": run_id, "job": _job_identity(), "token": token}
    text = json.dumps(me, indent=1, sort_keys=True)
    for _ in range(3):  # a holder may release between our attempt and our read
        if _create_exclusive(path, text):
            return RunLock(path=path, token=token, holder=me)
        holder = read_holder(path)
        if holder is None:
            continue
        alive = holder_alive(holder)
        if alive and holder.get("pid") == os.getpid() and holder.get("proc_start") == me["proc_start"]:
            _break(path, holder)  # this very process: a lock an earlier, unreleased preflight took
            continue
        if provably_dead(holder):
            print(f"run.lock: breaking the stale lock {path!r} of {describe(holder)}: that process no longer "
                  f"exists on this host (the run ended without releasing it)", flush=True)
            _break(path, holder)
            continue
        if break_lock and alive is not True:
            print(f"--break_lock: removing the lock {path!r} of {describe(holder)}", flush=True)
            _break(path, holder)
            continue
        raise RunDirLocked(_refusal(checkpoint_dir, path, holder, alive, break_lock))
    raise RunDirLocked(f"could not take the lock {path!r}: it keeps changing (another run is starting)")


def _refusal(checkpoint_dir: str, path: str, holder: dict[str, Any], alive: bool | None, break_lock: bool) -> str:
    where = f"train.checkpoint_dir {checkpoint_dir!r} is locked by {path!r}: "
    if "unreadable" in holder:
        return where + "the lock file cannot be read; remove it by hand once no run writes this directory"
    if alive:
        tail = ("--break_lock only breaks the lock of a process that is gone" if break_lock else
                "wait for that run to end, or use another checkpoint_dir")
        return where + f"held by {describe(holder)}, which is running; {tail} (two runs in one directory mix " \
                       f"their checkpoints)"
    if alive is False:
        return where + f"stale lock of {describe(holder)}, which no longer exists (the run died without " \
                       f"releasing it); make sure nothing writes this directory, then start again with --break_lock"
    other = ("in another pid namespace under this host name (another container)"
             if holder.get("host") == socket.gethostname() else "on another host")
    return where + f"held by {describe(holder)}, {other} (this process cannot tell whether it still runs); " \
                   f"if it does not, start again with --break_lock"
