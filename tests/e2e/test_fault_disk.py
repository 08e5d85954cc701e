"""Disk faults: the free-space check before a save, a full disk during one (ENOSPC injected with
the LD_PRELOAD shim of tests/harness/enospc.c, since a tmpfs needs root), retention and
partial-tag cleanup, fsync of every staged file, and a TensorBoard that cannot write."""

from __future__ import annotations

import errno
import os
import shutil
import time
from collections import namedtuple

import pytest
import torch
from tests.harness.fault import enospc_shim, full_disk_env
from tests.harness.train import free_port, launch, tiny_config, write_yaml

from moe_dist.checkpoint.training import disk, retention
from moe_dist.checkpoint.training.layout import read_latest
from moe_dist.checkpoint.training.tags import MARKER, list_tags, tag_problems, write_marker
from moe_dist.common import atomic
from moe_dist.train.tb_logger import TensorBoardLogger

MB = 1024 * 1024


def make_tag(ckpt, step: int, complete: bool = True, size: int = 1000):
    tag_dir = ckpt / f"step_{step:08d}"
    tag_dir.mkdir(parents=True)
    torch.save({"run_id": "run", "pad": torch.zeros(size, dtype=torch.uint8)}, tag_dir / "mp_rank_00_model_states.pt")
    if complete:
        write_marker(str(tag_dir), "run", step)
    return tag_dir


def test_the_free_space_check_sizes_the_next_save_by_the_last(tmp_path, monkeypatch):
    last = make_tag(tmp_path, 2, size=3 * MB)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(100 * MB, 99 * MB, 1 * MB))
    needed, free = disk.space_shortfall(str(tmp_path), str(last))
    assert needed > 3 * MB and free == MB
    message = disk.shortfall_message(str(tmp_path), "step_00000004", needed, free, "step_00000002")
    assert message.startswith(f"no space left on device for checkpoint 'step_00000004' in '{tmp_path}': it needs "
                              f"~3.0 MB (the size of the last one), 1.0 MB free; the previous checkpoint "
                              f"'step_00000002' is intact")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(100 * MB, 10 * MB, 90 * MB))
    assert disk.space_shortfall(str(tmp_path), str(last)) is None
    assert disk.space_shortfall(str(tmp_path), None) is None  # the first save: nothing to size it by


def test_an_enospc_during_the_save_is_one_plain_error_and_the_partial_tag_goes(tmp_path):
    make_tag(tmp_path, 2)
    partial = make_tag(tmp_path, 4, complete=False)
    cause = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    assert disk.no_space_error(cause, str(tmp_path), "step_00000004", "step_00000002") is None  # not the disk
    cause.__context__ = OSError(errno.ENOSPC, "No space left on device")
    error = disk.no_space_error(cause, str(tmp_path), "step_00000004", "step_00000002", needed=2 * MB)
    assert str(error).startswith(f"no space left on device while saving checkpoint 'step_00000004' in "
                                 f"'{tmp_path}': it needs ~2.0 MB (the size of the last one), 0.0 MB had been "
                                 f"written")
    assert "the partial tag was removed and the previous checkpoint 'step_00000002' is intact" in str(error)
    assert not partial.exists() and (tmp_path / "step_00000002" / MARKER).exists()


def test_partial_tags_and_half_deleted_ones_are_removed_at_start(tmp_path):
    make_tag(tmp_path, 1, complete=False)  # older than latest, no marker: legacy, kept
    make_tag(tmp_path, 2)
    (tmp_path / "latest").write_text("step_00000002")
    make_tag(tmp_path, 3, complete=False)
    (tmp_path / ".step_00000000.deleting-1-abc").mkdir()
    assert [(s.tag, s.status) for s in list_tags(str(tmp_path))] == [
        ("step_00000001", "legacy"), ("step_00000002", "complete"), ("step_00000003", "partial")]
    assert retention.remove_partial_tags(str(tmp_path)) == ["step_00000003"]
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_00000001", "step_00000002"]


def test_keep_last_deletes_the_oldest_complete_tags_never_latest(tmp_path):
    for step in (1, 2, 3, 4):
        make_tag(tmp_path, step)
    (tmp_path / "latest").write_text("step_00000002")  # e.g. a resumed run before it saves again
    assert retention.apply_keep_last(str(tmp_path), None, run_id="run") == []
    assert retention.apply_keep_last(str(tmp_path), 1, run_id="run") == ["step_00000001", "step_00000003"]
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_00000002", "step_00000004"]


