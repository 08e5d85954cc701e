"""The real-data path end to end on a small slice of the shared fortunes corpus: train a
tokenizer and preprocess with the CLIs, read back through Megatron-Core's builder, and check
tokens, per-token labels, blend weights, rank sharding and resumption."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from tests.harness import SHARED_DATA, load_tool

NUM_DOCS = 120  # per language and prefix: enough for several 128-token samples, still fast

pytestmark = pytest.mark.skipif(
    not os.path.isfile(os.path.join(SHARED_DATA, "fortunes_en.jsonl")),
    reason=f"shared corpus folder {os.path.abspath(SHARED_DATA)} (fortunes_*.jsonl) is absent")

from megatron.core.datasets.indexed_dataset import (  # noqa: E402
    IndexedDataset,
    IndexedDatasetBuilder,
)

from moe_dist.common.config import ConfigError  # noqa: E402
from moe_dist.data.config import DataConfig  # noqa: E402
from moe_dist.data.loader import build_dataloader, collate_samples  # noqa: E402
from moe_dist.data.pipeline import build_datasets  # noqa: E402
from moe_dist.data.preprocess import preprocess_corpus  # noqa: E402
from moe_dist.data.tokenizers import SentencePieceTokenizer  # noqa: E402



def _write_rows(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def _read_rows(lang: str, start: int, count: int) -> list[dict]:
    with open(os.path.join(SHARED_DATA, f"fortunes_{lang}.jsonl")) as f:
        return [json.loads(line) for _, line in zip(range(start + count), f)][start:]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two prefixes: `en` (English only) and `mix` (other English docs + German docs)."""
    root = tmp_path_factory.mktemp("fortunes")
    rows = {"en": _read_rows("en", 0, NUM_DOCS),
            "mix_en": _read_rows("en", NUM_DOCS, NUM_DOCS), "mix_de": _read_rows("de", 0, NUM_DOCS)}
    files = {name: _write_rows(root / f"{name}.jsonl", r) for name, r in rows.items()}
    cache = str(root / "hf_cache")
    load_tool("train_tokenizer").main([
        "--input", files["en"], files["mix_de"], "--output-prefix", str(root / "tok"),
        "--vocab-size", "600", "--model-type", "bpe", "--max-sentences", "200",
        "--cache-dir", cache])
    preprocess = load_tool("preprocess_data").main
    for prefix, inputs in (("en", [files["en"]]), ("mix", [files["mix_en"], files["mix_de"]])):
        preprocess(["--input", *inputs, "--output-prefix", str(root / prefix),
                    "--tokenizer-model", str(root / "tok.model"), "--workers", "2",
                    "--label-key", "lang", "--cache-dir", cache])
    return {"root": root, "model": str(root / "tok.model"), "cache": cache,
            "texts": {"en": rows["en"], "mix": rows["mix_en"] + rows["mix_de"]}}


def _data_cfg(corpus, weights=(0.75, 0.25), seq_length=128):
    weights = None if weights is None else list(weights)
    root = corpus["root"]
    return DataConfig.from_dict({
        "kind": "megatron", "seq_length": seq_length, "seed": 7,
        "tokenizer": {"kind": "sentencepiece", "model": corpus["model"]},
        "megatron": {"prefixes": [str(root / "en"), str(root / "mix")],
                     "weights": weights, "split": "90,10",
                     "cache_dir": str(root / "index_cache")}})


@pytest.fixture(scope="module")
def blend(corpus):
    return build_datasets(_data_cfg(corpus), 600, train_samples=400, valid_samples=16)


def test_tokenizer_eod_and_vocab(corpus):
    tok = SentencePieceTokenizer(corpus["model"])
    assert tok.vocab_size == 600
    assert tok.eod not in tok.tokenize("Ein Mathematikprofessor trägt sein Fahrrad.\n\tx")


def test_documents_round_trip_with_eod(corpus):
    tok = SentencePieceTokenizer(corpus["model"])
    for prefix in ("en", "mix"):
        indexed = IndexedDataset(str(corpus["root"] / prefix))
        texts = corpus["texts"][prefix]
        assert len(indexed) == len(texts)
        assert indexed[0].dtype == np.uint16  # vocab 600 < 65500
        for i, row in enumerate(texts):
            doc = indexed[i]
            assert doc[-1] == tok.eod
            assert tok.detokenize(doc[:-1]) == row["text"]


