"""Multi-head latent attention (`model.attention: mla`), partial rotary and YaRN in moe_dist's own
model: generation caches the latent and the rotary key only (their widths, not every head's keys
and values) and equals recomputation, batch equals alone; the training forward is causal and
matches a plain per-head recomputation from the same weights; the config refuses keys that do
not belong together, naming them. (Against transformers: tests/unit/checkpoint/test_import_deepseek.py.)"""

from __future__ import annotations

import math

import pytest
import torch

from moe_dist.common.config import ConfigError
from moe_dist.model.config import parse_model_config
from moe_dist.model.generation import KVCache, SamplingConfig, generate
from moe_dist.model.transformer import MoETransformer

PROMPTS = [[5, 9, 200, 3, 3, 17, 40], [256, 1], [7, 7, 7, 7]]
MLA = dict(attention="mla", kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=6, v_head_dim=5)
YARN = dict(type="yarn", factor=4.0, original_max_seq_len=8, mscale=1.0, mscale_all_dim=1.0)
MODELS = {"mla-lowrank-q-yarn": dict(MLA, q_lora_rank=12, rope_scaling=YARN), "mla-fullrank-q": MLA,
          "gqa-partial-rotary": dict(n_kv_heads=2, partial_rotary_factor=0.5, qk_norm="head", qkv_bias=True)}


def model_for(name: str) -> MoETransformer:
    cfg = parse_model_config({"vocab_size": 257, "d_model": 32, "n_layers": 3, "n_heads": 4, "d_ff": 48,
                              "max_seq_len": 12, "moe_offset": 1, **MODELS[name]},
                             {"num_experts": 4, "top_k": 2, "d_ff": 16, "dropless": True, "num_shared_experts": 1,
                              "router": {"type": "topk", "score": "sigmoid", "renormalize": True, "scale": 2.0}})
    model = MoETransformer(cfg, seed=4).eval()
    with torch.no_grad():  # decisive logits: no near-ties in greedy
        for p in model.parameters():
            p.mul_(6.0 if p.dim() > 1 else 1.0)
    return model


@pytest.mark.parametrize("name", sorted(MODELS))
def test_cache_equals_recompute_and_batch_equals_alone(name):
    model = model_for(name)
    greedy = SamplingConfig(max_new_tokens=14)  # 7 + 14 > max_seq_len 12
    batch = generate(model, PROMPTS, greedy)
    assert batch == generate(model, PROMPTS, greedy, use_cache=False)
    assert batch == [generate(model, [p], greedy)[0] for p in PROMPTS]
    assert len({tuple(c) for c in batch}) > 1


def test_the_cache_holds_the_latent_and_rotary_key_not_keys_and_values():
    model = model_for("mla-lowrank-q-yarn")
    cache = KVCache(model, batch=3, max_positions=20, device="cpu", dtype=torch.float32)
    cfg = model.cfg
    assert [tuple(k.shape) for k in cache.k] == [(3, 1, 20, cfg.kv_lora_rank)] * cfg.n_layers
    assert [tuple(v.shape) for v in cache.v] == [(3, 1, 20, cfg.qk_rope_head_dim)] * cfg.n_layers
    per_position = sum(k[0, :, 0].numel() + v[0, :, 0].numel() for k, v in zip(cache.k, cache.v))
    full_kv = cfg.n_layers * cfg.n_heads * (cfg.head_dim + cfg.v_head_dim)
    assert per_position == cfg.n_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) < full_kv


def test_latent_attention_is_per_head_attention_over_the_expanded_latent():
    """The layer's output equals an explicit per-head softmax(q k^T * scale) v with the keys and
    values expanded from the latent, the rotary on the last r dims, causal, YaRN's mscale²."""
    model = model_for("mla-lowrank-q-yarn")
    attn, cfg = model.blocks[0].attn, model.cfg
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(0))
    from moe_dist.model.rotary import rotary_tables

    cos, sin = rotary_tables(7, cfg.rotary_dim, cfg.rope_theta, x.device, cfg.rope_scaling)
    with torch.no_grad():
        q, latent, k_rope = attn.project(x, cos, sin)
        kv = attn.kv_up(latent[:, 0]).view(2, 7, 4, 6 + 5)
        out = torch.zeros(2, 7, 4, 5)
        scale = (1 / math.sqrt(10)) * (0.1 * math.log(4.0) + 1) ** 2
        for h in range(4):
            k_h = torch.cat([kv[:, :, h, :6], k_rope[:, 0]], dim=-1)
            s = q[:, h] @ k_h.transpose(1, 2) * scale
            s = s.masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), float("-inf"))
            out[:, :, h] = s.softmax(-1) @ kv[:, :, h, 6:]
        torch.testing.assert_close(attn(x, cos, sin), attn.out(out.reshape(2, 7, 20)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model, message", [
    (dict(kv_lora_rank=8), r"model.kv_lora_rank size latent attention; set model.attention: mla"),
    (dict(MLA, v_head_dim=None), r"model.v_head_dim \(model.attention mla\) must be an integer >= 1"),
    (dict(MLA, n_kv_heads=2), r"model.n_kv_heads \(2\) must be left out with model.attention mla"),
    (dict(MLA, head_dim=8), r"model.head_dim \(8\) must be left out .* = 10"),
    (dict(MLA, partial_rotary_factor=0.5), r"model.partial_rotary_factor \(0.5\) is for model.attention mha"),
    (dict(attention="gqa"), r"model.attention"),
    (dict(partial_rotary_factor=0.1), r"rotated width of a head \(0"),
    (dict(rope_scaling=dict(type="linear", factor=2.0, original_max_seq_len=8)), r"model.rope_scaling.type"),
    (dict(rope_scaling=dict(type="yarn", factor=4.0)), r"model.rope_scaling.*original_max_seq_len"),
])
def test_config_refuses_keys_that_do_not_belong_together(model, message):
    with pytest.raises(ConfigError, match=message):
        parse_model_config({"vocab_size": 257, "d_model": 32, "n_layers": 2, "n_heads": 4, "d_ff": 48, **model})
