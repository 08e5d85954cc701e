"""`--resume auto` (launch/pretrain.py) for schedulers that requeue the same command: the first
start finds no checkpoint and starts a new run; stopped by SIGTERM (exit 75, checkpoint committed),
the identical command resumes from it. The run folder keeps each attempt's record (launch.json,
launch.attempt2.json) and one train.log. A folder holding tags but no `latest` is still refused.
Through launch/job.py and the `deepspeed` launcher (2 CPU ranks)."""

from __future__ import annotations

import json
import os
import signal

import pytest
from tests.harness.fault import LiveLaunch
from tests.harness.train import tiny_config, write_yaml

from moe_dist.train.safety.exits import PREEMPTED

STEPS = 400  # more than the test reaches: each attempt ends by a signal


def stop_after(run: LiveLaunch, step_pattern: str) -> int:
    """SIGTERM to the job once `step_pattern` is logged -> the step its checkpoint holds."""
    try:
        run.wait_for(step_pattern, timeout=400)
        os.kill(run.proc.pid, signal.SIGTERM)
        assert run.proc.wait(timeout=300) == PREEMPTED, run.output[-4000:]
        run.eof.wait(30)
        return int(run.wait_for(r"stopped after step (\d+)", timeout=1).group(1))
    finally:
        run.cleanup()


def first_step(output: str) -> int:
    return next(int(line.split("/")[0].split()[1]) for line in output.splitlines()
                if line.startswith("step ") and "| loss " in line)


@pytest.mark.slow  # three launches, two stopped by a signal
def test_the_same_command_starts_then_resumes(tmp_path):
    ckpt, run_dir = tmp_path / "ckpt", tmp_path / "run"
    config = write_yaml(str(tmp_path / "auto.yaml"), tiny_config(train=dict(
        steps=STEPS, log_interval=1, checkpoint_dir=str(ckpt), run_dir=str(run_dir))))

    first = LiveLaunch(config, "--resume", "auto", job=True)
    stopped = stop_after(first, r"^step 2/")
    assert f"--resume auto: no committed checkpoint in train.checkpoint_dir {str(ckpt)!r}; starting a new run" \
        in first.output
    assert first_step(first.output) == 1

    second = LiveLaunch(config, "--resume", "auto", job=True)
    stop_after(second, rf"^step {stopped + 2}/")
    assert (f"--resume auto: resuming from 'step_{stopped:08d}' in train.checkpoint_dir {str(ckpt)!r}"
            in second.output)
    assert f"resumed from step_{stopped:08d}: step {stopped}" in second.output
    assert first_step(second.output) == stopped + 1

    assert {"launch.json", "launch.attempt2.json", "config.yaml", "config.attempt2.yaml"} <= set(os.listdir(run_dir))
    assert json.loads((run_dir / "launch.json").read_text())["resume"] is False
    assert json.loads((run_dir / "launch.attempt2.json").read_text())["resume"] is True
    log = (run_dir / "train.log").read_text()
    assert "==== attempt 1 " in log and "==== attempt 2 " in log and f"resumed from step_{stopped:08d}" in log
    assert "run ended: RunStopped" in log

    # A folder whose `latest` is gone but which holds committed tags is not a fresh start.
    os.remove(ckpt / "latest")
    third = LiveLaunch(config, "--resume", "auto", job=True)
    try:
        assert third.proc.wait(timeout=400) == 2, third.output[-4000:]
        third.eof.wait(30)
    finally:
        third.cleanup()
    assert "has no 'latest' file but holds complete checkpoints" in third.output