def test_label_sidecar_matches_sources(corpus):
    labels = np.load(corpus["root"] / "mix.labels.npy")
    with open(corpus["root"] / "mix.labels.json") as f:
        meta = json.load(f)
    assert meta["names"] == ["de", "en"] and meta["label_key"] == "lang"
    assert [meta["names"][i] for i in labels] == [r["lang"] for r in corpus["texts"]["mix"]]


def test_domain_ids_follow_source_documents(corpus, blend):
    """Every eod-delimited complete document inside a sample is looked up among the source
    documents; its tokens must carry that document's lang."""
    tok = SentencePieceTokenizer(corpus["model"])
    lang_of = {}
    for prefix in ("en", "mix"):
        indexed = IndexedDataset(str(corpus["root"] / prefix))
        for i, row in enumerate(corpus["texts"][prefix]):
            lang_of[tuple(indexed[i].tolist())] = row["lang"]
    names = blend.domain_names
    assert names == ["de", "en"]
    checked = set()
    for idx in range(120):
        sample = blend.train[idx]
        tokens, domains = sample["tokens"], sample["domain_ids"]
        assert tokens.shape == (129,) and domains.shape == (128,)
        assert set(np.unique(domains)) <= {0, 1}
        ends = np.flatnonzero(tokens[:-1] == tok.eod)
        for beg, end in zip(ends[:-1] + 1, ends[1:]):
            lang = lang_of[tuple(tokens[beg : end + 1].tolist())]
            assert {names[d] for d in domains[beg : end + 1]} == {lang}
            checked.add(lang)
        # The partial documents at both ends also keep one label each.
        if len(ends):
            assert len(set(domains[: ends[0] + 1])) == 1
            assert len(set(domains[ends[-1] + 1 :])) <= 1
    assert checked == {"en", "de"}


def test_blend_weights_are_respected(blend):
    dataset_ids = np.array([blend.train[i]["dataset_id"] for i in range(400)])
    assert abs(np.mean(dataset_ids == 0) - 0.75) < 0.03
    assert blend.valid is not None and len(blend.valid) >= 16


def test_unweighted_blend_follows_token_counts(corpus):
    data = build_datasets(_data_cfg(corpus, weights=None), 600, train_samples=300,
                          valid_samples=0)
    num_tokens = {}
    for prefix in ("en", "mix"):
        indexed = IndexedDataset(str(corpus["root"] / prefix))
        num_tokens[prefix] = int(indexed.sequence_lengths.sum())
    expected = num_tokens["en"] / (num_tokens["en"] + num_tokens["mix"])
    dataset_ids = np.array([data.train[i]["dataset_id"] for i in range(300)])
    assert abs(np.mean(dataset_ids == 0) - expected) < 0.03


def _batches(dataset, **kwargs):
    return list(build_dataloader(dataset, **kwargs))


def test_rank_slices_are_disjoint_and_make_the_global_batch(blend):
    full = _batches(blend.train, micro_batch_size=4)
    ranks = [_batches(blend.train, micro_batch_size=2, dp_rank=r, dp_world_size=2)
             for r in range(2)]
    assert len(full) == len(ranks[0]) == len(ranks[1]) == 100
    for step, batch in enumerate(full):
        assert batch["tokens"].shape == (4, 129) and batch["tokens"].dtype == torch.int64
        assert batch["domain_ids"].shape == (4, 128)
        for key in ("tokens", "domain_ids"):
            joined = torch.cat([ranks[0][step][key], ranks[1][step][key]])
            assert torch.equal(joined, batch[key])
    assert not torch.equal(ranks[0][0]["tokens"], ranks[1][0]["tokens"])


def test_resume_from_consumed_samples(corpus, blend):
    full = _batches(blend.train, micro_batch_size=2, dp_rank=1, dp_world_size=2)
    # A new process would rebuild the datasets from the index cache.
    rebuilt = build_datasets(_data_cfg(corpus), 600, train_samples=400, valid_samples=16)
    resumed = _batches(rebuilt.train, micro_batch_size=2, dp_rank=1, dp_world_size=2,
                       consumed_samples=40)
    assert len(resumed) == len(full) - 10
    for a, b in zip(resumed, full[10:]):
        assert torch.equal(a["tokens"], b["tokens"])
        assert torch.equal(a["domain_ids"], b["domain_ids"])


