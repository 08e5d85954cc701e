"""What `--resume` and a fresh start do with what a checkpoint folder already holds, through the
real `deepspeed` launcher: a learning rate (or schedule) changed on `--resume` is the one used for
every later step, not the checkpoint's."""

from __future__ import annotations

import re
import time

import pytest
from tests.harness.train import assert_launch_ok, free_port, launch, tiny_config, write_yaml

from moe_dist.train.config import parse_run_config
from moe_dist.train.schedule import lr_at


def launch_run(cfg: dict, tmp, *extra: str):
    path = write_yaml(str(tmp / f"run_{free_port()}.yaml"), cfg)
    return launch(["--num_gpus", "2", "--master_port", str(free_port()), "launch/pretrain.py", "--config", path,
                   *extra], timeout=600)


def logged_lrs(stdout: str) -> dict[int, float]:
    """step -> the `lr` of the trainer's console lines `step i/N | loss x | lr y | ...`."""
    return {int(m.group(1)): float(m.group(2)) for m in re.finditer(r"^step (\d+)/\d+ \| .*?\| lr (\S+) \|",
                                                                     stdout, re.MULTILINE)}


@pytest.mark.slow
def test_a_learning_rate_changed_on_resume_holds_for_every_later_step(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    first = tiny_config(train=dict(steps=4, lr=3e-3, warmup_steps=2, checkpoint_dir=ckpt))
    assert_launch_ok(launch_run(first, tmp_path))
    second = tiny_config(train=dict(steps=10, lr=1e-3, min_lr=1e-4, warmup_steps=2, checkpoint_dir=ckpt))
    t0 = time.monotonic()
    proc = launch_run(second, tmp_path, "--resume")
    print(f"resumed launch with the new LR took {time.monotonic() - t0:.1f}s")
    assert_launch_ok(proc)
    train = parse_run_config(second).train
    lrs = logged_lrs(proc.stdout)
    assert sorted(lrs) == list(range(5, 11)), proc.stdout[-3000:]
    for step, lr in lrs.items():  # the log line's lr is that of the step (0-based step - 1)
        assert lr == pytest.approx(lr_at(step - 1, train), rel=1e-3), f"step {step}: lr {lr}, schedule {lrs}"
    assert "resume: train.lr: 0.003 -> 0.001 (the checkpoint's value -> this config's, in force from step 5)" \
        in proc.stdout
    assert "resume: train.steps: 4 -> 10" in proc.stdout and "resume: train.min_lr: 0.0 -> 0.0001" in proc.stdout

