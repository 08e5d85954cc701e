"""Tokenizers, tokenizer training and local-corpus reading, on tiny files written by the tests
(the fortunes-based round trip is in tests/unit/data/test_megatron.py)."""

from __future__ import annotations

import json
import os
import re

import datasets
import pytest
from megatron.core.tokenizers import MegatronTokenizerBase

from moe_dist.common.config import ConfigError
from moe_dist.data.config import TokenizerConfig
from moe_dist.data.text_sources import check_input_files, load_corpus
from moe_dist.data.tokenizers import (ByteTokenizer, SentencePieceTokenizer, build_tokenizer,
                                      validate_tokenizer_vocab)
from moe_dist.data.tokenizer_training import MIN_VOCAB_SIZE, train_sentencepiece

TEXTS = [f"Dokument {i}: Über {i * 7} Äpfel\n\tand {i % 5} pears, naïve café." for i in range(60)]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpora")
    (root / "a.jsonl").write_text("".join(json.dumps({"body": t, "lang": "x"}) + "\n"
                                          for t in TEXTS))
    (root / "b.txt").write_text("\n".join(t.replace("\n", " ") for t in TEXTS) + "\n")
    datasets.Dataset.from_dict({"text": TEXTS}).to_parquet(str(root / "c.parquet"))
    (root / "empty.jsonl").write_text("")
    (root / "d.csv").write_text("text\nhello\n")
    return root


def test_byte_tokenizer_round_trip_and_eod():
    tok = build_tokenizer(TokenizerConfig(kind="byte"))
    assert isinstance(tok, MegatronTokenizerBase) and isinstance(tok, ByteTokenizer)
    text = "Grüße, 世界\n"
    ids = tok.tokenize(text)
    assert max(ids) < 256 and tok.eod == 256 and tok.vocab_size == 257
    assert tok.detokenize(ids + [tok.eod]) == text


@pytest.mark.parametrize("model_type, source", [("bpe", "a.jsonl"), ("unigram", "c.parquet")])
def test_trained_model_round_trips_unseen_text(corpora, model_type, source):
    path = train_sentencepiece([str(corpora / source)], str(corpora / f"tok_{model_type}"),
                               vocab_size=300, model_type=model_type,
                               text_key="body" if source == "a.jsonl" else "text",
                               cache_dir=str(corpora / "hf"))
    assert path == str(corpora / f"tok_{model_type}.model")
    assert [f for f in os.listdir(corpora) if ".tmp-" in f] == []
    tok = build_tokenizer(TokenizerConfig(kind="sentencepiece", model=path))
    assert isinstance(tok, SentencePieceTokenizer) and tok.vocab_size <= 300
    unseen = "  Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich.\n\n\t€ 😀 "
    ids = tok.tokenize(unseen)
    assert tok.eod not in ids and tok.detokenize(ids) == unseen


def test_max_sentences_and_plain_text(corpora):
    path = train_sentencepiece([str(corpora / "b.txt")], str(corpora / "tok_txt"),
                               vocab_size=320, max_sentences=10, cache_dir=str(corpora / "hf"))
    assert SentencePieceTokenizer(path).vocab_size <= 320


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(vocab_size=100), ValueError, f"vocab_size (100) must be >= {MIN_VOCAB_SIZE}"),
    (dict(vocab_size=270), ValueError, "bpe training with vocab_size 270 on"),
    (dict(model_type="wordpiece"), ValueError, "model_type must be one of ('bpe', 'unigram')"),
    (dict(max_sentences=0), ValueError, "max_sentences must be >= 1 or None, got 0"),
    (dict(text_key="text"), ConfigError, "column(s) ['text'] not found"),
])
def test_training_rejects_bad_arguments(corpora, kwargs, error, message):
    args = dict(vocab_size=300, text_key="body") | kwargs
    with pytest.raises(error, match=re.escape(message)):
        train_sentencepiece([str(corpora / "a.jsonl")], str(corpora / "bad"),
                            cache_dir=str(corpora / "hf"), **args)
    assert not os.path.exists(corpora / "bad.model")


def test_input_files_are_checked_before_loading(corpora):
    with pytest.raises(ConfigError, match="input file '/nonexistent.jsonl' does not exist"):
        check_input_files(["/nonexistent.jsonl"])
    with pytest.raises(ConfigError, match="empty.jsonl' is empty"):
        check_input_files([str(corpora / "empty.jsonl")])
    with pytest.raises(ConfigError, match="is a URL; only local files are read"):
        check_input_files(["https://example.com/x.jsonl"])
    with pytest.raises(ConfigError, match="inputs mix file types"):
        check_input_files([str(corpora / "a.jsonl"), str(corpora / "b.txt")])
    with pytest.raises(ConfigError, match=r"unknown file type '\.csv'"):
        check_input_files([str(corpora / "d.csv")])


def test_load_corpus_keeps_order_and_columns(corpora):
    ds = load_corpus([str(corpora / "a.jsonl")], ["body", "lang"], cache_dir=str(corpora / "hf"))
    assert ds.column_names == ["body", "lang"] and list(ds["body"]) == TEXTS


def test_validate_tokenizer_vocab():
    validate_tokenizer_vocab(ByteTokenizer(), 257)
    with pytest.raises(ValueError, match=r"tokenizer vocab_size \(257, ByteTokenizer\) is larger "
                                         r"than the model's vocab_size \(256\)"):
        validate_tokenizer_vocab(ByteTokenizer(), 256)


def test_missing_model_file():
    with pytest.raises(ValueError, match="file '/nonexistent.model' does not exist"):
        SentencePieceTokenizer("/nonexistent.model")
