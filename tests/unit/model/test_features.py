"""The model features of imported architectures, each against a hand-written reference:
grouped-query / multi-query attention and an explicit head_dim (GQA equals multi-head attention
with repeated key/value weights), q/k RMSNorm per head (Qwen3-MoE) and over the whole
projection (OLMoE), before rotary, q/k/v bias (Qwen2); the topk router's sigmoid scores,
top-k-then-softmax order and scale; the shared expert's own width and sigmoid gate (Qwen2-MoE);
config validation; and the defaults that keep today's models."""

from __future__ import annotations

import math

import pytest
import torch

from moe_dist.common.config import ConfigError
from moe_dist.model import attention as attention_module
from moe_dist.model.attention import CausalSelfAttention
from moe_dist.model.config import parse_model_config
from moe_dist.model.rotary import apply_rotary, rotary_tables
from moe_dist.model.transformer import MoETransformer
from moe_dist.moe.config import MoEConfig
from moe_dist.moe.layer import MoELayer
from moe_dist.routing.base import RoutingContext
from moe_dist.routing.losses import switch_loss
from moe_dist.routing.registry import build_router, router_config_from_dict
from moe_dist.routing.topk import topk_from_logits

B, S, D = 2, 7, 32


def attention(H=4, Y=4, A=8, **kw) -> CausalSelfAttention:
    torch.manual_seed(0)
    return CausalSelfAttention(D, H, n_kv_heads=Y, head_dim=A, init_std=0.3, out_std=0.3, **kw)


def inputs(A=8):
    x = torch.randn(B, S, D, generator=torch.Generator().manual_seed(1))
    cos, sin = rotary_tables(S, A, 10000.0, x.device)
    return x, cos, sin


def rms(x, w, eps=1e-5):
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * w


