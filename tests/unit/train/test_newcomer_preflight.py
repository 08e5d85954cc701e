"""Preflight and resume checks from issue 24: a labelled validation split that misses a domain of
the train split (two corpora preprocessed into one prefix: Megatron-Core's valid share is the last
documents, all of the last file), a prefix tokenized with another tokenizer, a resume with nothing
to train, the LR change a resume makes, and the world-size error's hint at --num_gpus."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from moe_dist.common.config import ConfigError
from moe_dist.data.config import DataConfig, TokenizerConfig
from moe_dist.data.preprocess import preprocess_corpus
from moe_dist.data.tokenizers import ByteTokenizer, build_tokenizer
from moe_dist.train.preflight.data import check_megatron_data
from tests.harness import REPO
from tests.harness.train import tiny_config, write_yaml


def write_docs(path, lang: str, n: int = 40) -> str:
    path.write_text("".join(json.dumps({"text": f"{lang} document number {i} " * 3, "lang": lang}) + "\n"
                            for i in range(n)))
    return str(path)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("domains")
    return tmp, write_docs(tmp / "en.jsonl", "en"), write_docs(tmp / "de.jsonl", "de")


def megatron(prefixes: list[str], tokenizer=None) -> DataConfig:
    return DataConfig.from_dict({"kind": "megatron", "tokenizer": tokenizer or {"kind": "byte"},
                                 "megatron": {"prefixes": prefixes, "split": "90,10"}})


def test_one_prefix_of_two_corpora_is_refused_one_prefix_each_passes(corpora):
    tmp, en, de = corpora
    both = str(tmp / "both")
    preprocess_corpus([en, de], both, ByteTokenizer(), label_key="lang")
    with pytest.raises(ConfigError, match=r"validation split .* holds domains \['de'\] but not \['en'\]"):
        check_megatron_data(megatron([both]), ByteTokenizer(), 257, train_samples=4, valid_samples=2)
    check_megatron_data(megatron([both]), ByteTokenizer(), 257, train_samples=4, valid_samples=0)  # no eval
    for lang, path in (("en", en), ("de", de)):
        preprocess_corpus([path], str(tmp / lang), ByteTokenizer(), label_key="lang")
    check_megatron_data(megatron([str(tmp / "en"), str(tmp / "de")]), ByteTokenizer(), 257, 4, 2)


def test_valid_split_of_per_corpus_prefixes_holds_both_domains(corpora):
    from moe_dist.data.pipeline import build_datasets

    tmp, en, de = corpora
    prefixes = []
    for lang, path in (("en", en), ("de", de)):
        prefixes.append(str(tmp / f"v_{lang}"))
        preprocess_corpus([path], prefixes[-1], ByteTokenizer(), label_key="lang")
    cfg = DataConfig.from_dict({"kind": "megatron", "seq_length": 16, "tokenizer": {"kind": "byte"},
                                "megatron": {"prefixes": prefixes, "split": "90,10",
                                             "cache_dir": str(tmp / "cache")}})
    data = build_datasets(cfg, 257, train_samples=8, valid_samples=16)
    seen = set()
    for i in range(len(data.valid)):
        seen.update(int(d) for d in data.valid[i]["domain_ids"] if d >= 0)
    assert {data.domain_names[d] for d in seen} == {"de", "en"}


def test_a_prefix_of_another_tokenizer_is_refused(corpora, tmp_path):
    """Byte ids are all in range of a 300-piece SentencePiece model: only the record tells."""
    from moe_dist.data.tokenizer_training import train_sentencepiece

    _, en, de = corpora
    model = train_sentencepiece([en, de], str(tmp_path / "tok"), 300)
    byte_prefix = str(tmp_path / "bytes")
    preprocess_corpus([en], byte_prefix, ByteTokenizer())
    sp = build_tokenizer(TokenizerConfig(kind="sentencepiece", model=model))
    with pytest.raises(ConfigError, match=r"prefixes\[0\] .* was tokenized with ByteTokenizer \(vocab 257\) .*"
                                          r"but this run's \(data.tokenizer\) tokenizer is SentencePieceTokenizer"):
        check_megatron_data(megatron([byte_prefix], {"kind": "sentencepiece", "model": model}), sp, 400,
                            train_samples=4, valid_samples=0)


def test_resume_with_nothing_to_do_is_refused():
    from moe_dist.checkpoint.training.resume import check_steps_left

    with pytest.raises(ConfigError, match=r"train.steps is 200, but checkpoint 'c/step_00000200' is at step 200: "
                                          r"nothing to train; .* raise train.steps above 200"):
        check_steps_left("c/step_00000200", {"step": 200}, {"train": {"steps": 200}})
    check_steps_left("c/step_00000200", {"step": 200}, {"train": {"steps": 201}})


def test_extending_a_cosine_run_logs_the_lr_change():
    from moe_dist.train.config import parse_run_config
    from moe_dist.train.schedule import lr_at, resume_lr_change

    train = parse_run_config(tiny_config(train={"steps": 400, "warmup_steps": 10, "lr": 3e-4,
                                                   "min_lr": 3e-5})).train
    stored = {"steps": 200, "warmup_steps": 10, "lr": 3e-4, "min_lr": 3e-5, "lr_decay": train.lr_decay}
    old = lr_at(200, dataclasses.replace(train, steps=200))
    assert resume_lr_change(stored, train, 200) == (f"learning rate at step 201: {old:.3e} -> "
                                                    f"{lr_at(200, train):.3e} (the checkpoint's schedule -> "
                                                    f"this config's)")
    assert resume_lr_change({**stored, "steps": 400}, train, 200) is None


def test_world_size_error_hints_at_num_gpus():
    from moe_dist.train.config import parse_run_config
    from moe_dist.train.config import check_world_size

    cfg = parse_run_config(tiny_config())
    with pytest.raises(ConfigError, match=r"world size \(1\) must be divisible by ep_size \(2\).*one per NUMA node"
                                          r".*pass --num_gpus N"):
        check_world_size(cfg.model, 1)
    check_world_size(cfg.model, 2)


def test_config_error_before_deepspeed_and_once_per_node(tmp_path):
    """launch/pretrain.py as the launcher starts it: a bad key is reported before DeepSpeed or
    Megatron-Core is imported, by the node's first process only."""
    path = write_yaml(str(tmp_path / "run.yaml"), tiny_config(train={"bogus": 1}))
    probe = ("import runpy, sys; sys.argv = ['launch/pretrain.py', '--config', %r]\n"
             "try:\n    runpy.run_path('launch/pretrain.py', run_name='__main__')\n"
             "except SystemExit as e:\n"
             "    print('exit', e.code, sorted({m.split('.')[0] for m in sys.modules} & {'deepspeed', 'megatron'}))"
             % path)
    outs = []
    for local_rank in ("0", "1"):
        env = {**os.environ, "PYTHONPATH": REPO, "RANK": local_rank, "LOCAL_RANK": local_rank, "WORLD_SIZE": "2"}
        proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=300)
        outs.append(proc)
        assert "exit 2 []" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    assert outs[0].stderr.count("config error: train: unknown key(s) ['bogus']") == 1
    assert "config error" not in outs[1].stderr


def test_reshard_resume_note_says_when_train_steps_must_rise():
    from types import SimpleNamespace

    from moe_dist.checkpoint.training.reshard import _resume_notes, _Target

    target = _Target(ep_size=4, world_size=4, expert_names=set(), num_local=1)
    done = SimpleNamespace(step=200, config={"train": {"steps": 200}}, ds_config={"train_batch_size": 16},
                           world_size=2)
    note = _resume_notes(done, target, "out/ep4")[0]
    assert "--set train.steps=N (N above the checkpoint's step 200" in note
    running = SimpleNamespace(**{**vars(done), "config": {"train": {"steps": 500}}})
    assert "continues step 201..500; raise train.steps to train longer" in _resume_notes(running, target, "o")[0]
