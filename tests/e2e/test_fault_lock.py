"""One writer per checkpoint directory: the run lock (moe_dist/train/safety/lock.py) directly, the run
id check of a tag (moe_dist/checkpoint/training/tags.py), and two jobs started together on one directory
through the real `deepspeed` launcher (slow): one is refused within seconds, naming the holder, and
every tag of the other carries one run id."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest
import torch
from tests.harness.fault import LiveLaunch
from tests.harness.train import REPO, assert_launch_ok, free_port, launch, tiny_config, write_yaml

from moe_dist.checkpoint.training.layout import read_latest
from moe_dist.checkpoint.training.tags import MARKER, list_tags, tag_problems, tag_step, write_marker
from moe_dist.train.safety import lock as run_lock
from moe_dist.train.safety.lock import RunDirLocked


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def plant_lock(ckpt, **holder) -> None:
    ckpt.mkdir(exist_ok=True)
    base = {"host": socket.gethostname(), "pid": dead_pid(), "start_time": "2026-01-01T00:00:00+00:00",
            "run_id": "r0", "job": "h:1", "token": "t", "boot_id": run_lock._boot_id(),
            "pid_ns": run_lock._pid_namespace()}
    (ckpt / run_lock.LOCK_NAME).write_text(json.dumps({**base, **holder}))


def test_second_acquire_is_refused_naming_the_holder_and_release_frees(tmp_path):
    ckpt = tmp_path / "ckpt"
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        plant_lock(ckpt, pid=child.pid)
        with pytest.raises(RunDirLocked, match=rf"held by pid {child.pid} on host '{socket.gethostname()}' since "
                                               r"2026-01-01T00:00:00\+00:00 \(run id r0.*which is running"):
            run_lock.acquire(str(ckpt), "r1")
        with pytest.raises(RunDirLocked, match="only breaks the lock of a process that is gone"):
            run_lock.acquire(str(ckpt), "r1", break_lock=True)
    finally:
        child.kill()
        child.wait()
    (ckpt / run_lock.LOCK_NAME).unlink()
    lock = run_lock.acquire(str(ckpt), "r1")
    held = json.loads((ckpt / run_lock.LOCK_NAME).read_text())
    assert held["pid"] == os.getpid() and held["run_id"] == "r1" and held["host"] == socket.gethostname()
    lock.release()
    assert not (ckpt / run_lock.LOCK_NAME).exists()


def test_a_lock_of_a_dead_process_on_this_host_is_broken_with_a_log_line(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    plant_lock(ckpt)
    pid = json.loads((ckpt / run_lock.LOCK_NAME).read_text())["pid"]
    lock = run_lock.acquire(str(ckpt), "r1")
    held = json.loads((ckpt / run_lock.LOCK_NAME).read_text())
    assert held["run_id"] == "r1" and held["pid"] == os.getpid()
    assert held["boot_id"] == run_lock._boot_id() and held["pid_ns"] == run_lock._pid_namespace()
    assert (f"run.lock: breaking the stale lock {str(ckpt / run_lock.LOCK_NAME)!r} of pid {pid} on host "
            f"{socket.gethostname()!r}") in capsys.readouterr().out
    lock.release()
    # Its pid now another process (a start time that differs): dead as well. Another boot: dead.
    plant_lock(ckpt, pid=os.getpid(), proc_start="1")
    run_lock.acquire(str(ckpt), "r1").release()
    plant_lock(ckpt, pid=os.getpid(), boot_id="an-earlier-boot")
    run_lock.acquire(str(ckpt), "r1").release()


@pytest.mark.parametrize("holder,message", [
    (dict(pid_ns=None), "stale lock of pid .* which no longer exists .* --break_lock"),
    (dict(boot_id=None), "stale lock of pid .* which no longer exists .* --break_lock"),
    (dict(pid_ns="pid:[1]"), "in another pid namespace under this host name .* cannot tell .* --break_lock"),
], ids=["written_before_pid_ns", "no_boot_id", "other_pid_namespace"])
def test_a_dead_holder_that_cannot_be_proven_dead_is_broken_only_on_request(tmp_path, holder, message):
    ckpt = tmp_path / "ckpt"
    plant_lock(ckpt, **holder)
    with pytest.raises(RunDirLocked, match=message):
        run_lock.acquire(str(ckpt), "r1")
    lock = run_lock.acquire(str(ckpt), "r1", break_lock=True)
    assert json.loads((ckpt / run_lock.LOCK_NAME).read_text())["run_id"] == "r1"
    lock.release()


def test_a_lock_from_another_host_cannot_be_judged(tmp_path):
    ckpt = tmp_path / "ckpt"
    plant_lock(ckpt, host="elsewhere", pid=1)
    with pytest.raises(RunDirLocked, match="on another host .* start again with --break_lock"):
        run_lock.acquire(str(ckpt), "r1")
    run_lock.acquire(str(ckpt), "r1", break_lock=True).release()


def test_release_leaves_a_lock_that_is_not_ours(tmp_path):
    ckpt = tmp_path / "ckpt"
    lock = run_lock.acquire(str(ckpt), "r1")
    plant_lock(ckpt, token="someone else")
    lock.release()
    assert (ckpt / run_lock.LOCK_NAME).exists()


def test_racing_acquires_give_one_holder(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    script = ("import sys, time; from moe_dist.train.safety import lock as run_lock\n"
              "try:\n    run_lock.acquire(sys.argv[1], sys.argv[2]); print('got', flush=True); time.sleep(3)\n"
              "except run_lock.RunDirLocked:\n    print('refused', flush=True)\n")
    procs = [subprocess.Popen([sys.executable, "-c", script, ckpt, f"r{i}"], stdout=subprocess.PIPE, text=True,
                              cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}) for i in range(4)]
    outs = sorted(p.communicate(timeout=120)[0].strip() for p in procs)
    assert outs == ["got", "refused", "refused", "refused"]


def fake_tag(tag_dir, ids: dict[str, str], marker_run: str) -> None:
    tag_dir.mkdir(parents=True)
    for name, run_id in ids.items():
        torch.save({"run_id": run_id}, tag_dir / name)
    write_marker(str(tag_dir), marker_run, 1)


def test_a_tag_whose_files_disagree_is_named(tmp_path):
    good = tmp_path / "ckpt" / "step_00000001"
    fake_tag(good, {"rank_state_00000.pt": "a", "rank_state_00001.pt": "a"}, "a")
    assert tag_problems(str(good)) == []
    mixed = tmp_path / "ckpt2" / "step_00000001"
    fake_tag(mixed, {"rank_state_00000.pt": "a", "rank_state_00001.pt": "b"}, "a")
    (problem,) = tag_problems(str(mixed))
    assert f"{mixed / 'rank_state_00001.pt'}: run id ['b'], expected 'a' ({MARKER})" == problem
    torch.save({"run_id": "a", "extra": torch.zeros(1000)}, good / "rank_state_00001.pt")  # rewritten after the commit
    assert [p for p in tag_problems(str(good)) if "bytes" in p]


# ---- two jobs through the real launcher ------------------------------------------------------

def _launch(config: str, results: dict, key: str) -> None:
    exe = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    t0 = time.monotonic()
    proc = subprocess.run([exe, "--num_gpus", "2", "--master_port", str(free_port()), "launch/pretrain.py",
                           "--config", config], cwd=REPO, capture_output=True, text=True, timeout=900, check=False)
    results[key] = (proc, time.monotonic() - t0)


@pytest.mark.slow
def test_two_jobs_on_one_directory_one_is_refused(tmp_path):
    ckpt = tmp_path / "ckpt"
    cfg = tiny_config(train=dict(steps=30, checkpoint_interval=5, checkpoint_dir=str(ckpt)))
    config = write_yaml(str(tmp_path / "run.yaml"), cfg)
    results: dict = {}
    jobs = [threading.Thread(target=_launch, args=(config, results, k)) for k in ("a", "b")]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join()
    codes = sorted(results[k][0].returncode for k in "ab")
    assert codes == [0, 2], {k: (p.returncode, p.stderr[-3000:]) for k, (p, _) in results.items()}
    loser, seconds = next(results[k] for k in "ab" if results[k][0].returncode == 2)
    assert "is locked by" in loser.stderr and "which is running" in loser.stderr and "pid " in loser.stderr
    print(f"refused job exited after {seconds:.1f}s (from its launch)")
    states = list_tags(str(ckpt))
    assert [s.step for s in states] == [5, 10, 15, 20, 25, 30] and {s.status for s in states} == {"complete"}
    assert len({s.run_id for s in states}) == 1
    assert all(tag_problems(str(ckpt / s.tag)) == [] for s in states)
    assert not (ckpt / run_lock.LOCK_NAME).exists()


@pytest.mark.slow
def test_a_requeue_after_a_sigkill_of_rank_0_breaks_its_lock_by_itself(tmp_path):
    ckpt = tmp_path / "ckpt"
    cfg = tiny_config(train=dict(steps=400, checkpoint_interval=2, checkpoint_dir=str(ckpt)))
    config = write_yaml(str(tmp_path / "run.yaml"), cfg)
    run = LiveLaunch(config)
    try:
        run.wait_for(r"saved checkpoint step_00000002", timeout=300)
        os.kill(run.rank_pid(0), signal.SIGKILL)  # no handler, no atexit: the lock stays
        run.proc.wait(timeout=120)
        run.wait_gone(120)
    finally:
        run.cleanup()
    holder = json.loads((ckpt / run_lock.LOCK_NAME).read_text())
    assert not psutil.pid_exists(holder["pid"])
    resume_at = tag_step(read_latest(str(ckpt)))
    t0 = time.monotonic()
    proc = launch(["--num_gpus", "2", "--master_port", str(free_port()), "launch/pretrain.py", "--config", config,
                   "--resume", "--stop_at_step", str(resume_at + 1)])
    print(f"the requeued launch took {time.monotonic() - t0:.1f}s")
    assert_launch_ok(proc)
    assert (f"run.lock: breaking the stale lock {str(ckpt / run_lock.LOCK_NAME)!r} of pid {holder['pid']} on host "
            f"{socket.gethostname()!r}") in proc.stdout
    assert read_latest(str(ckpt)) == f"step_{resume_at + 1:08d}"
    assert not (ckpt / run_lock.LOCK_NAME).exists()
