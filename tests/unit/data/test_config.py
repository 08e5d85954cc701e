"""Strict data config: every bad key or value fails at parse time with a message naming it."""

from __future__ import annotations

import re

import numpy as np
import pytest

from moe_dist.common.config import ConfigError
from moe_dist.data.config import DataConfig
from moe_dist.data.labels import global_domain_ids, label_sidecar_paths, write_label_sidecars


@pytest.fixture
def prefix(tmp_path):
    """A prefix whose files exist and are non-empty (contents are not read at parse time)."""
    for ext in (".bin", ".idx"):
        (tmp_path / f"ds{ext}").write_bytes(b"\0" * 8)
    return str(tmp_path / "ds")


def _megatron(prefix, **megatron):
    return {"kind": "megatron", "megatron": {"prefixes": [prefix], **megatron}}


def test_defaults_are_the_synthetic_quickstart():
    cfg = DataConfig.from_dict({})
    assert cfg.kind == "synthetic" and cfg.tokenizer.kind == "byte"
    assert cfg.synthetic.num_domains == 4 and cfg.megatron is None


def test_a_valid_megatron_config(prefix):
    cfg = DataConfig.from_dict(_megatron(prefix, weights=[2], split="99,1", cache_dir="c"))
    assert cfg.megatron.prefixes == [prefix] and cfg.megatron.weights == [2.0]


@pytest.mark.parametrize("raw, message", [
    ({"seq_len": 8}, "data: unknown key(s) ['seq_len']; allowed keys are ['kind', 'megatron', "
                     "'num_workers', 'seed', 'seq_length', 'synthetic', 'tokenizer']"),
    ({"synthetic": {"domains": 2}}, "data.synthetic: unknown key(s) ['domains']; allowed keys"),
    ({"tokenizer": {"file": "x"}}, "data.tokenizer: unknown key(s) ['file']; allowed keys are "
                                   "['add_bos', 'kind', 'model', 'path']"),
    ({"kind": "hf"}, "data.kind must be one of ['synthetic', 'megatron'], got 'hf'"),
    ({"seq_length": -4}, "data.seq_length must be an integer >= 1, got -4"),
    ({"num_workers": 1.5}, "data.num_workers must be an integer >= 0, got 1.5"),
    ({"synthetic": {"min_doc_tokens": 8, "max_doc_tokens": 4}},
     "data.synthetic.max_doc_tokens must be an integer >= 8, got 4"),
    ({"synthetic": {"branching": 96}}, "data.synthetic.branching (96) must be <= the alphabet"),
    ({"kind": "megatron"}, "data.megatron must be a mapping with 'prefixes'"),
    ({"tokenizer": {"kind": "sentencepiece"}}, "data.tokenizer.model must name a .model file"),
    ({"tokenizer": {"kind": "sentencepiece", "model": "/nonexistent/tok.model"}},
     "data.tokenizer.model: file '/nonexistent/tok.model' does not exist"),
])
def test_bad_values_are_named(raw, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        DataConfig.from_dict(raw)


@pytest.mark.parametrize("megatron, message", [
    ({"prefixs": ["a"]}, "data.megatron: unknown key(s) ['prefixs']; allowed keys are "
                         "['cache_dir', 'prefixes', 'split', 'weights']"),
    ({"weights": [0.5, 0.5]}, "data.megatron.weights ([0.5, 0.5]) must hold one weight per "
                              "prefix (1 prefixes)"),
    ({"weights": [-1]}, "data.megatron.weights[0] must be a number > 0, got -1"),
    ({"split": "98"}, "data.megatron.split must be two non-negative numbers 'train,valid' like "
                      "'98,2', got '98'"),
    ({"split": "0,100"}, "data.megatron.split: the train part must be > 0, got '0,100'"),
])
def test_bad_megatron_values_are_named(prefix, megatron, message):
    raw = _megatron(prefix)
    raw["megatron"].update(megatron)
    with pytest.raises(ConfigError, match=re.escape(message)):
        DataConfig.from_dict(raw)


def test_missing_and_empty_dataset_files(prefix):
    with pytest.raises(ConfigError, match=re.escape(f"file '{prefix}_x.bin' does not exist")):
        DataConfig.from_dict(_megatron(prefix + "_x"))
    open(prefix + ".idx", "w").close()
    with pytest.raises(ConfigError,
                       match=re.escape(f"data.megatron.prefixes[0]: file '{prefix}.idx' is empty")):
        DataConfig.from_dict(_megatron(prefix))


def test_half_a_label_sidecar_is_an_error(prefix):
    npy, _ = label_sidecar_paths(prefix)
    np.save(npy, np.zeros(3, dtype=np.int32))
    with pytest.raises(ConfigError, match=r"label sidecars must both exist.*labels\.npy"):
        DataConfig.from_dict(_megatron(prefix))


def test_synthetic_data_needs_the_byte_tokenizer(tmp_path):
    model = tmp_path / "tok.model"
    model.write_bytes(b"x")
    with pytest.raises(ConfigError, match="needs data.tokenizer.kind 'byte', got 'sentencepiece'"):
        DataConfig.from_dict({"tokenizer": {"kind": "sentencepiece", "model": str(model)}})


def test_a_section_for_the_other_kind_is_an_error(prefix):
    with pytest.raises(ConfigError, match="data.megatron is only allowed when data.kind is"):
        DataConfig.from_dict({"kind": "synthetic", "megatron": {"prefixes": [prefix]}})


def test_labels_map_onto_the_blend_domain_names(prefix):
    npy, json_path = label_sidecar_paths(prefix)
    write_label_sidecars(npy, json_path, "lang", ["de", "fr"], np.array([1, -1, 0], np.int32))
    ids = global_domain_ids(prefix, ["de", "en", "fr"], num_documents=3)
    assert ids.tolist() == [2, -1, 0]
    assert global_domain_ids(prefix + "_unlabelled", ["de"], 2).tolist() == [-1, -1]
    with pytest.raises(ConfigError, match=r"holds 3 labels .* holds 4 documents"):
        global_domain_ids(prefix, ["de", "en", "fr"], num_documents=4)
