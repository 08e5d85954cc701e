"""Token counts of Megatron prefixes (the `hash` router's frequency table input): exact counts over
several prefixes and chunks, ids beyond the vocabulary refused naming the file, an atomic .npy,
and `tools/preprocess_data.py --token-counts` writing the counts of what it tokenized."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
from tests.harness import load_tool

from moe_dist.common.config import ConfigError
from moe_dist.data import token_counts
from moe_dist.data.token_counts import count_tokens, write_token_counts
from moe_dist.data.tokenizers import ByteTokenizer
from moe_dist.routing.hash import read_token_counts


def write_prefix(prefix: str, documents: list[np.ndarray], dtype=np.uint16) -> None:
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for doc in documents:
        builder.add_document(doc.astype(dtype), [len(doc)])
    builder.finalize(prefix + ".idx")


def test_counts_every_token_of_every_prefix_across_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(token_counts, "CHUNK_TOKENS", 7)  # several chunks per file
    rng = np.random.default_rng(0)
    docs = {name: [rng.integers(0, 40, n) for n in (5, 11, 1, 30)] for name in ("a", "b")}
    for name, d in docs.items():
        write_prefix(str(tmp_path / name), d)
    counts = count_tokens([str(tmp_path / "a"), str(tmp_path / "b")], 50)
    expected = np.bincount(np.concatenate([t for d in docs.values() for t in d]), minlength=50)
    assert counts.dtype == np.int64 and np.array_equal(counts, expected)


def test_a_token_id_beyond_the_vocabulary_is_refused_naming_the_file(tmp_path):
    write_prefix(str(tmp_path / "c"), [np.array([1, 2, 60])])
    with pytest.raises(ConfigError, match=r"c\.bin' holds token id 60, but the vocabulary has 50 ids"):
        count_tokens([str(tmp_path / "c")], 50)


def test_written_counts_read_back_as_the_router_reads_them(tmp_path):
    path = str(tmp_path / "counts.npy")
    write_token_counts(path, np.arange(10))
    assert np.array_equal(read_token_counts(path, 10), np.arange(10))
    assert [n for n in os.listdir(tmp_path)] == ["counts.npy"]  # no temporary left behind


def test_preprocess_data_writes_the_counts_of_its_output(tmp_path):
    source = tmp_path / "docs.jsonl"
    texts = ["hello hash", "routing by id", "aaa"]
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    counts = str(tmp_path / "counts.npy")
    rc = load_tool("preprocess_data").main(["--input", str(source), "--output-prefix", str(tmp_path / "out"),
                                            "--token-counts", counts, "--cache-dir", str(tmp_path / "cache")])
    assert rc == 0
    tok = ByteTokenizer()
    expected = np.bincount(np.concatenate([tok.tokenize(t) + [tok.eod] for t in texts]), minlength=tok.vocab_size)
    assert np.array_equal(np.load(counts), expected)
