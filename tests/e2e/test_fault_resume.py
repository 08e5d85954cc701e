"""What `--resume` and a fresh start do with what a checkpoint folder already holds, through the
real `deepspeed` launcher: a learning rate (or schedule) changed on `--resume` is the one used for
every later step, not the checkpoint's; a folder holding another run's complete tags without
`latest` is refused, and retention deletes only the current run's tags."""

from __future__ import annotations

import os
import re
import time
import shutil

import pytest
from tests.e2e.test_fault_disk import make_tag
from tests.harness.train import assert_launch_ok, free_port, launch, tiny_config, write_yaml

from moe_dist.checkpoint.training import check_checkpoint_dir, retention
from moe_dist.checkpoint.training.layout import read_latest
from moe_dist.checkpoint.training.tags import MARKER, list_tags, write_marker
from moe_dist.common.config import ConfigError
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


# ---- a folder that holds another run's tags -------------------------------------------------

def test_complete_tags_without_latest_are_refused_naming_them(tmp_path):
    make_tag(tmp_path, 50)
    make_tag(tmp_path, 100)
    with pytest.raises(ConfigError, match=re.escape(
            f"train.checkpoint_dir '{tmp_path}' has no 'latest' file but holds complete checkpoints step_00000050, "
            f"step_00000100 (run id run); choose an empty folder")):
        check_checkpoint_dir(str(tmp_path), resume=False)
    with pytest.raises(ConfigError, match=re.escape("it holds complete tags step_00000050, step_00000100 (run id "
                                                    f"run): write the name of the one to continue into "
                                                    f"'{tmp_path / 'latest'}'")):
        check_checkpoint_dir(str(tmp_path), resume=True)
    check_checkpoint_dir(str(tmp_path / "empty"), resume=False)  # no folder yet
    partial = tmp_path / "partial"
    make_tag(partial, 10, complete=False)  # a crashed first save: removed at the start, not refused
    check_checkpoint_dir(str(partial), resume=False)


def test_keep_last_deletes_and_counts_only_the_runs_own_tags(tmp_path):
    for step in (1, 2, 3):
        make_tag(tmp_path, step)  # run id "run"
    other = make_tag(tmp_path, 4, complete=False)
    write_marker(str(other), "other", 4)
    (tmp_path / "latest").write_text("step_00000003")
    assert retention.apply_keep_last(str(tmp_path), 1, run_id="mine") == []
    assert retention.apply_keep_last(str(tmp_path), 1, run_id="other") == []
    assert retention.apply_keep_last(str(tmp_path), 1, run_id="run") == ["step_00000001", "step_00000002"]
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_00000003", "step_00000004"]


@pytest.mark.slow
def test_another_runs_tags_are_neither_overwritten_nor_deleted(tmp_path):
    ours = tmp_path / "ours"
    cfg = tiny_config(train=dict(steps=4, checkpoint_interval=2, keep_last=2, checkpoint_dir=str(ours)))
    assert_launch_ok(launch_run(cfg, tmp_path))
    assert [s.tag for s in list_tags(str(ours))] == ["step_00000002", "step_00000004"]

    # A fresh run (keep_last 1) in a copy of the folder without `latest`: refused, nothing touched.
    theirs = tmp_path / "theirs"
    shutil.copytree(ours, theirs)
    os.remove(theirs / "latest")
    before = {p: p.stat().st_mtime_ns for p in theirs.rglob("*")}
    t0 = time.monotonic()
    proc = launch_run(tiny_config(train=dict(steps=4, checkpoint_interval=2, keep_last=1,
                                             checkpoint_dir=str(theirs))), tmp_path)
    print(f"the refused launch exited after {time.monotonic() - t0:.1f}s")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert (f"train.checkpoint_dir {str(theirs)!r} has no 'latest' file but holds complete checkpoints "
            f"step_00000002, step_00000004 (run id ") in proc.stderr
    assert {p: p.stat().st_mtime_ns for p in theirs.rglob("*")} == before

    # Another run's complete tag beside ours: resuming ours (keep_last 2) deletes only ours.
    foreign = make_tag(ours, 3, complete=False)
    write_marker(str(foreign), "foreign", 3)
    proc = launch_run(tiny_config(train=dict(steps=8, checkpoint_interval=2, keep_last=2,
                                             checkpoint_dir=str(ours))), tmp_path, "--resume")
    assert_launch_ok(proc)
    assert [s.tag for s in list_tags(str(ours))] == ["step_00000003", "step_00000006", "step_00000008"]
    assert read_latest(str(ours)) == "step_00000008" and (foreign / MARKER).exists()
