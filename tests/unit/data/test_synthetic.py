"""The built-in synthetic corpus: deterministic, labelled, learnable, and batched with the same
rank-sharding and resume semantics as the Megatron path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moe_dist.data.config import DataConfig, SyntheticDataConfig
from moe_dist.data.loader import ShardedBatchSampler, build_dataloader
from moe_dist.data.synthetic import ALPHABET, SyntheticCorpus, successor_probs

EOD = 256


def _corpus(seed=0, num_samples=64, seq_length=48, stream=0, **cfg):
    return SyntheticCorpus(SyntheticDataConfig(**cfg), seq_length, num_samples, seed, EOD,
                           stream)


def test_samples_are_a_function_of_seed_and_index():
    a, b = _corpus(seed=3), _corpus(seed=3)
    for idx in (5, 0, 63, 5):  # any order
        assert np.array_equal(a[idx]["tokens"], b[idx]["tokens"])
        assert np.array_equal(a[idx]["domain_ids"], b[idx]["domain_ids"])
    assert not np.array_equal(a[0]["tokens"], _corpus(seed=4)[0]["tokens"])
    assert not np.array_equal(a[0]["tokens"], _corpus(seed=3, stream=1)[0]["tokens"])


def test_tokens_and_domain_labels():
    corpus = _corpus(num_domains=3, min_doc_tokens=4, max_doc_tokens=12)
    seen = set()
    for idx in range(len(corpus)):
        sample = corpus[idx]
        tokens, domains = sample["tokens"], sample["domain_ids"]
        assert tokens.shape == (49,) and domains.shape == (48,)
        assert tokens.dtype == np.int64 and domains.dtype == np.int64
        assert np.isin(tokens, np.append(ALPHABET, EOD)).all()
        # Documents (eod-terminated, at most 12 + 1 tokens) each carry one domain.
        ends = np.flatnonzero(tokens[:-1] == EOD)
        assert len(ends) >= 3 and np.diff(np.concatenate([[-1], ends])).max() <= 13
        for beg, end in zip(np.concatenate([[0], ends[:-1] + 1]), ends):
            assert len(set(domains[beg : end + 1])) == 1
        seen.update(domains.tolist())
    assert seen == {0, 1, 2}


def test_each_domain_follows_its_own_chain():
    """Within a document, every transition is one of the domain's `branching` successors."""
    corpus = _corpus(num_domains=2, branching=3)
    for idx in range(8):
        sample = corpus[idx]
        symbols = sample["tokens"][:-1] - ALPHABET[0]
        for s in range(len(symbols) - 1):
            if EOD - ALPHABET[0] in (symbols[s], symbols[s + 1]):
                continue
            successors = corpus.successors[sample["domain_ids"][s], symbols[s]]
            assert symbols[s + 1] in successors
    assert np.isclose(successor_probs(3).sum(), 1.0)
    assert not np.array_equal(corpus.successors[0], corpus.successors[1])


@pytest.fixture
def one_torch_thread():
    # Tiny matmuls on a shared 2-core machine: a second intra-op thread only waits on the first,
    # and under load that wait is most of the test's time.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_bigram_model_learns_it_within_100_steps(one_torch_thread):
    torch.manual_seed(0)
    corpus = _corpus(num_samples=1600, seq_length=64)
    model = torch.nn.Embedding(EOD + 1, EOD + 1)  # logits of the next token given this one
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    losses = []
    for batch in build_dataloader(corpus, micro_batch_size=16):
        tokens_BS1 = batch["tokens"]
        logits_BSV = model(tokens_BS1[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits_BSV.flatten(0, 1),
                                                 tokens_BS1[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert len(losses) == 100
    assert losses[0] > 5.0 and np.mean(losses[-10:]) < 3.0


def test_sharding_and_resume_match_the_global_order():
    corpus = _corpus(num_samples=40)
    full = list(build_dataloader(corpus, micro_batch_size=6))
    ranks = [list(build_dataloader(corpus, micro_batch_size=2, dp_rank=r, dp_world_size=3))
             for r in range(3)]
    assert len(full) == 6  # 40 // 6: the incomplete last global batch is dropped
    for step, batch in enumerate(full):
        for key in ("tokens", "domain_ids"):
            assert torch.equal(torch.cat([r[step][key] for r in ranks]), batch[key])
    resumed = list(build_dataloader(corpus, micro_batch_size=2, dp_rank=1, dp_world_size=3,
                                    consumed_samples=18))
    assert len(resumed) == 3
    for a, b in zip(resumed, ranks[1][3:]):
        assert torch.equal(a["tokens"], b["tokens"])


def test_worker_processes_give_the_same_batches():
    corpus = _corpus(num_samples=12)
    in_process = list(build_dataloader(corpus, micro_batch_size=3, consumed_samples=3))
    workers = list(build_dataloader(corpus, micro_batch_size=3, consumed_samples=3,
                                    num_workers=2))
    assert len(workers) == len(in_process) == 3
    for a, b in zip(workers, in_process):
        assert torch.equal(a["tokens"], b["tokens"])
        assert torch.equal(a["domain_ids"], b["domain_ids"])


def test_sampler_indices_are_disjoint_slices():
    samplers = [ShardedBatchSampler(20, 3, r, 2, consumed_samples=2) for r in range(2)]
    assert [list(s) for s in samplers] == [
        [[2, 3, 4], [8, 9, 10], [14, 15, 16]],
        [[5, 6, 7], [11, 12, 13], [17, 18, 19]],
    ]


@pytest.mark.parametrize("kwargs, message", [
    (dict(micro_batch_size=0), r"micro_batch_size must be >= 1, got 0"),
    (dict(dp_rank=2, dp_world_size=2), r"dp_rank \(2\) must be in \[0, dp_world_size \(2\)\)"),
    (dict(consumed_samples=21), r"consumed_samples \(21\) must be in \[0, num_samples \(20\)\]"),
])
def test_sampler_rejects_bad_arguments(kwargs, message):
    args = dict(num_samples=20, micro_batch_size=2) | kwargs
    with pytest.raises(ValueError, match=message):
        ShardedBatchSampler(**args)


def test_synthetic_pipeline_gives_train_and_valid_streams():
    from moe_dist.data.pipeline import build_datasets

    cfg = DataConfig.from_dict({"kind": "synthetic", "seq_length": 32,
                                "synthetic": {"num_domains": 2}})
    data = build_datasets(cfg, model_vocab_size=257, train_samples=10, valid_samples=4)
    assert (len(data.train), len(data.valid)) == (10, 4)
    assert data.domain_names == ["domain0", "domain1"]
    assert data.tokenizer.eod == EOD
    assert not np.array_equal(data.train[0]["tokens"], data.valid[0]["tokens"])
    with pytest.raises(ValueError, match=r"tokenizer vocab_size \(257.*vocab_size \(256\)"):
        build_datasets(cfg, model_vocab_size=256, train_samples=10, valid_samples=4)