def reference_attention(attn: CausalSelfAttention, x, cos, sin):
    """Attention written out: explicit q/k/v slices, norms, rotary, repeated kv heads, masked softmax."""
    H, Y, A = attn.n_heads, attn.n_kv_heads, attn.head_dim
    W = attn.qkv.weight
    b = attn.qkv.bias if attn.qkv.bias is not None else torch.zeros(W.shape[0])
    q, k, v = x @ W[:H * A].T + b[:H * A], x @ W[H * A:(H + Y) * A].T + b[H * A:(H + Y) * A], \
        x @ W[(H + Y) * A:].T + b[(H + Y) * A:]
    if attn.qk_norm == "full":
        q, k = rms(q, attn.q_norm.weight), rms(k, attn.k_norm.weight)
    q, k, v = q.view(B, S, H, A), k.view(B, S, Y, A), v.view(B, S, Y, A)
    if attn.qk_norm == "head":
        q, k = rms(q, attn.q_norm.weight), rms(k, attn.k_norm.weight)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    k, v = k.repeat_interleave(H // Y, dim=1), v.repeat_interleave(H // Y, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(A)
    scores = scores.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
    y = torch.softmax(scores, dim=-1) @ v
    return y.transpose(1, 2).reshape(B, S, H * A) @ attn.out.weight.T


@pytest.mark.parametrize("H,Y,A,qk_norm,bias", [
    (4, 4, 8, "none", False), (4, 2, 8, "none", False), (4, 1, 8, "none", False),  # MHA, GQA, MQA
    (4, 2, 12, "none", False),  # head_dim 12: inner width 48 != d_model 32
    (4, 2, 8, "head", False), (4, 2, 12, "full", False), (4, 2, 8, "none", True), (4, 1, 6, "head", True),
])
def test_attention_matches_the_written_out_reference(H, Y, A, qk_norm, bias):
    attn = attention(H, Y, A, qk_norm=qk_norm, qkv_bias=bias)
    with torch.no_grad():  # norm weights and bias away from their 1 / 0 init, so they count
        for p in (attn.q_norm, attn.k_norm):
            if p is not None:
                p.weight.uniform_(0.5, 1.5)
        if bias:
            attn.qkv.bias.normal_(0, 0.5)
    assert attn.qkv.weight.shape == ((H + 2 * Y) * A, D) and attn.out.weight.shape == (D, H * A)
    x, cos, sin = inputs(A)
    torch.testing.assert_close(attn(x, cos, sin), reference_attention(attn, x, cos, sin), rtol=1e-5, atol=1e-5)


def test_qk_norm_param_shapes_and_that_both_forms_differ():
    head, full = attention(4, 2, 8, qk_norm="head"), attention(4, 2, 8, qk_norm="full")
    assert head.q_norm.weight.shape == head.k_norm.weight.shape == (8,)
    assert full.q_norm.weight.shape == (32,) and full.k_norm.weight.shape == (16,)
    assert {n for n, _ in head.named_parameters()} == {"qkv.weight", "out.weight", "q_norm.weight", "k_norm.weight"}
    full.load_state_dict({**full.state_dict(), "q_norm.weight": torch.ones(32), "k_norm.weight": torch.ones(16)})
    x, cos, sin = inputs()
    assert not torch.allclose(head(x, cos, sin), full(x, cos, sin))  # same qkv weights, other norm
    assert not torch.allclose(head(x, cos, sin), attention(4, 2, 8)(x, cos, sin))


def test_grouped_query_attention_equals_multi_head_with_repeated_kv_weights():
    H, Y, A = 4, 2, 8
    gqa, mha = attention(H, Y, A, qkv_bias=True), attention(H, H, A, qkv_bias=True)
    with torch.no_grad():
        gqa.qkv.bias.normal_()
        W, b = gqa.qkv.weight, gqa.qkv.bias

        def repeat(t):  # kv head j serves query heads j*H/Y .. (j+1)*H/Y - 1
            return t.view(Y, A, *t.shape[1:]).repeat_interleave(H // Y, dim=0).reshape(H * A, *t.shape[1:])

        mha.qkv.weight.copy_(torch.cat([W[:H * A], repeat(W[H * A:(H + Y) * A]), repeat(W[(H + Y) * A:])]))
        mha.qkv.bias.copy_(torch.cat([b[:H * A], repeat(b[H * A:(H + Y) * A]), repeat(b[(H + Y) * A:])]))
        mha.out.weight.copy_(gqa.out.weight)
    x, cos, sin = inputs(A)
    torch.testing.assert_close(gqa(x, cos, sin), mha(x, cos, sin), rtol=1e-5, atol=1e-6)


def test_kv_heads_repeated_by_hand_where_sdpa_cannot_broadcast_them(monkeypatch):
    attn = attention(4, 2, 8, qk_norm="head")
    x, cos, sin = inputs()
    native = attn(x, cos, sin)
    monkeypatch.setattr(attention_module, "_SDPA_GQA", False)
    torch.testing.assert_close(attn(x, cos, sin), native, rtol=1e-6, atol=1e-6)


def test_transformer_with_every_attention_feature_trains_and_names_its_params():
    cfg = parse_model_config(dict(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=12,
                                  d_ff=24, qk_norm="full", qkv_bias=True),
                             dict(num_experts=4, d_ff=16, top_k=2, dropless=True, num_shared_experts=1,
                                  shared_d_ff=20, shared_gate=True,
                                  router=dict(score="sigmoid", renormalize=True, scale=2.5)))
    model = MoETransformer(cfg, seed=1)
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    assert shapes["blocks.0.attn.qkv.weight"] == (12 * 8, 32) and shapes["blocks.0.attn.qkv.bias"] == (96,)
    assert shapes["blocks.0.attn.out.weight"] == (32, 48)
    assert shapes["blocks.1.attn.q_norm.weight"] == (48,) and shapes["blocks.1.attn.k_norm.weight"] == (24,)
    assert shapes["blocks.0.moe.shared_gate.weight"] == (1, 32)
    assert shapes["blocks.0.moe.shared.w_in_DI"] == (32, 40) and shapes["blocks.0.moe.shared.w_out_FD"] == (20, 32)
    tokens = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(0))
    out = model(tokens[:, :-1], tokens[:, 1:])
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_defaults_resolve_to_multi_head_attention():
    cfg = parse_model_config(dict(vocab_size=61, d_model=32, n_layers=1, n_heads=4, d_ff=24),
                             dict(num_experts=4, d_ff=16, num_shared_experts=2))
    assert (cfg.n_kv_heads, cfg.head_dim, cfg.qk_norm, cfg.qkv_bias) == (4, 8, "none", False)
    assert (cfg.moe.shared_d_ff, cfg.moe.shared_gate) == (32, False)
    r = cfg.moe.router
    # renormalize: resolved from top_k (2 by default: true; docs/routers/topk.md).
    assert (r.score, r.score_after_topk, r.renormalize, r.scale) == ("softmax", False, cfg.moe.top_k > 1, 1.0)
    assert cfg.moe.top_k == 2
    names = set(MoETransformer(cfg).state_dict())
    assert not any("norm.weight" in n and "attn." in n or n.endswith("qkv.bias") or "shared_gate" in n
                   for n in names)
    # head_dim lets n_heads not divide d_model
    assert parse_model_config(dict(vocab_size=61, d_model=30, n_layers=1, n_heads=4, head_dim=8, d_ff=24)).head_dim == 8


BASE = dict(vocab_size=61, d_model=32, n_layers=1, n_heads=4, d_ff=24)


@pytest.mark.parametrize("model,moe,message", [
    (dict(n_kv_heads=3), None, r"model.n_heads \(4\) must be divisible by model.n_kv_heads \(3\)"),
    (dict(n_kv_heads=0), None, r"model.n_kv_heads must be an integer >= 1, got 0"),
    (dict(head_dim=7), None, r"model.head_dim \(7\) must be even"),
    (dict(d_model=30), None, r"model.d_model \(30\) must be divisible by model.n_heads \(4\), or set model.head_dim"),
    (dict(n_heads=2, d_model=6), None, r"model.head_dim \(3\) must be even"),
    (dict(qk_norm="rms"), None, r"model.qk_norm must be one of \['none', 'head', 'full'\], got 'rms'"),
    (dict(qkv_bias="yes"), None, r"model.qkv_bias must be true or false, got 'yes'"),
    ({}, dict(shared_d_ff=16), r"moe.shared_d_ff \(16\) needs moe.num_shared_experts >= 1"),
    ({}, dict(num_shared_experts=1, shared_d_ff=0), r"moe.shared_d_ff must be an integer >= 1, got 0"),
    ({}, dict(shared_gate=True), r"moe.shared_gate needs a shared expert"),
    ({}, dict(router=dict(score="tanh")), r"router.score must be one of \['softmax', 'sigmoid'\], got 'tanh'"),
    ({}, dict(router=dict(score="sigmoid", score_after_topk=True)),
     r"router.score_after_topk needs router.score softmax, got score 'sigmoid'"),
    ({}, dict(router=dict(scale=0.0)), r"router.scale must be a number > 0, got 0.0"),
])
def test_bad_combinations_are_named(model, moe, message):
    with pytest.raises(ConfigError, match=message):
        parse_model_config({**BASE, **model}, None if moe is None else dict(num_experts=4, d_ff=16, **moe))


# ---- router scores ----------------------------------------------------------------------------

def logits(T=64, E=8):
    return torch.randn(T, E, generator=torch.Generator().manual_seed(3)) * 2


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_sigmoid_scores_against_a_written_out_reference(renormalize, scale):
    lg = logits()
    bias = torch.linspace(-0.3, 0.3, 8)
    probs, w, idx = topk_from_logits(lg, 3, renormalize, bias, score="sigmoid", scale=scale)
    s = 1 / (1 + torch.exp(-lg))
    want_idx = torch.topk(s + bias, 3, dim=-1).indices
    want_w = s.gather(1, want_idx)  # the bias chooses, never weighs
    if renormalize:
        want_w = want_w / want_w.sum(-1, keepdim=True)
    assert torch.equal(idx, want_idx)
    torch.testing.assert_close(w, want_w * scale)
    torch.testing.assert_close(probs, s / s.sum(-1, keepdim=True))
    assert not torch.equal(want_idx, torch.topk(s, 3, dim=-1).indices)  # the bias did choose


def test_softmax_after_topk_is_mixtrals_order():
    lg = logits()
    probs, w, idx = topk_from_logits(lg, 2, False, score_after_topk=True, scale=0.5)
    order = torch.topk(lg, 2, dim=-1)
    assert torch.equal(idx, order.indices)
    torch.testing.assert_close(w, torch.softmax(order.values, dim=-1) * 0.5)
    torch.testing.assert_close(probs, torch.softmax(lg, -1))
    # The same weights as renormalizing the chosen probabilities (what export-hf relies on).
    _, w_renorm, _ = topk_from_logits(lg, 2, True)
    torch.testing.assert_close(w, w_renorm * 0.5)


def test_default_scores_are_unchanged():
    lg = logits()
    _, w, idx = topk_from_logits(lg, 2, False)
    p = torch.softmax(lg, -1)
    assert torch.equal(idx, torch.topk(p, 2, -1).indices) and torch.equal(w, p.gather(1, idx))


def test_switch_loss_on_sigmoid_scores_is_one_at_balance():
    probs, _, _ = topk_from_logits(torch.zeros(16, 4), 1, False, score="sigmoid")
    load = torch.full((4,), 4.0)
    assert torch.allclose(switch_loss(probs, load), torch.tensor(1.0))
    # Unnormalized sigmoids (0.5 each) would give E * 0.5 = 2 here.


def test_router_module_uses_the_configured_scores():
    cfg = router_config_from_dict(dict(type="topk", score="sigmoid", renormalize=True, scale=3.0))
    torch.manual_seed(0)
    router = build_router(cfg, d_model=16, num_experts=8, top_k=2, layer_index=0)
    x = torch.randn(32, 16)
    out = router(x, RoutingContext(training=False))
    torch.testing.assert_close(out.w_TK.sum(-1), torch.full((32,), 3.0))
    s = torch.sigmoid(x @ router.gate.weight_ED.T)
    assert torch.equal(out.idx_TK, torch.topk(s, 2, -1).indices)
    torch.testing.assert_close(out.logits_TE, x @ router.gate.weight_ED.T)


# ---- shared expert ----------------------------------------------------------------------------

def moe_cfg(**kw) -> MoEConfig:
    return MoEConfig.from_dict(dict(d_model=16, d_ff=8, num_experts=4, top_k=2, dropless=True, **kw))


def test_gated_shared_expert_against_the_written_out_sum():
    layer = MoELayer(moe_cfg(num_shared_experts=1, shared_d_ff=12, shared_gate=True), seed=2)
    assert layer.shared_gate.weight.shape == (1, 16) and layer.shared.w_out_FD.shape == (12, 16)
    x = torch.randn(20, 16, generator=torch.Generator().manual_seed(0))
    y = layer(x).y
    shared, gate = layer.shared, layer.shared_gate
    layer.shared, layer.shared_gate = None, None
    routed = layer(x).y
    h = x @ shared.w_in_DI
    g, u = h.chunk(2, -1)
    want = routed + torch.sigmoid(x @ gate.weight.T) * ((torch.nn.functional.silu(g) * u) @ shared.w_out_FD)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)


def test_shared_gate_weight_is_seeded_per_layer_and_replicated():
    a = MoELayer(moe_cfg(num_shared_experts=1, shared_gate=True), seed=2, layer_index=1)
    b = MoELayer(moe_cfg(num_shared_experts=1, shared_gate=True), seed=2, layer_index=1)
    c = MoELayer(moe_cfg(num_shared_experts=1, shared_gate=True), seed=2, layer_index=2)
    assert torch.equal(a.shared_gate.weight, b.shared_gate.weight)
    assert not torch.equal(a.shared_gate.weight, c.shared_gate.weight)
    assert getattr(a.shared_gate.weight, "allreduce", True)  # DP-reduced, not an expert parameter
    # The ungated shared expert draws the same weights as before the gate existed.
    plain = MoELayer(moe_cfg(num_shared_experts=1), seed=2, layer_index=1)
    assert torch.equal(plain.shared.w_in_DI, a.shared.w_in_DI)
