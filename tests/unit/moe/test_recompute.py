"""Expert-only recompute (`model.moe_recompute`, moe_dist/moe/recompute.py): the same losses and
gradients, bit for bit in fp32, with less peak memory, and the router and all-to-alls run once.

One process here; the EP=2 cases (bit-equality, call counts, buffers) are in
tests/distributed/test_recompute_ep.py.
"""

from __future__ import annotations

import pytest
import torch

from moe_dist.common.config import ConfigError
from moe_dist.common.tensor_memory import peak_tensor_mb
from moe_dist.model.config import parse_model_config
from moe_dist.model.transformer import MoETransformer
from moe_dist.moe.recompute import recompute_saved

V, B, S = 61, 2, 16
MODES = ("activation", "experts")


def make_cfg(recompute: str = "none", moe: dict | None = None, **model):
    base = dict(vocab_size=V, d_model=32, n_layers=3, n_heads=4, d_ff=64, max_seq_len=32, moe_every=2,
                moe_offset=0, num_labels=3, moe_recompute=recompute)
    moe_base = dict(num_experts=8, d_ff=64, top_k=4, capacity_factor=1.0, min_capacity=1,
                    aux_loss=dict(switch=0.01, z_loss=0.001))
    return parse_model_config(dict(base, **model), dict(moe_base, **(moe or {})))


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (B, S + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:], torch.randint(-1, 3, (B, S), generator=g)


def loss_and_grads(cfg, seed=0):
    model = MoETransformer(cfg, seed=7)
    x, y, d = batch(seed)
    out = model(x, y, d)
    out.loss.backward()
    return out, {n: p.grad for n, p in model.named_parameters()}, dict(model.named_buffers())


def assert_bit_equal(cfg_a, cfg_b):
    out_a, grads_a, buf_a = loss_and_grads(cfg_a)
    out_b, grads_b, buf_b = loss_and_grads(cfg_b)
    assert torch.equal(out_a.loss, out_b.loss)
    assert torch.equal(out_a.logits_BSV, out_b.logits_BSV)
    for name, g in grads_a.items():
        assert g is not None and torch.equal(g, grads_b[name]), name
    for name, b in buf_a.items():
        assert torch.equal(b, buf_b[name]), name
    for layer, stats in out_a.moe_stats.items():
        for key, value in stats.items():
            assert torch.equal(value, out_b.moe_stats[layer][key]), (layer, key)


MOE_CASES = [
    dict(),  # top-4 with capacity drops, SwiGLU
    dict(dropless=True, activation="gelu"),
    dict(num_shared_experts=1),
    dict(comet_active_fraction=0.5),  # COMET's mask is part of the recomputed activation
    dict(expert_impl="loop"),  # the portable backend saves views of the activation
    dict(router={"type": "inhibition", "mode": "subtractive", "stat": "ema"}),  # a router buffer
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("moe", MOE_CASES, ids=lambda c: ",".join(f"{k}" for k in c) or "base")
def test_recompute_is_bit_equal_to_none(mode, moe):
    activation = moe.pop("activation", "swiglu") if "activation" in moe else "swiglu"
    assert_bit_equal(make_cfg("none", moe, activation=activation), make_cfg(mode, moe, activation=activation))


@pytest.mark.parametrize("mode", MODES)
def test_recompute_with_attention_checkpointing_is_bit_equal(mode):
    assert_bit_equal(make_cfg("none", activation_checkpointing=True),
                     make_cfg(mode, activation_checkpointing=True))


def test_unknown_mode_is_a_config_error():
    with pytest.raises(ConfigError, match="moe_recompute"):
        make_cfg("everything")


def test_eval_under_no_grad_runs_without_recompute_machinery():
    model = MoETransformer(make_cfg("experts"), seed=1).eval()
    ref = MoETransformer(make_cfg("none"), seed=1).eval()
    x, _, _ = batch()
    with torch.no_grad():
        assert torch.equal(model(x).logits_BSV, ref(x).logits_BSV)


def test_recompute_saved_rebuilds_views_of_the_dropped_tensor():
    h = torch.randn(6, 4, requires_grad=True)
    w = torch.randn(4, 3, requires_grad=True)
    calls = []

    def rebuild():
        calls.append(1)
        return torch.tanh(h)

    a = torch.tanh(h).detach()  # stands in for the activation computed outside the block
    a.requires_grad_()
    with recompute_saved(a, rebuild):
        y = torch.cat([a[:2] @ w, a[2:] @ w])  # saves two views of a, and w
    del a
    y.sum().backward()
    assert calls == [1]  # one rebuild serves every view
    torch.testing.assert_close(w.grad, torch.tanh(h).detach().t() @ torch.ones(6, 3))


def test_recompute_lowers_peak_tensor_memory_of_an_all_moe_model():
    """All-MoE model, top-4 of 8, d_ff twice d_model: the experts' activations dominate."""
    peaks = {}
    for mode in ("none", *MODES):
        cfg = make_cfg(mode, dict(capacity_factor=2.0, d_ff=128), d_model=64, moe_every=1, n_layers=4,
                       max_seq_len=64)
        model = MoETransformer(cfg, seed=0)
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, V, (8, 65), generator=g)

        def step(model=model, tokens=tokens):
            model(tokens[:, :-1], tokens[:, 1:]).loss.backward()
            model.zero_grad(set_to_none=True)

        step()
        peaks[mode] = peak_tensor_mb(step)
    # The measured ratios are in BENCHMARKS.md ("Expert-only recompute"); the bounds leave room
    # for any backend.
    assert peaks["activation"] < 0.85 * peaks["none"], peaks
    assert peaks["experts"] < 0.8 * peaks["activation"], peaks


def _held_after(fn) -> int:
    """Bytes allocated by `fn()` and still held when it returns (its result included)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    del out
    return sum(e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")


@pytest.mark.parametrize("mode,kept_per_row", [("none", 4), ("activation", 2), ("experts", 0)])
def test_experts_keep_exactly_what_the_mode_says(mode, kept_per_row):
    """What a forward of the experts leaves held for the backward, per routed row, in widths of
    F: the first projection's output (2F, SwiGLU) under `activation`, nothing under `experts`
    (beyond the output, which the combine keeps); without recompute also silu(gate) and the
    activation (F each). A dropped tensor held by a hook fails this. Slack: a few KiB of
    bookkeeping (segment offsets) against 128 KiB per F."""
    from moe_dist.moe.experts import GroupedExperts

    M, D, Fw, e = 512, 16, 64, 4
    experts = GroupedExperts(e, D, Fw, "swiglu", first_expert=0, seed=0, layer_index=0, init_std=0.02,
                             recompute=mode)
    source = torch.randn(128, D, requires_grad=True)
    index = torch.randint(0, 128, (M,), generator=torch.Generator().manual_seed(0))
    held = []

    def forward():
        y = experts(source, index, [M // e] * e)
        held.append(y)

    extra = _held_after(forward) - M * D * 4  # minus the output
    assert abs(extra - kept_per_row * M * Fw * 4) < 16 * 1024, (extra, kept_per_row * M * Fw * 4)
    held[0].sum().backward()  # and the backward still runs on what was kept
    assert experts.w_in_EDI.grad is not None
