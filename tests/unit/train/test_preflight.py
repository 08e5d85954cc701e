"""Bad input fails before any process group, model or dataset index exists, with an error that
names the values: MoE/EP sizes, world size, data files, tokenizer vocabulary, batch sizes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from tests.harness import load_script
from tests.harness.train import REPO, tiny_config, write_yaml

from moe_dist.common.config import ConfigError
from moe_dist.train.config import parse_run_config
from moe_dist.train.preflight import preflight


def ds_json(tmp_path, **entries) -> str:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 1}, **entries}))
    return str(path)


def check(cfg: dict, world: int = 2, resume: bool = False):
    return preflight(parse_run_config(cfg), world, cfg["train"]["deepspeed_config"], resume=resume)


def raises(message: str):
    return pytest.raises(ConfigError, match=re.escape(message))


def test_a_good_config_passes_and_fills_batch_sizes(tmp_path):
    result = check(tiny_config(train=dict(deepspeed_config=ds_json(tmp_path))))
    assert result.ds_config["train_batch_size"] == 2 * 2 * 2
    assert result.ds_config["train_micro_batch_size_per_gpu"] == 2
    assert result.ds_config["gradient_accumulation_steps"] == 2
    assert result.domain_names == ["domain0", "domain1", "domain2", "domain3"]


def test_num_experts_not_divisible_by_ep_size():
    with raises("moe.num_experts (6) must be divisible by moe.ep_size (4)"):
        parse_run_config(tiny_config(moe=dict(num_experts=6, ep_size=4)))


def test_world_size_not_divisible_by_ep_size(tmp_path):
    with raises("world size (3) must be divisible by ep_size (2)"):
        check(tiny_config(train=dict(deepspeed_config=ds_json(tmp_path))), world=3)


def megatron_data(prefix: str) -> dict:
    return dict(kind="megatron", tokenizer={"kind": "byte"}, megatron={"prefixes": [prefix]}, synthetic=None)


def test_missing_data_files(tmp_path):
    prefix = str(tmp_path / "corpus")
    with raises(f"data.megatron.prefixes[0]: file '{prefix}.bin' does not exist"):
        parse_run_config(tiny_config(data=megatron_data(prefix)))


def test_empty_data_files(tmp_path):
    prefix = str(tmp_path / "corpus")
    (tmp_path / "corpus.bin").write_bytes(b"")
    (tmp_path / "corpus.idx").write_bytes(b"x")
    with raises(f"data.megatron.prefixes[0]: file '{prefix}.bin' is empty"):
        parse_run_config(tiny_config(data=megatron_data(prefix)))


def test_tokenizer_vocab_larger_than_the_model(tmp_path):
    cfg = tiny_config(model=dict(vocab_size=200), train=dict(deepspeed_config=ds_json(tmp_path)))
    with raises("tokenizer vocab_size (257, ByteTokenizer) is larger than the model's vocab_size (200)"):
        check(cfg)


@pytest.mark.parametrize("key,value,implied", [
    ("train_batch_size", 64, 8),
    ("train_micro_batch_size_per_gpu", 4, 2),
    ("gradient_accumulation_steps", 1, 2),
])
def test_deepspeed_json_batch_size_disagreement(tmp_path, key, value, implied):
    cfg = tiny_config(train=dict(deepspeed_config=ds_json(tmp_path, **{key: value})))
    with raises(f"sets {key} = {value} but the training config implies {implied} (train.micro_batch 2, "
                f"train.grad_accum 2, world size 2)"):
        check(cfg)


def test_deepspeed_json_may_repeat_agreeing_batch_sizes(tmp_path):
    cfg = tiny_config(train=dict(deepspeed_config=ds_json(tmp_path, train_batch_size=8,
                                                          gradient_accumulation_steps=2)))
    assert check(cfg).ds_config["train_batch_size"] == 8


def test_global_batch_must_match_the_launch(tmp_path):
    cfg = tiny_config(train=dict(deepspeed_config=ds_json(tmp_path), global_batch=16))
    with raises("train.global_batch (16) must equal train.micro_batch (2) * train.grad_accum (2) * world size (2) = 8"):
        check(cfg)


@pytest.mark.parametrize("entries,message", [
    (dict(optimizer={"type": "AdamW"}), "has a 'optimizer' section, but the optimizer is set by train.lr"),
    (dict(scheduler={"type": "WarmupLR"}), "has a 'scheduler' section"),
    (dict(zero_optimization={"stage": 3}), "zero_optimization.stage is 3"),
    (dict(zero_optimization={"stage": 2, "contiguous_gradients": False}), "contiguous_gradients must be true"),
    (dict(zero_optimization={"stage": 1, "contiguous_gradients": False}), "contiguous_gradients must be true"),
    (dict(zero_optimization={"stage": 1, "reduce_scatter": False}), "reduce_scatter must be true"),
    (dict(fp16={"enabled": True}), "fp16 is not supported"),
])
def test_deepspeed_json_other_errors(tmp_path, entries, message):
    with raises(message):
        check(tiny_config(train=dict(deepspeed_config=ds_json(tmp_path, **entries))))


def test_deepspeed_json_missing(tmp_path):
    with raises(f"DeepSpeed config '{tmp_path}/nope.json' does not exist"):
        check(tiny_config(train=dict(deepspeed_config=str(tmp_path / "nope.json"))))


def test_more_domains_than_labels(tmp_path):
    cfg = tiny_config(model=dict(num_labels=2), train=dict(deepspeed_config=ds_json(tmp_path)))
    with raises("the data carries 4 domains"):
        check(cfg)


def test_sequence_length_has_one_source_of_truth():
    with raises("data.seq_length (64) differs from train.seq_len (32)"):
        parse_run_config(tiny_config(data=dict(seq_length=64)))
    with raises("train.seq_len (64) must be <= model.max_seq_len (32)"):
        parse_run_config(tiny_config(train=dict(seq_len=64)))


def test_checkpoint_folder_state(tmp_path):
    ckpt = tmp_path / "ckpt"
    cfg = tiny_config(train=dict(deepspeed_config=ds_json(tmp_path), checkpoint_dir=str(ckpt)))
    with raises(f"--resume: no complete checkpoint in train.checkpoint_dir '{ckpt}'"):
        check(cfg, resume=True)
    ckpt.mkdir()
    (ckpt / "latest").write_text("step_00000004")
    with raises("already holds checkpoint 'step_00000004'; pass --resume"):
        check(cfg)
    # The tag itself is checked on resume (tests/e2e/test_preflight_resume.py for real checkpoints).
    with raises(f"names tag 'step_00000004', but '{ckpt}/step_00000004' does not exist"):
        check(cfg, resume=True)


def test_unknown_section_and_key():
    with raises("unknown config section(s) ['optim']"):
        parse_run_config(dict(tiny_config(), optim={}))
    with raises("train: unknown key(s) ['stpes']"):
        parse_run_config(tiny_config(train=dict(stpes=3)))


def test_entry_point_reports_config_errors_before_any_process_group(tmp_path):
    """launch/pretrain.py as the launcher would start it: exit status 2 and the message, and no
    process group (no MASTER_ADDR is set: an attempt to start one would fail differently)."""
    cfg = tiny_config(train=dict(deepspeed_config=ds_json(tmp_path, train_batch_size=64)))
    path = write_yaml(str(tmp_path / "run.yaml"), cfg)
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    env.update(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0")
    proc = subprocess.run([sys.executable, "launch/pretrain.py", "--config", path], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "config error: batch sizes disagree" in proc.stderr
    assert "train_batch_size = 64 but the training config implies 8" in proc.stderr


def test_entry_point_reports_a_checkpoint_that_cannot_resume(tmp_path, monkeypatch, capsys):
    """A CheckpointError once training started (DeepSpeed's load failed, a tag changed after
    preflight) is exit 2 with one line naming it, as a config error is, not a traceback."""
    from moe_dist.checkpoint.files import CheckpointError
    from moe_dist.train import trainer

    def cannot_resume(*args, **kwargs):
        raise CheckpointError("DeepSpeed could not load checkpoint '/runs/x/step_00000004'")

    monkeypatch.setattr(trainer, "pretrain", cannot_resume)
    monkeypatch.setenv("RANK", "1")  # no rank-0 claim on a checkpoint folder
    entry = load_script("launch/pretrain.py")
    monkeypatch.setattr(entry, "guard_launcher", lambda: None)
    path = write_yaml(str(tmp_path / "run.yaml"), tiny_config())
    assert entry.main(["--config", path, "--resume"]) == 2
    assert ("checkpoint error: DeepSpeed could not load checkpoint '/runs/x/step_00000004'"
            in capsys.readouterr().err)


def test_a_fresh_run_needs_its_frequency_hash_tables_token_counts(tmp_path):
    """Checked before any process starts, not at the first forward (a model built for evaluation
    or resume takes the table from the checkpoint instead)."""
    import numpy as np

    counts = str(tmp_path / "counts.npy")
    moe = dict(hash_layers=1, hash_router={"type": "hash", "table": "frequency", "token_counts": counts})
    cfg = tiny_config(moe=moe, train=dict(deepspeed_config=ds_json(tmp_path)))
    with raises(f"moe.hash_router.token_counts {counts!r} does not exist"):
        check(cfg)
    vocab = cfg["model"]["vocab_size"]
    np.save(counts, np.ones(vocab - 1, dtype=np.int64))
    with raises(f"shape [{vocab - 1}], expected [{vocab}]"):
        check(cfg)
    np.save(counts, np.ones(vocab, dtype=np.int64))
    check(cfg)
