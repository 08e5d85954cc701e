"""Preemption: a signal to a rank or to the `deepspeed` runner stops every rank after the same
step with a committed checkpoint, nothing of the run outlives the launcher, the exit status is
75, and `--resume` continues the loss curve exactly."""

from __future__ import annotations

import os
import signal
import time

import pytest
from tests.harness.fault import LiveLaunch
from tests.harness.train import logged_losses, tiny_config, write_yaml

from moe_dist.checkpoint.training.layout import read_latest
from moe_dist.train.safety.exits import PREEMPTED
from moe_dist.train.safety.signals import StopRequest, launcher_chain

STEPS = 400  # more than any test reaches: runs end by a signal or --stop_at_step


def test_a_signal_becomes_a_stop_request_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGUSR1)
    stop = StopRequest().install()
    try:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.1)
        assert stop.requested and "SIGUSR1" in stop.reason
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal changes nothing
        time.sleep(0.1)
        assert "SIGUSR1" in stop.reason
    finally:
        stop.uninstall()
    assert signal.getsignal(signal.SIGUSR1) is before
    assert launcher_chain() == []  # pytest was not started by deepspeed's launch.py


def run_config(tmp_path, name: str) -> str:
    cfg = tiny_config(train=dict(steps=STEPS, log_interval=1, warmup_steps=2,
                                 checkpoint_dir=str(tmp_path / name)))
    return write_yaml(str(tmp_path / f"{name}.yaml"), cfg)


def losses_by_step(output: str) -> dict[int, float]:
    steps = [int(line.split("/")[0].split()[1]) for line in output.splitlines()
             if line.startswith("step ") and "| loss " in line]
    return dict(zip(steps, logged_losses(output)))


def assert_resume_is_exact(tmp_path, config: str, first: dict[int, float], stopped: int) -> None:
    """`--resume` of the stopped run and an uninterrupted reference agree on every logged loss."""
    end = stopped + 3
    resumed = LiveLaunch(config, "--resume", "--stop_at_step", str(end))
    reference = LiveLaunch(run_config(tmp_path, "reference"), "--stop_at_step", str(end))
    try:
        assert resumed.proc.wait(timeout=600) == 0, resumed.output[-4000:]
        assert reference.proc.wait(timeout=600) == 0, reference.output[-4000:]
        resumed.eof.wait(30)
        reference.eof.wait(30)
    finally:
        resumed.cleanup()
        reference.cleanup()
    after = losses_by_step(resumed.output)
    full = losses_by_step(reference.output)
    assert sorted(after) == list(range(stopped + 1, end + 1))
    for step in range(1, stopped + 1):
        assert first[step] == full[step], f"step {step}: {first[step]} != {full[step]}"
    for step in after:
        assert after[step] == full[step], f"step {step} after resume: {after[step]} != {full[step]}"


@pytest.mark.slow
def test_sigterm_to_the_deepspeed_runner_saves_leaves_no_process_and_resume_is_exact(tmp_path):
    run = LiveLaunch(run_config(tmp_path, "run"))
    try:
        run.wait_for(r"^step 4/", timeout=400)
        t0 = time.monotonic()
        run.proc.send_signal(signal.SIGTERM)  # the runner: DeepSpeed's runner.py dies at once
        gone_s = run.wait_gone(timeout=120)
        out = run.output
        stopped = int(run.wait_for(r"stopped after step (\d+)", timeout=1).group(1))
        assert "launcher process" in out and "is gone: treated as SIGTERM" in out, out[-4000:]
        assert f"(exit {PREEMPTED})" in out
        assert read_latest(str(tmp_path / "run")) == f"step_{stopped:08d}"
        first = losses_by_step(out)
        assert max(first) == stopped  # no rank trained on past the checkpoint
        print(f"SIGTERM to the runner -> checkpoint at step {stopped}, no process left after "
              f"{gone_s:.1f}s ({time.monotonic() - t0:.1f}s)")
    finally:
        run.cleanup()
    assert_resume_is_exact(tmp_path, run.config, first, stopped)


@pytest.mark.slow
def test_sigusr1_to_one_rank_stops_all_with_exit_75_and_resume_is_exact(tmp_path):
    run = LiveLaunch(run_config(tmp_path, "run"))
    try:
        run.wait_for(r"^step 4/", timeout=400)
        t0 = time.monotonic()
        os.kill(run.rank_pid(1), signal.SIGUSR1)
        assert run.proc.wait(timeout=120) == PREEMPTED, run.output[-4000:]
        took = time.monotonic() - t0
        run.wait_gone(timeout=60)
    finally:
        run.cleanup()
    stopped = int(run.wait_for(r"stopped after step (\d+)", timeout=1).group(1))
    assert "rank(s) [1] asked to stop" in run.output
    assert read_latest(str(tmp_path / "run")) == f"step_{stopped:08d}"
    first = losses_by_step(run.output)
    assert max(first) == stopped

    assert_resume_is_exact(tmp_path, run.config, first, stopped)
    print(f"SIGUSR1 to rank 1 -> every rank stopped at step {stopped}, exit 75 after {took:.1f}s")
