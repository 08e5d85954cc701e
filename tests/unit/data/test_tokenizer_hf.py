"""`tokenizer.kind: hf`: a local Hugging Face tokenizer directory (built here with `tokenizers`,
nothing downloaded) gives the ids transformers gives, through preprocessing into the Megatron
files and through the datasets training reads; bad directories are ConfigErrors naming them.
Training on such data under the deepspeed launcher: tests/e2e/test_upcycle_train.py."""

from __future__ import annotations

import os
import pickle
import re

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset
from tests.harness.tiny_hf_tokenizer import ADDED, LINES, build_tokenizer_dir, reference_ids, write_jsonl

from moe_dist.common.config import ConfigError
from moe_dist.data.config import DataConfig, TokenizerConfig
from moe_dist.data.pipeline import build_datasets
from moe_dist.data.tokenizers import HFTokenizer, build_tokenizer
from tests.harness import load_tool

TEXTS = [*LINES[:40], f"two documents{ADDED}in one row", "unseen: Zwölf Boxkämpfer 😀\n\tjagen Viktor", ""]


def _preprocess_main(argv: list[str]) -> int:
    return load_tool("preprocess_data").main(argv)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return build_tokenizer_dir(str(tmp_path_factory.mktemp("hf_tok")))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tok_dir):
    """TEXTS preprocessed with the tool (2 worker processes: the tokenizer must pickle)."""
    root = tmp_path_factory.mktemp("hf_corpus")
    src = write_jsonl(str(root / "docs.jsonl"), TEXTS)
    assert _preprocess_main(["--input", src, "--output-prefix", str(root / "docs"), "--hf-tokenizer", tok_dir,
                             "--workers", "2", "--cache-dir", str(root / "cache")]) == 0
    return root


def test_ids_vocab_and_eod_are_the_transformers_tokenizer_s(tok_dir):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    tok = build_tokenizer(TokenizerConfig(kind="hf", path=tok_dir))
    assert isinstance(tok, HFTokenizer)
    # len() counts the added token, which the base vocabulary's vocab_size leaves out.
    assert tok.vocab_size == len(ref) == ref.vocab_size + 1
    assert tok.eod == ref.eos_token_id == ref.convert_tokens_to_ids("</s>")
    assert ref("x").input_ids[0] == ref.bos_token_id  # the post-processor's <s>, which documents leave out
    for text in TEXTS:
        assert tok.tokenize(text) == ref.encode(text, add_special_tokens=False)
        assert tok.eod not in tok.tokenize(text)
    assert tok.tokenize(ADDED) == [ref.convert_tokens_to_ids(ADDED)]
    assert tok.detokenize(tok.tokenize(TEXTS[0])) == TEXTS[0]
    assert tok.vocab == ref.get_vocab()
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.tokenize(TEXTS[1]) == tok.tokenize(TEXTS[1])


def test_add_bos_leads_each_document(tok_dir):
    tok = build_tokenizer(TokenizerConfig(kind="hf", path=tok_dir, add_bos=True))
    plain = build_tokenizer(TokenizerConfig(kind="hf", path=tok_dir))
    assert tok.tokenize(TEXTS[0]) == [tok.bos, *plain.tokenize(TEXTS[0])]
    assert tok.unique_identifiers != plain.unique_identifiers  # different documents, different caches


def test_digest_follows_the_tokenizer_files_not_the_path(tok_dir, tmp_path):
    import shutil

    copy = shutil.copytree(tok_dir, str(tmp_path / "moved"))
    a, b = HFTokenizer(tok_dir), HFTokenizer(copy)
    assert a.unique_identifiers == b.unique_identifiers
    with open(os.path.join(copy, "tokenizer_config.json"), "a") as f:
        f.write("\n")
    assert HFTokenizer(copy).unique_identifiers != a.unique_identifiers


def test_preprocessed_documents_equal_transformers_ids_plus_eod(corpus, tok_dir):
    indexed = IndexedDataset(str(corpus / "docs"))
    expected = reference_ids(tok_dir, TEXTS)
    assert len(indexed) == len(TEXTS)
    assert indexed[0].dtype == np.uint16
    for i, ids in enumerate(expected):
        assert indexed[i].tolist() == ids