def test_vocab_larger_than_model_is_rejected(corpus):
    with pytest.raises(ValueError, match=r"tokenizer vocab_size \(600.*model's vocab_size \(512\)"):
        build_datasets(_data_cfg(corpus), 512, train_samples=8, valid_samples=0)


def _listing(folder):
    return sorted(os.listdir(folder))


def test_failed_preprocess_leaves_no_final_files(corpus, tmp_path, monkeypatch):
    tok = SentencePieceTokenizer(corpus["model"])
    source = _write_rows(tmp_path / "in.jsonl", corpus["texts"]["mix"][:40])
    out = tmp_path / "out"
    out.mkdir()
    preprocess_corpus([source], str(out / "good"), tok, label_key="lang",
                      cache_dir=corpus["cache"])
    before = {name: (out / name).read_bytes() for name in _listing(out)}
    assert set(before) == {"good.bin", "good.idx", "good.labels.npy", "good.labels.json", "good.tokenizer.json"}

    calls = {"n": 0}
    original = IndexedDatasetBuilder.add_document

    def add_document_then_fail(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 10:
            raise OSError("disk full (simulated)")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(IndexedDatasetBuilder, "add_document", add_document_then_fail)
    for prefix in ("good", "fresh"):  # overwrite an existing dataset, and write a new one
        calls["n"] = 0
        with pytest.raises(OSError, match="disk full"):
            preprocess_corpus([source], str(out / prefix), tok, label_key="lang",
                              cache_dir=corpus["cache"])
    assert {name: (out / name).read_bytes() for name in _listing(out)} == before


def test_non_string_text_names_the_file_and_line(corpus, tmp_path):
    tok = SentencePieceTokenizer(corpus["model"])
    source = _write_rows(tmp_path / "in.jsonl", [{"text": "fine"}, {"text": None}])
    with pytest.raises(ConfigError, match=r"in.jsonl:2: column 'text' must hold a string, got NoneType"):
        preprocess_corpus([source], str(tmp_path / "out"), tok, cache_dir=corpus["cache"])
    (tmp_path / "afile").write_text("x")  # a folder that cannot be created is named before any work
    with pytest.raises(ConfigError, match=r"cannot create output folder .*/afile/sub' for"):
        preprocess_corpus([source], str(tmp_path / "afile" / "sub" / "out"), tok)
    assert _listing(tmp_path) == ["afile", "in.jsonl"]


def test_samples_carry_their_documents_and_padding_mask(corpus, blend):
    """segment_ids number the sample's documents from 0, a new one right after each eod (packed
    documents for the sequence balance scope); a full sample's loss mask keeps every position;
    the loader collates both."""
    eod = SentencePieceTokenizer(corpus["model"]).eod
    new_documents = 0
    for idx in range(40):
        sample = blend.train[idx]
        tokens, segments = sample["tokens"], sample["segment_ids"]
        assert segments.shape == (128,) and sample["loss_mask"].shape == (128,)
        assert sample["loss_mask"].all()
        assert segments[0] == 0 and set(np.diff(segments)) <= {0, 1}
        starts = np.flatnonzero(np.diff(segments)) + 1
        assert starts.tolist() == (np.flatnonzero(tokens[:127] == eod) + 1).tolist()
        new_documents += len(starts)
    assert new_documents > 0
    batch = next(iter(build_dataloader(blend.train, micro_batch_size=2)))
    assert batch["segment_ids"].shape == (2, 128)
    assert "loss_mask" not in batch  # it masks nothing: the trainer then passes no mask
    short = dict(blend.train[0], loss_mask=np.array([1] * 100 + [0] * 28))
    padded = collate_samples([blend.train[1], short])
    assert padded["loss_mask"].tolist() == [[1] * 128, [1] * 100 + [0] * 28]


def test_padding_and_documents_masks_the_padding_tail():
    from moe_dist.data.datasets import padding_and_documents

    # 5 + 1 tokens: two documents, then two padding tokens (-1) at the end of a short sample.
    out = padding_and_documents(np.array([7, 7, 9, 9, -1, -1]))
    assert out["loss_mask"].tolist() == [1, 1, 1, 0, 0]  # position 3 would predict padding
    assert out["segment_ids"].tolist() == [0, 0, 1, 1, 2]
