"""A checkpoint folder that stops being writable during a run (a filesystem remounted read-only
after an error, permissions changed) is named as such, with its own exit status (30), never as a
full disk (28): freeing space would not help. Injected with tests/harness/enospc.c's errno mode
(root ignores permission bits, and remounting needs privileges a test does not have)."""

from __future__ import annotations

import errno
import os
import time

import pytest
from tests.harness.fault import enospc_shim, full_disk_env
from tests.harness.train import free_port, launch, tiny_config, write_yaml

from moe_dist.checkpoint.training import EXIT_NO_SPACE, EXIT_NOT_WRITABLE, disk
from moe_dist.checkpoint.training.layout import read_latest
from moe_dist.checkpoint.training.tags import list_tags, tag_problems, write_marker


def make_tag(root, step: int, complete: bool = True):
    tag_dir = root / f"step_{step:08d}"
    tag_dir.mkdir(parents=True)
    (tag_dir / "mp_rank_00_model_states.pt").write_bytes(b"x" * 100)
    if complete:
        write_marker(str(tag_dir), "run", step)
    return tag_dir


@pytest.mark.parametrize("code,words", [(errno.EROFS, "read-only file system"), (errno.EACCES, "permission denied"),
                                        (errno.EPERM, "permission denied")])
def test_a_read_only_or_forbidden_save_is_not_a_full_disk(tmp_path, code, words):
    make_tag(tmp_path, 2)
    partial = make_tag(tmp_path, 4, complete=False)
    cause = OSError(code, os.strerror(code), str(partial / "x.pt"))
    error = disk.disk_error(cause, str(tmp_path), "step_00000004", "step_00000002", needed=2 * 2**20)
    assert isinstance(error, disk.NotWritableError)
    assert str(error).startswith(f"cannot write checkpoint 'step_00000004' in '{tmp_path}': {words} (errno {code}, "
                                 f"not a full disk)")
    assert "the previous checkpoint 'step_00000002' is intact" in str(error)
    assert "no space" not in str(error) and "free" not in str(error).split("(")[0]
    assert partial.exists()  # left for the next start, which removes partial tags
    # torch's C++ writer keeps only the strerror text; rank 1, whose tag folder is gone, says the same
    cause = RuntimeError(f"[enforce fail at inline_container.cc:747] . open file failed with strerror: "
                         f"{os.strerror(code)}")
    error = disk.disk_error(cause, str(tmp_path), "step_00000006", "step_00000002", remove=False)
    assert isinstance(error, disk.NotWritableError) and words in str(error)


def test_the_probe_tells_read_only_from_full(tmp_path, monkeypatch):
    cause = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    make_tag(tmp_path, 4, complete=False)
    for code, kind in ((errno.EROFS, disk.NotWritableError), (errno.ENOSPC, disk.DiskSpaceError)):
        monkeypatch.setattr(disk, "_write_probe", lambda folder, size, code=code: code)
        assert isinstance(disk.disk_error(cause, str(tmp_path), "step_00000004", None, remove=False), kind)
    monkeypatch.setattr(disk, "_write_probe", lambda folder, size: None)
    assert disk.disk_error(cause, str(tmp_path), "step_00000004", None) is None  # not the disk
    assert EXIT_NOT_WRITABLE == 30 != EXIT_NO_SPACE


@pytest.mark.slow
def test_a_checkpoint_folder_gone_read_only_exits_30_and_keeps_the_last_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt"
    cfg = tiny_config(train=dict(steps=4, checkpoint_interval=2, checkpoint_dir=str(ckpt)))
    config = write_yaml(str(tmp_path / "run.yaml"), cfg)
    env = full_disk_env(enospc_shim(str(tmp_path)), "step_00000004")
    env["MOE_DIST_FAULT_ERRNO"] = str(errno.EROFS)
    t0 = time.monotonic()
    proc = launch(["--num_gpus", "2", "--master_port", str(free_port()), "launch/pretrain.py", "--config", config],
                  env=env)
    print(f"read-only save: exit after {time.monotonic() - t0:.1f}s")
    out = proc.stdout + proc.stderr
    assert proc.returncode == EXIT_NOT_WRITABLE, out[-4000:]
    assert f"cannot write checkpoint 'step_00000004' in '{ckpt}': read-only file system (errno 30" in proc.stderr
    assert "no space left" not in out and "Traceback" not in out, out[-4000:]
    assert read_latest(str(ckpt)) == "step_00000002"
    assert tag_problems(str(ckpt / "step_00000002")) == []
    # Writable again: --resume continues from the intact checkpoint (a partial tag is removed first).
    # (--break_lock: when the other rank exits first, the launcher's SIGTERM can end rank 0 before it
    # removes its lock.)
    proc = launch(["--num_gpus", "2", "--master_port", str(free_port()), "launch/pretrain.py", "--config", config,
                   "--resume", "--break_lock"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert read_latest(str(ckpt)) == "step_00000004"
    assert [s.tag for s in list_tags(str(ckpt))] == ["step_00000002", "step_00000004"]
