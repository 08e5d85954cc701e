"""`--resume` compares the tokenizer and the data with what the checkpoint recorded, not only their
paths: a tokenizer retrained in place (same directory, new files), a prefix re-preprocessed, or an
`.idx` beside the `.bin` of another dataset of equal size is refused, naming what changed, unless
`--allow_config_change` (as with a changed seed). One real checkpoint (2 steps, 2 ranks, the
`deepspeed` launcher, a Hugging Face tokenizer built locally) serves every case."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
from tests.harness.tiny_hf_tokenizer import build_tokenizer_dir, write_jsonl
from tests.harness.train import assert_launch_ok, free_port, launch, tiny_config, write_yaml

from moe_dist.checkpoint.training.resume import input_differences
from moe_dist.common.config import ConfigError
from moe_dist.data.config import TokenizerConfig
from moe_dist.data.preprocess import preprocess_corpus
from moe_dist.data.tokenizers import build_tokenizer
from moe_dist.train.config import parse_run_config
from moe_dist.train.preflight import preflight
from moe_dist.train.preflight.data import BIN_SAMPLE_BYTES, BIN_SAMPLE_WINDOWS, bin_sample_sha256

TEXTS = [f"document {i}: the quick brown fox jumps over the lazy dog " * 2 for i in range(60)]


def preprocess(texts: list[str], prefix: str, tok_dir: str, cache: str) -> str:
    tok = build_tokenizer(TokenizerConfig(kind="hf", path=tok_dir))
    preprocess_corpus([write_jsonl(prefix + ".jsonl", texts)], prefix, tok, cache_dir=cache)
    return prefix


def run_cfg(root, prefix: str, tok_dir: str) -> dict:
    return tiny_config(model=dict(vocab_size=384),
                       data=dict(kind="megatron", tokenizer={"kind": "hf", "path": tok_dir}, synthetic=None,
                                 megatron={"prefixes": [prefix], "split": "98,2"}),
                       train=dict(steps=2, checkpoint_dir=str(root / "ckpt")))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    tok_dir = build_tokenizer_dir(str(root / "tok"))
    prefix = preprocess(TEXTS, str(root / "data"), tok_dir, str(root / "hf_cache"))
    cfg = run_cfg(root, prefix, tok_dir)
    proc = launch(["--num_gpus", "2", "--master_port", str(free_port()), "launch/pretrain.py", "--config",
                   write_yaml(str(root / "run.yaml"), cfg)])
    assert_launch_ok(proc)
    return root, cfg


@pytest.fixture
def copy(run, tmp_path):
    """The run's folder and config; a test changes its tokenizer or data in place (the paths the
    checkpoint recorded), and they are restored afterwards."""
    root, cfg = run
    backup = tmp_path / "backup"
    backup.mkdir()
    shutil.copytree(root / "tok", backup / "tok")
    for name in ("data.bin", "data.idx"):
        shutil.copy(root / name, backup / name)
    yield root, copy_cfg(cfg)
    shutil.rmtree(root / "tok")
    shutil.copytree(backup / "tok", root / "tok")
    for name in ("data.bin", "data.idx"):
        shutil.copy(backup / name, root / name)


def copy_cfg(cfg: dict) -> dict:
    import copy as copy_module

    return copy_module.deepcopy(cfg)


def resume_preflight(cfg: dict, allow: bool = False):
    # Steps left to train: a resume with none is refused first (tests/unit/train/test_newcomer_preflight.py).
    cfg = {**cfg, "train": {**cfg["train"], "steps": max(cfg["train"]["steps"], 3)}}
    return preflight(parse_run_config(cfg), 2, cfg["train"]["deepspeed_config"], resume=True,
                     allow_config_change=allow)


def raises(*parts: str):
    return pytest.raises(ConfigError, match="(?s)" + ".*".join(re.escape(p) for p in parts))


def test_unchanged_inputs_pass(copy):
    _, cfg = copy
    assert resume_preflight(cfg).config_changes == []


def test_a_tokenizer_retrained_in_place_is_refused_unless_allowed(copy):
    out, cfg = copy
    shutil.rmtree(out / "tok")
    build_tokenizer_dir(str(out / "tok"), vocab_size=360)  # same directory, a larger vocabulary
    with raises("--resume: settings that change the data order, routing or model math differ",
                "data.tokenizer (same settings, new content: retrained?): sha256 ",
                "pass --allow_config_change"):
        resume_preflight(cfg)
    changes = resume_preflight(cfg, allow=True).config_changes
    assert len(changes) == 1 and changes[0].startswith("data.tokenizer (same settings, new content")


def test_a_prefix_preprocessed_again_is_refused_naming_what_changed(copy):
    out, cfg = copy
    preprocess([t.upper() for t in TEXTS[:40]], str(out / "data"), str(out / "tok"), str(out / "hf_cache"))
    with raises(f"data prefix '{out / 'data'}' (same path, new content): idx_bytes ", "bin_bytes ", "idx_sha256 ",
                "bin_sample_sha256 "):
        resume_preflight(cfg)


def test_an_idx_beside_the_bin_of_another_dataset_of_equal_size_is_refused(copy):
    out, cfg = copy
    # Another dataset's tokens in a .bin of the same size (here: this one's, rotated by 7 tokens),
    # so the sizes agree with the .idx and every token id is valid.
    tokens = np.fromfile(out / "data.bin", dtype=np.uint16)
    np.roll(tokens, 7).tofile(out / "data.bin")
    with raises(f"data prefix '{out / 'data'}' (same path, new content): bin_sample_sha256 "):
        resume_preflight(cfg)


def test_the_bin_sample_reads_windows_of_a_large_file(tmp_path):
    big = tmp_path / "big.bin"
    size = BIN_SAMPLE_WINDOWS * BIN_SAMPLE_BYTES * 4
    big.write_bytes(bytes(size))
    first = bin_sample_sha256(str(big))
    with open(big, "r+b") as f:  # a byte between windows is not read; one in the last window is
        f.seek(BIN_SAMPLE_BYTES + 10)
        f.write(b"\x01")
    assert bin_sample_sha256(str(big)) == first
    with open(big, "r+b") as f:
        f.seek(size - 1)
        f.write(b"\x01")
    assert bin_sample_sha256(str(big)) != first


def test_checkpoints_without_a_data_identity_compare_the_tokenizer_only():
    client = {"tokenizer": {"unique_identifiers": {"cls": "X", "sha256": "a" * 64}}}
    inputs = {"tokenizer": {"cls": "X", "sha256": "a" * 64}, "data": [{"prefix": "p", "idx_bytes": 1}]}
    assert input_differences(client, inputs) == []
    inputs["tokenizer"]["sha256"] = "b" * 64
    assert input_differences(client, inputs) == [
        "data.tokenizer (same settings, new content: retrained?): sha256 aaaaaaaaaaaa... -> bbbbbbbbbbbb..."]


@pytest.mark.slow
def test_a_changed_prefix_through_the_launcher_exits_2_and_the_flag_resumes(copy):
    out, cfg = copy
    preprocess([t.upper() for t in TEXTS], str(out / "data"), str(out / "tok"), str(out / "hf_cache"))
    cfg["train"]["steps"] = 3
    config = write_yaml(str(out / "resume.yaml"), cfg)
    args = ["--num_gpus", "2", "--master_port", str(free_port()), "launch/pretrain.py", "--config", config, "--resume"]
    proc = launch(args)
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert f"data prefix '{out / 'data'}' (same path, new content)" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "also set data.megatron.cache_dir to a new folder" in proc.stderr
    cfg["data"]["megatron"]["cache_dir"] = str(out / "new_cache")  # the old one indexes the old documents
    write_yaml(config, cfg)
    proc = launch(args[:3] + [str(free_port())] + args[4:] + ["--allow_config_change", "--break_lock"])
    assert_launch_ok(proc)
    assert "--allow_config_change: data prefix" in proc.stdout
