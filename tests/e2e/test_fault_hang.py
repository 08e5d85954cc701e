"""No silent hang: every process group (DeepSpeed's expert groups included) carries
`train.collective_timeout`, and the watchdog ends a stalled job with stacks and the slowest rank.

The SIGSTOP cases run through the real `deepspeed` launcher (2 CPU ranks, gloo): one rank is
stopped mid-training; before these fixes the other waited in `gloo::alltoallv` for 30 minutes."""

from __future__ import annotations

import datetime
import os
import re
import signal
import time

import pytest
import torch
from tests.harness.fault import LiveLaunch
from tests.harness.train import run_deepspeed_ranks, tiny_config, write_yaml

from moe_dist.train.safety.watchdog import slowest_rank

TIMEOUT_S = 7.0


def _group_timeouts_worker(rank: int, world: int, tmp: str) -> None:
    from moe_dist.parallel import runtime
    from moe_dist.train.config import parse_run_config
    from moe_dist.train.preflight import preflight
    from moe_dist.train.trainer import Trainer

    cfg = parse_run_config(tiny_config(train=dict(collective_timeout=TIMEOUT_S)))
    Trainer(cfg, preflight(cfg, world, cfg.train.deepspeed_config))  # groups, model, engine
    from deepspeed.utils import groups as ds_groups

    timeouts = runtime.group_timeouts()
    expected = datetime.timedelta(seconds=TIMEOUT_S)
    assert len(timeouts) >= 4, timeouts  # WORLD, EP, EDP, DeepSpeed's data-parallel clone
    assert all(t == expected for t in timeouts.values()), timeouts
    names = torch.distributed.distributed_c10d._world.pg_names
    for group in (ds_groups._get_expert_parallel_group("ep_size_2"),
                  ds_groups._get_expert_data_parallel_group("ep_size_2")):
        assert timeouts[names[group]] == expected


def test_every_process_group_gets_the_collective_timeout(tmp_path):
    run_deepspeed_ranks(_group_timeouts_worker, 2, str(tmp_path))


def test_slowest_rank_from_two_heartbeat_readings():
    world = 3
    assert "rank(s) 1" in slowest_rank({0: (5, 10), 1: (5, 7), 2: (5, 10)},
                                       {0: (5, 13), 1: (5, 7), 2: (5, 13)}, world)
    assert "rank(s) 2" in slowest_rank({0: (5, 1), 1: (5, 1)}, {0: (5, 2), 1: (5, 2)}, world)
    assert "rank 0" in slowest_rank(None, None, world)
    assert "rank(s) 2 (still at step 4" in slowest_rank({0: (5, 1), 1: (5, 1), 2: (4, 1)},
                                                         {0: (5, 2), 1: (5, 2), 2: (4, 2)}, world)
    assert "none behind" in slowest_rank({0: (5, 1), 1: (5, 1), 2: (5, 1)},
                                         {0: (5, 2), 1: (5, 2), 2: (5, 2)}, world)


def _stop_rank_one(tmp_path, **train) -> tuple[LiveLaunch, float]:
    cfg = tiny_config(train=dict(steps=100_000, log_interval=1, warmup_steps=0, **train))
    run = LiveLaunch(write_yaml(str(tmp_path / "run.yaml"), cfg))
    run.wait_for(r"^step 3/", timeout=400)
    os.kill(run.rank_pid(1), signal.SIGSTOP)
    return run, time.monotonic()


# What launch.py adds after the first rank exits: it SIGTERMs the others and SIGKILLs them after
# 30 s (a stopped rank never handles the SIGTERM); then a loaded 2-core machine.
LAUNCHER_GRACE_S, MARGIN_S = 30, 90


@pytest.mark.slow
def test_sigstop_of_one_rank_ends_the_job_with_stacks_and_the_slowest_rank(tmp_path):
    watchdog_s = 15
    run, t_stop = _stop_rank_one(tmp_path, watchdog_timeout=watchdog_s)
    try:
        returncode = run.proc.wait(timeout=watchdog_s + LAUNCHER_GRACE_S + MARGIN_S)
        elapsed = time.monotonic() - t_stop
        out = run.output
        assert returncode == 4, out[-5000:]
        assert "watchdog: rank 0: no step completed" in out, out[-5000:]
        assert re.search(r"last completed: step \d+; slowest: rank\(s\) 1 \(heartbeat silent", out), out[-5000:]
        assert "most recent call first" in out  # faulthandler's stacks of rank 0's threads
        assert "moe_dist-heartbeat" in out or "Thread 0x" in out
        print(next(line for line in out.splitlines() if line.startswith("watchdog: rank 0")))
        print(f"SIGSTOP -> job exit {returncode} after {elapsed:.1f}s (watchdog {watchdog_s}s)")
    finally:
        run.cleanup()


@pytest.mark.slow
def test_sigstop_of_one_rank_fails_the_collective_on_the_expert_groups(tmp_path):
    """Watchdog off: the collective timeout alone ends the job, whichever group the live rank
    waits in (the expert all-to-all most of the time)."""
    timeout_s = 10
    run, t_stop = _stop_rank_one(tmp_path, watchdog_timeout=0, collective_timeout=timeout_s)
    try:
        returncode = run.proc.wait(timeout=timeout_s + LAUNCHER_GRACE_S + MARGIN_S)
        elapsed = time.monotonic() - t_stop
        out = run.output
        assert returncode not in (0, None), out[-5000:]
        assert "Timed out" in out or "timed out" in out, out[-5000:]
        print(f"SIGSTOP -> collective timeout, job exit {returncode} after {elapsed:.1f}s "
              f"(collective_timeout {timeout_s}s)")
    finally:
        run.cleanup()
