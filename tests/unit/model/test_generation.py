"""moe_dist.model.generation and tools/generate.py: the KV cache equals recomputation, a padded
batch gives each prompt its continuation alone, greedy equals argmax over the training forward,
positions past max_seq_len work, sampling is reproducible and its filters do what they say;
grouped-query attention and QK-norm go through the cache path too."""

from __future__ import annotations

import json

import pytest
import torch
from tests.harness import load_tool

from moe_dist.checkpoint import save_consolidated
from moe_dist.common.config import ConfigError
from moe_dist.model.config import parse_model_config
from moe_dist.model.generation import SamplingConfig, generate, next_tokens
from moe_dist.model.transformer import MoETransformer

PROMPTS = [[5, 9, 200, 3, 3, 17, 40], [256, 1], [7, 7, 7, 7]]
MODELS = {
    "mha-dense-between": ({}, {}),
    "gqa-qknorm-shared": (dict(n_heads=4, n_kv_heads=2, qk_norm="head", qkv_bias=True),
                          dict(num_shared_experts=1, router={"type": "topk", "renormalize": True})),
    "comet-stream": ({}, dict(router={"type": "fixed_projection", "source": "embedding"})),
    # Routes by token id: the cache path must hand the new tokens' ids to the MoE layers.
    "hash": ({"n_layers": 5}, dict(hash_layers=1, router={"type": "topk"})),
}


def model_for(name: str, **moe_extra) -> MoETransformer:
    m, e = MODELS[name]
    cfg = parse_model_config({"vocab_size": 257, "d_model": 32, "n_layers": 3, "n_heads": 2, "d_ff": 48,
                              "max_seq_len": 12, "moe_every": 2, **m},
                             {"num_experts": 4, "top_k": 2, "d_ff": 16, **e, **moe_extra})
    return MoETransformer(cfg, seed=4).eval()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_cache_equals_recompute_and_batch_equals_alone(name):
    model = model_for(name)
    greedy = SamplingConfig(max_new_tokens=14)  # 7 + 14 > max_seq_len 12
    batch = generate(model, PROMPTS, greedy)
    assert batch == generate(model, PROMPTS, greedy, use_cache=False)
    assert batch == [generate(model, [p], greedy)[0] for p in PROMPTS]
    assert all(len(c) == 14 for c in batch)
    # greedy against the training forward, as far as max_seq_len allows
    seq = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        while seq.shape[1] < model.cfg.max_seq_len:
            seq = torch.cat([seq, model(seq).logits_BSV[:, -1:].argmax(-1)], dim=1)
    assert seq[0, len(PROMPTS[0]):].tolist() == batch[0][:model.cfg.max_seq_len - len(PROMPTS[0])]


def test_stops_at_end_of_document():
    model = model_for("mha-dense-between")
    hot = {"max_new_tokens": 10, "temperature": 2.0, "seed": 1}
    free = generate(model, PROMPTS, SamplingConfig(**hot))
    # the end-of-document is a token the second prompt's continuation first emits at j >= 1
    j = next(j for j in range(1, 10) if free[1][j] not in free[1][:j])
    eos = free[1][j]
    stopped = generate(model, PROMPTS, SamplingConfig(**hot, eos_id=eos))
    assert stopped[1] == free[1][:j]
    for full, cut in zip(free, stopped):
        assert cut == (full[:full.index(eos)] if eos in full else full)


def test_sampling_is_seeded_and_filtered():
    model = model_for("mha-dense-between")
    hot = SamplingConfig(max_new_tokens=12, temperature=1.5, seed=3)
    assert generate(model, PROMPTS, hot) == generate(model, PROMPTS, hot)
    assert generate(model, PROMPTS, hot) != generate(model, PROMPTS, SamplingConfig(max_new_tokens=12,
                                                                                      temperature=1.5, seed=4))
    greedy = generate(model, PROMPTS, SamplingConfig(max_new_tokens=12))
    assert generate(model, PROMPTS, SamplingConfig(max_new_tokens=12, temperature=1.5, top_k=1, seed=3)) == greedy
    assert generate(model, PROMPTS, SamplingConfig(max_new_tokens=12, temperature=1.5, top_p=1e-6, seed=3)) == greedy
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).log_softmax(-1).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    drawn = next_tokens(logits, SamplingConfig(temperature=1.0, top_k=2), g)
    assert set(drawn.tolist()) == {2, 3}
    p = torch.tensor([0.05, 0.15, 0.3, 0.5])  # top_p 0.7: {3, 2} reach 0.8; 1 and 0 are cut
    drawn = next_tokens(p.log().repeat(2000, 1), SamplingConfig(temperature=1.0, top_p=0.7), g)
    assert set(drawn.tolist()) == {2, 3}


def test_refuses_a_capacity_that_depends_on_the_batch():
    model = model_for("mha-dense-between", eval_capacity_factor=1.0)
    with pytest.raises(ConfigError, match="eval_capacity_factor is 1.0"):
        generate(model, PROMPTS, SamplingConfig(max_new_tokens=2))


def test_tool_on_a_consolidated_checkpoint(tmp_path, capsys):
    model = model_for("mha-dense-between", eval_capacity_factor=0.5)  # the tool makes it dropless
    ckpt = save_consolidated(model, str(tmp_path / "ckpt"))
    tool = load_tool("generate")
    assert tool.main([ckpt, "--prompt", "ab", "--prompt", "", "--max-new-tokens", "15", "--json",
                      "--no-stop-at-eod"]) == 0
    got = json.loads(capsys.readouterr().out)
    dropless = model_for("mha-dense-between")
    dropless.load_state_dict(model.state_dict())
    assert [r["ids"] for r in got] == generate(dropless, [[97, 98], [256]], SamplingConfig(max_new_tokens=15))
    assert got[0]["prompt"] == "ab" and isinstance(got[0]["text"], str)
    assert tool.main([ckpt]) == 2
    assert "no prompt" in capsys.readouterr().err
