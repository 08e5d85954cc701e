"""Data, tokenizer and config files that would fail late (or never) are refused in preflight,
before any process group exists, naming the file and what was expected: a truncated `.bin`, a
prefix whose split share has no document, token ids beyond the vocabulary, a file that is not a
SentencePiece model, YAML syntax errors, a malformed jsonl line in preprocessing. Datasets are
built with the project's own preprocessing (byte tokenizer, or a 1000-id stand-in)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys

import pytest
from tests.harness import load_tool
from tests.harness.train import REPO, launch, tiny_config, write_yaml

from moe_dist.common.config import ConfigError
from moe_dist.data import index_check
from moe_dist.data.config import DataConfig
from moe_dist.data.index_check import split_document_counts
from moe_dist.data.pipeline import build_datasets
from moe_dist.data.preprocess import preprocess_corpus
from moe_dist.data.tokenizers import ByteTokenizer
from moe_dist.train.config import load_run_config, parse_run_config
from moe_dist.train.preflight import preflight


class WideTokenizer(ByteTokenizer):
    """Stands in for a 1000-token vocabulary: every text gets id 999 once."""

    def tokenize(self, text: str) -> list[int]:
        return [999] + super().tokenize(text)

    @property
    def vocab_size(self) -> int:
        return 1000


def write_jsonl(path, texts) -> str:
    with open(path, "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    return str(path)


def make_prefix(root, name: str, num_docs: int, tokenizer=None) -> str:
    texts = [f"document {i}: " + "the quick brown fox jumps over the lazy dog " * 3 for i in range(num_docs)]
    prefix = str(root / name)
    preprocess_corpus([write_jsonl(root / f"{name}.jsonl", texts)], prefix, tokenizer or ByteTokenizer(),
                      cache_dir=str(root / "hf_cache"))
    return prefix


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("preflight_data")
    return {"root": root, "good": make_prefix(root, "good", 60), "small": make_prefix(root, "small", 12),
            "wide": make_prefix(root, "wide", 60, WideTokenizer())}


def megatron_cfg(prefix: str, split: str = "98,2", **train) -> dict:
    return tiny_config(data=dict(kind="megatron", tokenizer={"kind": "byte"}, synthetic=None,
                                 megatron={"prefixes": [prefix], "split": split}),
                       train=train)


def run_preflight(cfg: dict, world: int = 2):
    return preflight(parse_run_config(cfg), world, cfg["train"]["deepspeed_config"])


def raises(*parts: str):
    return pytest.raises(ConfigError, match="(?s)" + ".*".join(re.escape(p) for p in parts))


def truncated_copy(prefix: str, dst_dir, cut: int = 2048) -> str:
    out = str(dst_dir / "cut")
    shutil.copy(prefix + ".idx", out + ".idx")
    with open(prefix + ".bin", "rb") as f:
        payload = f.read()
    with open(out + ".bin", "wb") as f:
        f.write(payload[:-cut])
    return out


def test_good_data_passes(data):
    run_preflight(megatron_cfg(data["good"]))


def test_truncated_bin_is_refused(data, tmp_path):
    cut = truncated_copy(data["good"], tmp_path)
    size = os.path.getsize(data["good"] + ".bin")
    with raises(f"data.megatron.prefixes[0]: '{cut}.bin' is truncated: {size - 2048} bytes",
                f"'{cut}.idx' describes 60 documents", f"({size} bytes)"):
        run_preflight(megatron_cfg(cut))


def test_bin_of_another_prefix_and_foreign_index_are_refused(data, tmp_path):
    mixed = str(tmp_path / "mixed")
    shutil.copy(data["good"] + ".idx", mixed + ".idx")
    shutil.copy(data["small"] + ".bin", mixed + ".bin")
    with raises(f"'{mixed}.bin' is truncated"):
        run_preflight(megatron_cfg(mixed))
    (tmp_path / "mixed.idx").write_bytes(b"not an index at all, but long enough to have a header")
    with raises(f"'{mixed}.idx' is not a Megatron-Core index"):
        run_preflight(megatron_cfg(mixed))


@pytest.mark.parametrize("split,share,count", [("98,2", "valid", 0), ("1,99", "train", 0)])
def test_split_share_without_documents_is_refused(data, split, share, count):
    with raises(f"prefix '{data['small']}' has 12 documents, and split '{split}' gives its {share} share "
                f"{count} documents", "asks for"):
        run_preflight(megatron_cfg(data["small"], split=split))


def test_split_counts_are_megatrons():
    # Megatron-Core: bookends (0, .98), (.98, 1.0); documents round(end * N) - round(beg * N).
    assert split_document_counts("98,2", 12) == [12, 0, None]
    assert split_document_counts("98,2", 60) == [59, 1, None]
    assert split_document_counts("1,99", 12) == [0, 12, None]
    assert split_document_counts("100,0", 5) == [5, None, None]


def test_split_counts_match_the_documents_megatron_takes(data, tmp_path):
    cfg = DataConfig.from_dict({"kind": "megatron", "seq_length": 32, "tokenizer": {"kind": "byte"},
                                "megatron": {"prefixes": [data["good"]], "cache_dir": str(tmp_path)}})
    built = build_datasets(cfg, 257, train_samples=8, valid_samples=2)
    assert [len(built.train.indices), len(built.valid.indices)] == split_document_counts("98,2", 60)[:2]


def test_a_split_without_a_valid_share_needs_no_valid_documents(data):
    run_preflight(megatron_cfg(data["small"], split="100,0"))


def test_token_ids_beyond_the_vocabulary_are_refused(data):
    with raises(f"'{data['wide']}.bin' holds token id 999 (largest found by a full scan)",
                "the tokenizer's vocab_size (ByteTokenizer, data.tokenizer.kind 'byte'; model.vocab_size 257) is 257"):
        run_preflight(megatron_cfg(data["wide"]))


def test_large_token_files_are_sampled_and_the_message_says_so(data, monkeypatch):
    monkeypatch.setattr(index_check, "FULL_SCAN_BYTES", 16)
    monkeypatch.setattr(index_check, "SAMPLE_WINDOW_BYTES", 64)
    with raises("holds token id 999 (largest found by a sample of 64 windows"):
        run_preflight(megatron_cfg(data["wide"]))


def test_a_file_that_is_not_a_sentencepiece_model_is_refused(data, tmp_path):
    bogus = tmp_path / "tok.model"
    bogus.write_text("this is a vocabulary list, not a sentencepiece model\n")
    cfg = megatron_cfg(data["good"])
    cfg["data"]["tokenizer"] = {"kind": "sentencepiece", "model": str(bogus)}
    with raises(f"data.tokenizer.model '{bogus}' is not a SentencePiece model"):
        run_preflight(cfg)


def test_yaml_syntax_errors_name_file_line_and_column(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  d_model: 32\n  n_heads: [2, 4\ntrain:\n  steps: 3\n")
    with raises(f"{path}:4:6: YAML syntax error: expected ',' or ']'", "flow sequence at line 3, column 12"):
        load_run_config(str(path))
    good = write_yaml(str(tmp_path / "good.yaml"), tiny_config())
    with raises("--set 'train.lr=[1':1:3: YAML syntax error"):
        load_run_config(good, ["train.lr=[1"])


def test_yaml_error_exits_2_from_the_entry_point(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  steps: 3\n   seq_len: 4\n")
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "launch/pretrain.py", "--config", str(path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"config error: {path}:3:" in proc.stderr
    assert "Traceback" not in proc.stderr


def _preprocess_tool():
    return load_tool("preprocess_data").main


@pytest.mark.parametrize("lines,line,message", [
    (['{"text": "a"}', '{"text": "b"}', '{"text": "c', '{"text": "d"}'], 3, "not valid JSON"),
    (['{"text": "a"}', '', '{"text": 5}'], 3, "column 'text' must hold a string, got int (5)"),
    (['{"text": "a"}', '["a", "b"]'], 2, "expected a JSON object per line, got list"),
])
def test_preprocessing_names_the_file_and_line(tmp_path, capsys, lines, line, message):
    good = write_jsonl(tmp_path / "good.jsonl", ["fine"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    rc = _preprocess_tool()(["--input", good, str(bad), "--output-prefix", str(tmp_path / "out"),
                             "--cache-dir", str(tmp_path / "hf_cache")])
    assert rc == 2
    assert f"error: {bad}:{line}: {message}" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out.bin")


def _launch_preflight(cfg: dict, tmp_path):
    """The launcher with its master port held by this test: a rank that started a process group
    would fail to bind it (exit 1, "address already in use"), so exit 2 with the config error
    shows the run stopped before any process group existed."""
    path = write_yaml(str(tmp_path / "run.yaml"), cfg)
    with socket.socket() as held:
        held.bind(("", 0))
        held.listen()
        port = held.getsockname()[1]
        return launch(["--num_gpus", "2", "--master_port", str(port), "launch/pretrain.py", "--config", path],
                      timeout=300)


def _assert_refused_before_process_group(proc, *parts):
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    out = proc.stdout + proc.stderr
    for part in parts:
        assert part in out, out[-3000:]
    assert "config error:" in out


def test_truncated_bin_exits_2_through_the_launcher(data, tmp_path):
    cut = truncated_copy(data["good"], tmp_path)
    proc = _launch_preflight(megatron_cfg(cut), tmp_path)
    _assert_refused_before_process_group(proc, f"'{cut}.bin' is truncated")


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["small_prefix", "wide_vocab", "not_sentencepiece", "none"])
def test_other_data_faults_exit_2_through_the_launcher(data, tmp_path, fault):
    if fault == "none":  # the control: good data reaches the process group, which cannot bind
        proc = _launch_preflight(megatron_cfg(data["good"]), tmp_path)
        assert proc.returncode not in (0, 2), proc.stdout[-2000:] + proc.stderr[-2000:]
        assert "config error:" not in proc.stdout + proc.stderr
        return
    if fault == "small_prefix":
        cfg, expected = megatron_cfg(data["small"]), f"prefix '{data['small']}' has 12 documents"
    elif fault == "wide_vocab":
        cfg, expected = megatron_cfg(data["wide"]), f"'{data['wide']}.bin' holds token id 999"
    else:
        bogus = tmp_path / "tok.model"
        bogus.write_bytes(b"\x00\x01 not a model")
        cfg = megatron_cfg(data["good"])
        cfg["data"]["tokenizer"] = {"kind": "sentencepiece", "model": str(bogus)}
        expected = f"'{bogus}' is not a SentencePiece model"
    _assert_refused_before_process_group(_launch_preflight(cfg, tmp_path), expected)
