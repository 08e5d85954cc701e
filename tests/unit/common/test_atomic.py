"""The one atomic-write helper every package uses: outputs appear complete or not at all."""

import os

import pytest

from moe_dist.common import atomic
from moe_dist.common.config import ConfigError


def test_staged_files_publish_in_order_and_leave_nothing_else(tmp_path):
    finals = [str(tmp_path / "a.bin"), str(tmp_path / "a.idx")]
    with atomic.staged_files(finals) as staged:
        assert set(staged) == set(finals)
        for final, tmp in staged.items():
            assert os.path.dirname(tmp) == str(tmp_path) and not os.path.exists(final)
            with open(tmp, "w") as f:
                f.write(os.path.basename(final))
    assert sorted(os.listdir(tmp_path)) == ["a.bin", "a.idx"]
    assert (tmp_path / "a.idx").read_text() == "a.idx"


def test_a_failure_keeps_the_old_files_and_removes_the_temporaries(tmp_path):
    final = tmp_path / "latest"
    final.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic.staged_file(str(final)) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise KeyboardInterrupt
    assert final.read_text() == "old" and os.listdir(tmp_path) == ["latest"]


def test_a_temporary_that_was_never_written_is_an_error(tmp_path):
    with pytest.raises(RuntimeError, match="not written"):
        with atomic.staged_file(str(tmp_path / "x")):
            pass
    assert os.listdir(tmp_path) == []


def test_outputs_are_checked_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        with atomic.staged_file(str(tmp_path / "missing" / "x")):
            raise AssertionError("the body must not run")
    (tmp_path / "d").mkdir()
    with pytest.raises(ConfigError, match="is a directory"):
        atomic.check_output_file(str(tmp_path / "d"))


def test_write_text_atomic_replaces(tmp_path):
    path = str(tmp_path / "latest")
    atomic.write_text_atomic(path, "step_1")
    atomic.write_text_atomic(path, "step_2")
    assert open(path).read() == "step_2" and os.listdir(tmp_path) == ["latest"]


def test_staged_directory_replaces_only_after_success(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(ValueError):
        with atomic.staged_directory(str(out)) as tmp:
            open(os.path.join(tmp, "new.txt"), "w").close()
            raise ValueError
    assert os.listdir(out) == ["old.txt"] and os.listdir(tmp_path) == ["out"]
    with atomic.staged_directory(str(out)) as tmp:
        open(os.path.join(tmp, "new.txt"), "w").close()
    assert os.listdir(out) == ["new.txt"] and os.listdir(tmp_path) == ["out"]