def test_training_datasets_read_them(corpus, tok_dir):
    cfg = DataConfig.from_dict({"kind": "megatron", "seq_length": 16,
                                "tokenizer": {"kind": "hf", "path": tok_dir},
                                "megatron": {"prefixes": [str(corpus / "docs")], "split": "100,0",
                                             "cache_dir": str(corpus / "index_cache")}})
    ds = build_datasets(cfg, 321, train_samples=8, valid_samples=0)
    assert isinstance(ds.tokenizer, HFTokenizer)
    docs = [ids[:-1] for ids in reference_ids(tok_dir, TEXTS)]
    for i in range(len(ds.train)):
        # A sample is a window of shuffled documents, each closed by eod: between two eods lies a
        # whole document, before the first the end of one, after the last the start of one.
        pieces = np.split(ds.train[i]["tokens"], np.flatnonzero(ds.train[i]["tokens"] == ds.tokenizer.eod))
        pieces = [pieces[0].tolist()] + [p[1:].tolist() for p in pieces[1:]]
        if len(pieces) == 1:  # inside one document
            assert any(_contains(d, pieces[0]) for d in docs)
            continue
        assert any(d[len(d) - len(pieces[0]):] == pieces[0] for d in docs if len(d) >= len(pieces[0]))
        assert all(p in docs for p in pieces[1:-1])
        assert any(d[:len(pieces[-1])] == pieces[-1] for d in docs)
    with pytest.raises(ValueError, match=re.escape("tokenizer vocab_size (321, HFTokenizer) is larger than the "
                                                   "model's vocab_size (320)")):
        build_datasets(cfg, 320, train_samples=8, valid_samples=0)


def _contains(doc: list[int], piece: list[int]) -> bool:
    return any(doc[j:j + len(piece)] == piece for j in range(len(doc) - len(piece) + 1))


@pytest.mark.parametrize("make, cfg, message", [
    (None, dict(path="{root}/absent"), "data.tokenizer.path: directory '{root}/absent' does not exist"),
    ("empty", dict(path="{root}/empty"), "directory '{root}/empty' holds none of ['tokenizer.json', "
                                         "'tokenizer_config.json']"),
    (None, dict(path=None), "data.tokenizer.path must name a Hugging Face tokenizer directory, got None"),
    ("tok", dict(path="{root}/tok", model="x.model"), "data.tokenizer.model is for kind 'sentencepiece'"),
])
def test_config_errors_name_the_directory(tmp_path, tok_dir, make, cfg, message):
    root = str(tmp_path)
    if make == "empty":
        os.makedirs(tmp_path / "empty")
    elif make == "tok":
        os.symlink(tok_dir, tmp_path / "tok")
    cfg = {k: v.format(root=root) if isinstance(v, str) else v for k, v in cfg.items()}
    with pytest.raises(ConfigError, match=re.escape(message.format(root=root))):
        TokenizerConfig(kind="hf", **cfg)


@pytest.mark.parametrize("cfg, message", [
    (dict(kind="byte", path="/x"), "data.tokenizer.path is only for kind 'hf'"),
    (dict(kind="byte", add_bos=True), "data.tokenizer.add_bos is only for kind 'hf'"),
])
def test_hf_keys_are_rejected_for_other_kinds(cfg, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        TokenizerConfig(**cfg)


def test_unloadable_directory_and_missing_eos_are_config_errors(tmp_path, tok_dir):
    broken = tmp_path / "broken"
    os.makedirs(broken)
    (broken / "tokenizer.json").write_text("{not json")
    with pytest.raises(ConfigError, match=re.escape(f"data.tokenizer.path {str(broken)!r}: cannot load a Hugging "
                                                    f"Face tokenizer from this directory")):
        build_tokenizer(TokenizerConfig(kind="hf", path=str(broken)))
    no_eos = build_tokenizer_dir(str(tmp_path / "no_eos"), with_eos=False)
    with pytest.raises(ConfigError, match=re.escape(f"Hugging Face tokenizer {no_eos!r} has no eos_token")):
        build_tokenizer(TokenizerConfig(kind="hf", path=no_eos))


def test_preprocess_tool_exits_2_and_writes_nothing_for_a_bad_directory(tmp_path, tok_dir, capsys):
    src = write_jsonl(str(tmp_path / "d.jsonl"), TEXTS[:3])
    out = str(tmp_path / "out")
    assert _preprocess_main(["--input", src, "--output-prefix", out, "--hf-tokenizer", str(tmp_path)]) == 2
    assert f"directory {str(tmp_path)!r} holds none of" in capsys.readouterr().err
    assert _preprocess_main(["--input", src, "--output-prefix", out, "--hf-tokenizer", tok_dir,
                             "--tokenizer-model", src]) == 2
    assert "give one tokenizer" in capsys.readouterr().err
    assert not [f for f in os.listdir(tmp_path) if f.startswith("out")]
