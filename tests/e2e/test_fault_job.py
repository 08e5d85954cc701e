"""Preemption reaches every process of a job: DataLoader workers outlive the stop signals (the rank
decides and saves), and `launch/job.py` exits 75 whenever every rank checkpointed on a signal,
whichever process of the job got it, after the last of them is gone (issue 26, items 2 and 6)."""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest
import torch
from tests.e2e.test_fault_signal import assert_resume_is_exact, losses_by_step, run_config
from tests.harness.fault import LiveLaunch, run_processes
from tests.harness.train import tiny_config, write_yaml

from moe_dist.checkpoint.training.layout import read_latest
from moe_dist.data.loader import build_dataloader
from moe_dist.train.safety.exits import PREEMPTED
from moe_dist.train.safety.job import as_status, job_status

STEPS = 400  # more than any test reaches: runs end by a signal


class _Slow(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> dict:
        time.sleep(0.02)
        return {"tokens": [i] * 3, "domain_ids": [0] * 2}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_dataloader_workers_outlive_a_stop_signal(sig):
    batches = iter(build_dataloader(_Slow(), 2, num_workers=2))
    first = next(batches)["tokens"][:, 0].tolist()
    workers = [w.pid for w in batches._workers]
    previous = signal.signal(sig, lambda *_: None)  # the rank's own handler: a stop request
    try:
        for pid in workers:
            os.kill(pid, sig)
        time.sleep(0.3)
        assert all(psutil.pid_exists(pid) for pid in workers)
        rest = [b["tokens"][:, 0].tolist() for b in batches]  # raised "DataLoader worker ... killed" before
    finally:
        signal.signal(sig, previous)
    assert first + sum(rest, []) == list(range(64))


def test_the_job_status_is_75_only_when_every_rank_checkpointed():
    assert job_status(0, {0: 75, 1: 75}, 2) == (75, "every rank (2) checkpointed and exited 75")
    assert job_status(-9, {0: 75, 1: 75}, 2)[0] == 75  # launch.py SIGKILLed: DeepSpeed's runner says 0
    assert job_status(-15, {0: 75, 1: 75}, 2)[0] == 75  # runner SIGTERMed: 143 at once
    assert job_status(0, {0: 0, 1: 0}, 2)[0] == 0
    assert job_status(75, {0: 75}, 2)[0] == 1  # rank 1 vanished: not a state to trust
    assert job_status(-9, {0: 75}, 2)[0] == 137
    assert job_status(1, {0: 75, 1: 3}, 2)[0] == 3
    assert job_status(-15, {}, None, signal.SIGTERM)[0] == 143  # start-up: nothing to save
    assert job_status(-9, {}, None) == (137, "no rank reported; the runner's status 137")  # not DeepSpeed's 0
    assert job_status(2, {}, None)[0] == 2


def _stop_and_check(run: LiveLaunch, tmp_path, name: str, send) -> tuple[int, float]:
    """Wait for step 4, `send()`, then: job status 75, the stop checkpoint is `latest`, and no
    process of the job outlives the wrapper's exit. -> (stopped step, seconds to the job's exit)."""
    run.wait_for(r"^step 4/", timeout=400)
    t0 = time.monotonic()
    send()
    status = run.proc.wait(timeout=180)
    took = time.monotonic() - t0
    left = run_processes(run.config)  # the wrapper waited for every process of the job
    out = run.output
    assert status == PREEMPTED, f"exit {status}\n{out[-5000:]}"
    assert not left, [(p.pid, " ".join(p.cmdline())[:100]) for p in left]
    stopped = int(run.wait_for(r"stopped after step (\d+)", timeout=1).group(1))
    assert f"job: exit {PREEMPTED}: every rank (2) checkpointed" in out
    assert read_latest(str(tmp_path / name)) == f"step_{stopped:08d}"
    assert max(losses_by_step(out)) == stopped
    return stopped, took


@pytest.mark.slow
def test_sigterm_to_every_process_with_data_workers_saves_exits_75_and_resume_is_exact(tmp_path):
    cfg = tiny_config(data=dict(num_workers=2),
                      train=dict(steps=STEPS, log_interval=1, warmup_steps=2, checkpoint_dir=str(tmp_path / "run")))
    config = write_yaml(str(tmp_path / "run.yaml"), cfg)
    run = LiveLaunch(config, job=True)
    try:
        def everyone():  # a scheduler's SIGTERM to every process of the job, workers included
            procs = run_processes(config)
            assert len(procs) >= 2 + 2 + 2 * 2, [" ".join(p.cmdline())[:80] for p in procs]
            for p in procs:
                p.send_signal(signal.SIGTERM)
        stopped, took = _stop_and_check(run, tmp_path, "run", everyone)
        first = losses_by_step(run.output)
    finally:
        run.cleanup()
    assert "is killed by signal" not in run.output
    print(f"SIGTERM to every process, num_workers 2 -> checkpoint of step {stopped}, job exit 75 after {took:.1f}s")
    assert_resume_is_exact(tmp_path, config, first, stopped)


@pytest.mark.slow
@pytest.mark.parametrize("target,sig", [("deepspeed.launcher.launch", signal.SIGKILL),
                                        ("deepspeed.launcher.runner", signal.SIGINT),
                                        ("deepspeed.launcher.runner", signal.SIGTERM),
                                        ("launch/job.py", signal.SIGINT)],  # Ctrl-C: the terminal's group
                         ids=["launch-SIGKILL", "runner-SIGINT", "runner-SIGTERM", "job-SIGINT"])
def test_the_job_exits_75_whichever_process_gets_the_signal(tmp_path, target, sig):
    run = LiveLaunch(run_config(tmp_path, "run"), job=True)
    try:
        pid = None

        def send():
            nonlocal pid
            pid = run.pid_of(target)
            os.kill(pid, sig)
        stopped, took = _stop_and_check(run, tmp_path, "run", send)
    finally:
        run.cleanup()
    print(f"{signal.Signals(sig).name} to {target} -> checkpoint of step {stopped}, job exit 75 after {took:.1f}s")


@pytest.mark.slow
@pytest.mark.parametrize("target,sig,status", [("deepspeed.launcher.launch", signal.SIGKILL, 0),
                                               ("deepspeed.launcher.runner", signal.SIGINT, 130),
                                               ("deepspeed.launcher.runner", signal.SIGTERM, 143)],
                         ids=["launch-SIGKILL", "runner-SIGINT", "runner-SIGTERM"])
def test_bare_deepspeed_still_saves_but_its_status_is_pinned(tmp_path, target, sig, status):
    """What DeepSpeed 0.19.8's runner itself returns (docs/launch.md): the ranks commit the stop
    checkpoint all the same, but the runner returns at once, before they have saved, with a status
    that does not say so. launch/job.py exists for this."""
    run = LiveLaunch(run_config(tmp_path, "run"))
    try:
        run.wait_for(r"^step 4/", timeout=400)
        os.kill(run.proc.pid if target == "deepspeed.launcher.runner" else run.pid_of(target), sig)  # bin/deepspeed
        assert as_status(run.proc.wait(timeout=120)) == status, run.output[-4000:]
        run.wait_gone(timeout=120)
    finally:
        run.cleanup()
    stopped = int(run.wait_for(r"stopped after step (\d+)", timeout=1).group(1))
    assert read_latest(str(tmp_path / "run")) == f"step_{stopped:08d}"


@pytest.mark.slow
def test_a_signal_to_the_job_during_start_up_ends_it_with_143_and_nothing_left(tmp_path):
    """Before any rank can save there is nothing to wait for: the whole job gets a SIGTERM, the
    status says killed (not 0, not 75) and no process of it stays behind."""
    run = LiveLaunch(run_config(tmp_path, "run"), job=True)
    try:
        run.wait_for(r"process \d+ spawned with command", timeout=120)  # launch.py started the ranks
        t0 = time.monotonic()
        os.kill(run.proc.pid, signal.SIGTERM)
        status = run.proc.wait(timeout=120)
        took = time.monotonic() - t0
        left = run_processes(run.config)
    finally:
        run.cleanup()
    assert status == 128 + signal.SIGTERM, run.output[-4000:]
    assert not left
    assert "job: received SIGTERM during start-up: nothing to save" in run.output
    assert "job: exit 143: stopped during start-up, nothing to save" in run.output
    assert read_latest(str(tmp_path / "run")) is None
    print(f"SIGTERM to the job during start-up -> exit 143 after {took:.1f}s")


@pytest.mark.slow
def test_a_process_group_sigterm_with_data_workers_saves_under_bare_deepspeed(tmp_path):
    """SIGTERM to the process group of a bare `deepspeed` job (runner, launch.py, ranks, workers):
    the workers live on, both ranks commit the stop checkpoint and exit 75; DeepSpeed's runner
    itself dies of the signal at once (143, pinned: launch/job.py is the fix for the status)."""
    cfg = tiny_config(data=dict(num_workers=2),
                      train=dict(steps=STEPS, log_interval=1, warmup_steps=2, checkpoint_dir=str(tmp_path / "run")))
    run = LiveLaunch(write_yaml(str(tmp_path / "run.yaml"), cfg), new_session=True)
    try:
        run.wait_for(r"^step 4/", timeout=400)
        os.killpg(run.proc.pid, signal.SIGTERM)
        assert as_status(run.proc.wait(timeout=120)) == 128 + signal.SIGTERM
        gone_s = run.wait_gone(timeout=120)
    finally:
        run.cleanup()
    out = run.output
    stopped = int(run.wait_for(r"stopped after step (\d+)", timeout=1).group(1))
    assert "is killed by signal" not in out, out[-4000:]
    assert out.count(f"(exit {PREEMPTED})") == 2, out[-4000:]
    assert read_latest(str(tmp_path / "run")) == f"step_{stopped:08d}"
    print(f"SIGTERM to the process group of bare deepspeed, num_workers 2 -> checkpoint of step {stopped}, "
          f"ranks exit 75, nothing left after {gone_s:.1f}s")


def test_a_rank_reports_its_exit_status_to_the_job_also_on_a_usage_error(tmp_path):
    import subprocess
    import sys

    from tests.harness import REPO

    env = {**os.environ, "MOE_DIST_JOB_DIR": str(tmp_path), "RANK": "1", "WORLD_SIZE": "2"}
    proc = subprocess.run([sys.executable, "launch/pretrain.py", "--no_such_flag"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert (tmp_path / "rank1.exit").read_text() == "2 2"