def test_staged_directory_fsyncs_every_file_before_the_rename(tmp_path, monkeypatch):
    synced = []
    real = atomic.fsync_file
    monkeypatch.setattr(atomic, "fsync_file", lambda path: (synced.append(os.path.basename(path)), real(path)))
    with atomic.staged_directory(str(tmp_path / "out")) as tmp:
        os.mkdir(os.path.join(tmp, "sub"))
        for name in ("a.bin", "sub/b.bin"):
            with open(os.path.join(tmp, name), "w") as f:
                f.write(name)
    assert {"a.bin", "b.bin", "sub"} <= set(synced)


class BrokenWriter:
    calls = 0

    def add_scalar(self, *args):
        BrokenWriter.calls += 1
        raise OSError(errno.ENOSPC, "No space left on device")

    def flush(self):
        raise OSError(errno.ENOSPC, "No space left on device")

    def close(self):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_tensorboard_write_failure_warns_once_and_training_goes_on(capsys):
    tb = TensorBoardLogger(None, enabled=False)
    tb.writer, tb.log_dir = BrokenWriter(), "/full/tb"
    for step in range(3):
        tb.scalars(step, {"train/loss": 1.0})
        tb.flush()
    tb.close()
    err = capsys.readouterr().err
    assert err.count("warning: TensorBoard writing to '/full/tb' failed") == 1
    assert "No space left on device" in err and BrokenWriter.calls == 1


# ---- a full disk during a save, through the real launcher ----------------------------------

@pytest.mark.slow
def test_a_full_disk_during_a_save_stops_plainly_and_keeps_the_last_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt"
    cfg = tiny_config(train=dict(steps=4, checkpoint_interval=2, checkpoint_dir=str(ckpt),
                                 tensorboard_dir=str(tmp_path / "tbfull")))
    config = write_yaml(str(tmp_path / "run.yaml"), cfg)
    shim = enospc_shim(str(tmp_path))
    t0 = time.monotonic()
    proc = launch(["--num_gpus", "2", "--master_port", str(free_port()), "launch/pretrain.py", "--config", config],
                  env=full_disk_env(shim, "step_00000004", "tbfull"))
    print(f"full-disk run: exit after {time.monotonic() - t0:.1f}s")
    assert proc.returncode == disk.EXIT_NO_SPACE, proc.stderr[-4000:]
    assert "no space left on device while saving checkpoint 'step_00000004'" in proc.stderr
    assert "the partial tag was removed and the previous checkpoint 'step_00000002' is intact" in proc.stderr
    assert "is removed by rank 0" in proc.stderr  # rank 1 saw the full disk too, and said so plainly
    assert "[rank0]: RuntimeError" not in proc.stderr and "[rank1]: RuntimeError" not in proc.stderr
    assert proc.stderr.count("warning: TensorBoard writing to") == 1  # rank 0 only, once; training went on
    assert "step 4/4" in proc.stdout
    assert read_latest(str(ckpt)) == "step_00000002"
    assert [s.tag for s in list_tags(str(ckpt))] == ["step_00000002"]
    assert tag_problems(str(ckpt / "step_00000002")) == []
    # Space again: --resume continues from the intact checkpoint. (--break_lock: when the other rank
    # exits first, the launcher's SIGTERM can end rank 0 before it removes its lock.)
    proc = launch(["--num_gpus", "2", "--master_port", str(free_port()), "launch/pretrain.py", "--config", config,
                   "--resume", "--break_lock"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert read_latest(str(ckpt)) == "step_00000004"


def test_inspect_flags_a_partial_tag_and_never_calls_it_fine(tmp_path, capsys):
    from moe_dist.checkpoint import cli

    make_tag(tmp_path, 2)
    (tmp_path / "latest").write_text("step_00000002")
    make_tag(tmp_path, 4, complete=False)
    assert cli.main(["inspect", str(tmp_path), "--tag", "step_00000004"]) == cli.EXIT_INCOMPLETE
    err = capsys.readouterr().err
    assert "tag 'step_00000004' is incomplete: no completion marker and newer than 'latest' ('step_00000002')" in err
    report = cli.tag_report(str(tmp_path / "step_00000002"), None)
    assert report["status"] == "complete" and report["problems"] == []
    assert report["tags"] == {"step_00000002": "complete", "step_00000004": "partial"}
