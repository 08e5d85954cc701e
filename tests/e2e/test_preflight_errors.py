"""Inputs that used to end in a traceback (or were silently misread) give one line and exit 2
before any work: a `latest` that is not UTF-8, a checkpoint folder that is a file or cannot be
written, preprocessing input that is empty or random bytes, a model too large for memory (the
estimate of moe_dist/train/memory_plan.py in preflight) and a negative capacity factor."""

from __future__ import annotations

import errno
import os
import socket

import pytest
from tests.harness import load_tool
from tests.harness.fault import enospc_shim, full_disk_env
from tests.harness.train import launch, tiny_config, write_yaml

from moe_dist.checkpoint.files import CheckpointError
from moe_dist.checkpoint.training import check_writable_dir, disk
from moe_dist.checkpoint.training.layout import read_latest
from moe_dist.common.config import ConfigError
from moe_dist.train.config import parse_run_config
from moe_dist.train.ds_config import load_json, reconcile_deepspeed_config
from moe_dist.train.preflight import memory

# Every tensor of this model is larger than any machine's address space (the embedding alone is
# 2^45 fp32 values): the estimate refuses it; without the estimate the first allocation fails.
HUGE = dict(vocab_size=2**24, d_model=2**21)


def launch_held_port(cfg: dict, tmp_path, *extra: str, env: dict | None = None):
    """The launcher with its master port held: exit 2 with a one-line error shows the run stopped
    before any process group existed (a rank that got that far could not bind the port)."""
    path = write_yaml(str(tmp_path / "run.yaml"), cfg)
    with socket.socket() as held:
        held.bind(("", 0))
        held.listen()
        port = held.getsockname()[1]
        return launch(["--num_gpus", "2", "--master_port", str(port), "launch/pretrain.py", "--config", path, *extra],
                      timeout=300, env=env)


def assert_one_line_exit_2(proc, *parts: str) -> None:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, f"exit {proc.returncode}\n{out[-4000:]}"
    for part in parts:
        assert part in out, out[-4000:]
    assert "Traceback" not in out, out[-4000:]


# ---- a `latest` that is not UTF-8 ----------------------------------------------------------

def test_a_latest_that_is_not_utf8_is_named(tmp_path):
    (tmp_path / "latest").write_bytes(b"\xff\xfe\x00step")
    with pytest.raises(CheckpointError, match=r"latest' is not a tag name: 7 bytes that are not UTF-8 text"):
        read_latest(str(tmp_path))


# ---- a checkpoint folder that is a file or cannot be written --------------------------------

def test_a_checkpoint_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "ckpt").write_text("x")
    with pytest.raises(ConfigError, match=r"train.checkpoint_dir '.*ckpt' is a file, not a folder"):
        check_writable_dir(str(tmp_path / "ckpt"))
    with pytest.raises(ConfigError, match=r"cannot be created: '.*ckpt' is a file"):
        check_writable_dir(str(tmp_path / "ckpt" / "sub"))
    check_writable_dir(str(tmp_path / "new" / "sub"))  # created later, under a writable ancestor
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("code,words", [(errno.EROFS, "read-only file system"), (errno.EACCES, "permission denied")])
def test_an_unwritable_checkpoint_dir_is_refused_naming_why(tmp_path, monkeypatch, code, words):
    def refuse(path, *args):
        raise OSError(code, os.strerror(code), path)

    monkeypatch.setattr(disk.os, "open", refuse)
    with pytest.raises(ConfigError, match=rf"train.checkpoint_dir '.*' cannot be written: {words} \(errno {code}\)"):
        check_writable_dir(str(tmp_path))


# ---- preprocessing: empty or random input ---------------------------------------------------

