"""The run folder (moe_dist/train/run_record.py): the resolved config, the reconciled DeepSpeed
JSON and the launch record written atomically at start; rank 0's output copied into train.log;
a second attempt (--resume) writes suffixed files beside the first's and appends to the log."""

from __future__ import annotations

import json
import logging
import os
import sys

import pytest
import yaml

from moe_dist.common.config import ConfigError
from moe_dist.train.run_record import write_run_record


def test_two_attempts_keep_both_records_and_one_log(tmp_path, monkeypatch):
    run_dir = str(tmp_path / "run")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(sys, "argv", ["launch/pretrain.py", "--local_rank=0", "--config", "c.yaml"])
    stdout = sys.stdout
    log = write_run_record(run_dir, {"train": {"steps": 10}}, {"train_batch_size": 8}, resume=False, run_id="abc")
    try:
        print("step 1/10 | loss 5.0")
        print("a warning", file=sys.stderr)
        logging.getLogger("DeepSpeed").warning("a DeepSpeed line")
    finally:
        log.close()
    assert sys.stdout is stdout  # restored
    print("not in the log")
    log = write_run_record(run_dir, {"train": {"steps": 20}}, {"train_batch_size": 8}, resume=True, run_id="abc")
    try:
        print("resumed from step_00000010")
        log.write("run ended: RunStopped: stopped after step 12\n")
    finally:
        log.close()

    files = sorted(os.listdir(run_dir))
    assert files == ["config.attempt2.yaml", "config.yaml", "deepspeed_config.attempt2.json", "deepspeed_config.json",
                     "launch.attempt2.json", "launch.json", "train.log"]  # no temporary names left
    with open(os.path.join(run_dir, "config.yaml")) as f:
        assert yaml.safe_load(f) == {"train": {"steps": 10}}  # the first attempt's, not clobbered
    with open(os.path.join(run_dir, "config.attempt2.yaml")) as f:
        assert yaml.safe_load(f) == {"train": {"steps": 20}}
    with open(os.path.join(run_dir, "deepspeed_config.json")) as f:
        assert json.load(f) == {"train_batch_size": 8}
    with open(os.path.join(run_dir, "launch.attempt2.json")) as f:
        launch = json.load(f)
    assert launch["attempt"] == 2 and launch["resume"] is True and launch["run_id"] == "abc"
    assert launch["argv"] == ["launch/pretrain.py", "--local_rank=0", "--config", "c.yaml"]
    assert launch["env"]["WORLD_SIZE"] == "2"
    with open(os.path.join(run_dir, "train.log")) as f:
        text = f.read()
    lines = text.splitlines()
    assert lines[0].startswith("==== attempt 1 ") and "launch/pretrain.py --local_rank=0 --config c.yaml" in lines[0]
    assert lines[1:3] == ["step 1/10 | loss 5.0", "a warning"]
    assert lines[3].endswith("[WARNING] a DeepSpeed line")
    assert lines[4].startswith("==== attempt 2 ") and "(--resume)" in lines[4]
    assert lines[5:] == ["resumed from step_00000010", "run ended: RunStopped: stopped after step 12"]
    assert "not in the log" not in text


def test_a_run_dir_that_cannot_be_written_is_a_config_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=r"train.run_dir '.*file/run': cannot write the run's record there"):
        write_run_record(str(blocker / "run"), {}, {}, resume=False, run_id=None)


def test_a_failing_log_write_warns_once_and_the_console_goes_on(tmp_path, capsys):
    log = write_run_record(str(tmp_path), {}, {}, resume=False, run_id=None)
    try:
        class Full:
            def write(self, text):
                raise OSError(28, "No space left on device")

            def close(self):
                pass

        log.file = Full()
        print("one")
        print("two")
    finally:
        log.close()
    out, err = capsys.readouterr()
    assert out == "one\ntwo\n"
    assert err.count("warning: writing") == 1 and "No space left on device" in err
