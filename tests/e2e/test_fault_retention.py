"""`train.keep_last` deletions off the save's critical path (moe_dist/checkpoint/training/retention.py):
with a deletion that cannot finish until the test releases it, every rank's save returns first (rank 0
deletes in a background thread after the last collective); a process waits for its pending
deletions at exit, bounded and saying so; and a process killed in the middle of a deletion
leaves a directory whose `latest` is complete and sound and whose every tag is whole."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from types import SimpleNamespace

import torch
from tests.harness.dist import run_distributed

from moe_dist.checkpoint.training import retention, writer
from moe_dist.checkpoint.training.layout import CLIENT_KEY, MODEL_STATES, read_latest
from moe_dist.checkpoint.training.tags import COMPLETE, RUN_ID_KEY, check_latest_tag, list_tags, tag_problems

DELETION_HOLD_S = 60.0  # how long a held deletion waits for its release at most


class FakeEngine:
    """What `writer.save` asks of DeepSpeed's engine: its files, carrying the run id."""

    def __init__(self) -> None:
        self.module = torch.nn.Linear(2, 2)

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        assert save_latest is False
        rank = torch.distributed.get_rank()
        tag_dir = os.path.join(save_dir, tag)
        os.makedirs(tag_dir, exist_ok=True)
        ds_config = {RUN_ID_KEY: client_state[CLIENT_KEY]["run_id"]}
        if rank == 0:
            torch.save({**client_state, "ds_config": ds_config, "pad": torch.zeros(1000)},
                       os.path.join(tag_dir, MODEL_STATES))
        torch.save({"ds_config": ds_config}, os.path.join(tag_dir, f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"))


def _save_worker(rank: int, world: int, ckpt: str) -> None:
    engine, groups = FakeEngine(), SimpleNamespace(ep_size=world, ep_rank=rank)
    for step in (1, 2):
        writer.save(engine, ckpt, step, {}, groups, run_id="run", keep_last=1)
    retention.wait_for_deletions(30, "test")
    if rank == 0:
        assert [s.tag for s in list_tags(ckpt)] == ["step_00000002"]
    torch.distributed.barrier()
    # The deletion cannot finish before the test releases it, which it does only after the save
    # returned: a save that waited for it would return after DELETION_HOLD_S with it done.
    real_rmtree, release, deleted = retention.shutil.rmtree, threading.Event(), threading.Event()

    def held_rmtree(path, **kw):
        release.wait(DELETION_HOLD_S)
        real_rmtree(path, **kw)
        deleted.set()

    retention.shutil.rmtree = held_rmtree
    writer.save(engine, ckpt, 3, {}, groups, run_id="run", keep_last=1)
    assert not deleted.is_set(), f"rank {rank}: the save returned only after the keep_last deletion finished"
    if rank == 0:
        assert retention.deletions_pending()
        release.set()
        assert read_latest(ckpt) == "step_00000003"
        assert retention.wait_for_deletions(30, "test")
        assert [s.tag for s in list_tags(ckpt)] == ["step_00000003"]
    torch.distributed.barrier()


def test_no_rank_waits_for_a_slow_keep_last_deletion(tmp_path):
    run_distributed(_save_worker, 2, str(tmp_path / "ckpt"))


def make_tags(ckpt, steps=(1, 2, 3)):
    from tests.e2e.test_fault_disk import make_tag

    for step in steps:
        make_tag(ckpt, step, size=200_000)
    (ckpt / "latest").write_text(f"step_{steps[-1]:08d}")


def run_child(ckpt, body: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """A process that starts the keep_last=1 deletion of `ckpt` after `body` (patches) and exits."""
    script = textwrap.dedent("""
        import os, shutil, sys, time
        from moe_dist.checkpoint.training import retention
        ckpt = sys.argv[1]
    """) + textwrap.dedent(body) + textwrap.dedent("""
        retention.apply_keep_last_in_background(ckpt, 1, just_written="step_00000003", run_id="run")
        print("save returned", flush=True)
    """)
    return subprocess.run([sys.executable, "-c", script, str(ckpt)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


def assert_resumable(ckpt) -> None:
    """`latest` names a complete, sound tag; every `step_` tag is complete and whole; the next
    start removes what the deletion left and finds no partial tag."""
    latest = read_latest(str(ckpt))
    assert latest == "step_00000003"
    check_latest_tag(str(ckpt))
    for state in list_tags(str(ckpt)):
        assert state.status == COMPLETE, state
        assert tag_problems(str(ckpt / state.tag)) == [], state.tag
    assert retention.remove_partial_tags(str(ckpt)) == []
    assert not [n for n in os.listdir(ckpt) if n.startswith(".")]


def test_the_process_waits_for_its_deletions_at_exit(tmp_path):
    make_tags(tmp_path)
    proc = run_child(tmp_path, """
        real = shutil.rmtree
        retention.shutil.rmtree = lambda path, **kw: (time.sleep(1.5), real(path, **kw))
    """)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    waiting = "checkpoint retention: waiting up to 600s for old checkpoints to be deleted (the process is exiting)"
    # The script's last line ran before the deletion was done; the exit waited for it.
    assert (lines.index("save returned") < lines.index(waiting)
            < lines.index("train.keep_last=1: deleted checkpoint step_00000001"))
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_00000003"]  # no hidden leftover either
    assert_resumable(tmp_path)


def test_the_wait_at_exit_is_bounded_and_leaves_a_resumable_directory(tmp_path):
    make_tags(tmp_path)
    t0 = time.monotonic()
    proc = run_child(tmp_path, """
        retention.EXIT_WAIT_S = 0.5
        retention.shutil.rmtree = lambda path, **kw: time.sleep(600)
    """)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - t0 < 60
    assert "deletions still running after 0.5s; going on without them" in proc.stdout
    assert [n for n in os.listdir(tmp_path) if ".deleting-" in n]  # step 1, renamed aside
    assert_resumable(tmp_path)


def test_a_crash_in_the_middle_of_a_deletion_leaves_a_resumable_directory(tmp_path):
    make_tags(tmp_path)
    proc = run_child(tmp_path, """
        def crash(path, **kw):  # removes one file of the tag, then the process is killed
            os.remove(os.path.join(path, sorted(os.listdir(path))[0]))
            os._exit(137)
        retention.shutil.rmtree = crash
    """, timeout=60)
    # The crash comes from the deletion thread, wherever the main thread is (done, or waiting at exit).
    assert proc.returncode == 137, (proc.returncode, proc.stdout, proc.stderr)
    halves = [n for n in os.listdir(tmp_path) if ".deleting-" in n]
    assert len(halves) == 1 and halves[0].startswith(".step_00000001.")  # half deleted, hidden
    assert [s.tag for s in list_tags(str(tmp_path))] == ["step_00000002", "step_00000003"]
    assert_resumable(tmp_path)
    assert [s.tag for s in list_tags(str(tmp_path))] == ["step_00000002", "step_00000003"]