@pytest.mark.parametrize("name,content,message", [
    ("empty.jsonl", b"", "is empty"),
    ("blank.jsonl", b"\n\n  \n", "hold no json rows (blank lines only)"),
    ("random.jsonl", bytes(range(128, 256)) * 8, "not UTF-8 text"),
    ("random.txt", bytes(range(128, 256)) * 8, "not UTF-8 text (invalid start byte); expected a UTF-8 text file"),
    ("random.parquet", bytes(range(256)) * 4, "not a Parquet file (it must start and end with the bytes 'PAR1'"),
    ("random.jsonl.gz", bytes(range(256)) * 4, "cannot be read as a '.gz' file (BadGzipFile"),
])
def test_preprocessing_refuses_empty_or_random_input_in_one_line(tmp_path, capsys, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    rc = load_tool("preprocess_data").main(["--input", str(path), "--output-prefix", str(tmp_path / "out"),
                                            "--cache-dir", str(tmp_path / "hf_cache")])
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    assert not (tmp_path / "out.bin").exists()


# ---- capacity factor ------------------------------------------------------------------------

def test_a_negative_capacity_factor_is_refused_and_zero_means_no_limit():
    for key in ("capacity_factor", "eval_capacity_factor"):
        with pytest.raises(ConfigError, match=rf"moe.{key} must be a number >= 0, got -1; 0 means no capacity "
                                              rf"limit \(for a run that drops no token set moe.dropless: true\)"):
            parse_run_config(tiny_config(moe={key: -1}))
    cfg = parse_run_config(tiny_config(moe=dict(capacity_factor=0, eval_capacity_factor=0)))
    assert cfg.model.moe.capacity_factor == 0 and cfg.model.moe.eval_capacity_factor == 0


# ---- memory ---------------------------------------------------------------------------------

def plan_inputs(**model):
    cfg = parse_run_config(tiny_config(model=model))
    ds = reconcile_deepspeed_config(load_json(cfg.train.deepspeed_config), cfg.train, 2, cfg.train.deepspeed_config)
    return cfg, ds


def test_the_memory_estimate_refuses_a_run_that_cannot_fit(monkeypatch):
    cfg, ds = plan_inputs()
    memory.check_memory(cfg, ds, 2, cuda=False, available=2**28)  # the tiny run fits 256 MiB (buckets trimmed)
    monkeypatch.setenv("LOCAL_SIZE", "2")
    with pytest.raises(ConfigError, match=r"the run does not fit in memory: the estimate is [\d.]+ GiB per rank "
                                          r"\(weights .*\) x 2 ranks on this host = [\d.]+ GiB, more than 0.00 GiB of "
                                          r"host RAM available now .*tools/estimate_memory.py CONFIG --world-size 2 "
                                          r"--device cpu"):
        memory.check_memory(cfg, ds, 2, cuda=False, available=1024)
    with pytest.raises(ConfigError, match=r"more than the GPU's 80.00 GiB.*--device cuda"):
        memory.check_memory(*plan_inputs(**HUGE), 2, cuda=True, available=80 * 2**30)


def test_mem_available_is_read_from_meminfo(tmp_path):
    info = tmp_path / "meminfo"
    info.write_text("MemTotal:       24683512 kB\nMemFree:        1000 kB\nMemAvailable:   2048 kB\n")
    assert memory.host_available_bytes(str(info)) == 2048 * 1024
    assert memory.host_available_bytes(str(tmp_path / "none")) is None


# ---- through the launcher -------------------------------------------------------------------

def test_a_model_too_large_for_memory_exits_2_through_the_launcher(tmp_path):
    proc = launch_held_port(tiny_config(model=HUGE), tmp_path)
    assert_one_line_exit_2(proc, "config error: the run does not fit in memory: the estimate is",
                           "tools/estimate_memory.py")
    assert "can't allocate memory" not in proc.stdout + proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["latest_not_utf8", "dir_is_a_file", "read_only_dir", "negative_capacity"])
def test_start_up_faults_exit_2_through_the_launcher(tmp_path, fault):
    ckpt = tmp_path / "ckpt"
    cfg = tiny_config(train=dict(steps=2, checkpoint_dir=str(ckpt)))
    extra, env = [], None
    if fault == "latest_not_utf8":
        ckpt.mkdir()
        (ckpt / "latest").write_bytes(b"\xffstep_00000002")
        extra, expected = ["--resume"], f"checkpoint error: '{ckpt}/latest' is not a tag name"
    elif fault == "dir_is_a_file":
        ckpt.write_text("not a folder")
        expected = f"config error: train.checkpoint_dir '{ckpt}' is a file, not a folder"
    elif fault == "read_only_dir":
        ckpt.mkdir()  # root ignores permission bits: the shim makes the folder read-only
        env = full_disk_env(enospc_shim(str(tmp_path)), str(ckpt))
        env["MOE_DIST_FAULT_ERRNO"] = str(errno.EROFS)
        expected = f"config error: train.checkpoint_dir '{ckpt}' cannot be written: read-only file system (errno 30)"
    else:
        cfg["moe"]["capacity_factor"] = -1
        expected = "config error: moe.capacity_factor must be a number >= 0, got -1"
    assert_one_line_exit_2(launch_held_port(cfg, tmp_path, *extra, env=env), expected)
