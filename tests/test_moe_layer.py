"""Single-process properties of the MoE layer: dense equivalence, initialisation, determinism,
statistics, DeepSpeed parameter tags, config errors."""

import math

import pytest
import torch
from gemm_check import assert_mkl_matches_the_loop

from moe_dist.common.config import ConfigError
from moe_dist.kernels.cpu import mkl_grouped
from moe_dist.moe.config import MoEConfig
from moe_dist.moe.experts import DenseFFN, GroupedExperts, grouped_matmul
from moe_dist.moe.layer import MoELayer


def cfg(**kw) -> MoEConfig:
    base = dict(d_model=16, d_ff=32, num_experts=8, top_k=2, min_capacity=1)
    return MoEConfig.from_dict({**base, **kw})


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_single_expert_without_drops_equals_dense_ffn(activation):
    layer = MoELayer(cfg(num_experts=1, top_k=1, capacity_factor=1.0, activation=activation), seed=5)
    dense = DenseFFN(16, 32, activation, init_std=0.02)
    with torch.no_grad():
        dense.w_in_DF.copy_(layer.experts.w_in_eDF[0])
        dense.w_out_FD.copy_(layer.experts.w_out_eFD[0])
    x = torch.randn(3, 10, 16)
    out = layer(x)
    assert float(out.stats["dropped_fraction"]) == 0.0
    # One expert: softmax over one logit is 1, so the combine weight is exactly 1.
    torch.testing.assert_close(out.y, dense(x), rtol=1e-6, atol=1e-7)


def test_expert_weights_do_not_depend_on_ep_size():
    kw = dict(d_model=8, d_ff=12, activation="swiglu", seed=3, layer_index=2, init_std=0.02)
    all8 = GroupedExperts(8, first_expert=0, **kw)
    upper_half = GroupedExperts(4, first_expert=4, **kw)
    quarter = GroupedExperts(2, first_expert=2, **kw)
    torch.testing.assert_close(upper_half.w_in_eDF, all8.w_in_eDF[4:], rtol=0, atol=0)
    torch.testing.assert_close(quarter.w_out_eFD, all8.w_out_eFD[2:4], rtol=0, atol=0)
    other_layer = GroupedExperts(8, first_expert=0, **{**kw, "layer_index": 3})
    assert not torch.equal(other_layer.w_in_eDF, all8.w_in_eDF)


def test_layer_weights_do_not_depend_on_global_rng():
    torch.manual_seed(0)
    a = MoELayer(cfg(num_shared_experts=1), seed=9, layer_index=1)
    torch.manual_seed(123)
    b = MoELayer(cfg(num_shared_experts=1), seed=9, layer_index=1)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("impl,width", [("grouped_mm", 8), ("loop", 8), ("mkl", 8), ("mkl", 5),
                                        ("auto", 8), ("auto", 5)])
def test_grouped_matmul_matches_per_expert_matmul(impl, width):
    # width 5 (20-byte rows) is not 16-byte aligned: "auto" must fall back instead of failing.
    x = torch.randn(11, 4)
    w = torch.randn(3, 4, width)
    counts = [4, 0, 7]  # an expert with no rows
    y = grouped_matmul(x, w, counts, impl)
    torch.testing.assert_close(y, torch.cat([x[:4] @ w[0], x[4:] @ w[2]]))


@pytest.mark.parametrize("counts", [[5, 0, 9, 2], [0, 0, 0, 0], [16, 0, 0, 0]])
def test_mkl_grouped_matmul_gradients_match_the_loop(counts):
    """MKL's batch GEMM path (forward, input grad, weight grad; empty experts get zero weight
    grads) against per-expert matmuls, on fresh random data."""
    if not mkl_grouped.available(torch.randn(1, 4), torch.randn(1, 4, 4)):
        pytest.skip("this PyTorch build has no usable MKL batch GEMM")
    w = torch.randn(4, 12, 20)
    mkl_grads = assert_mkl_matches_the_loop(torch.randn(sum(counts), 12), w, counts)
    assert torch.equal(mkl_grads[torch.tensor(counts) == 0], torch.zeros_like(w[torch.tensor(counts) == 0]))


def test_large_segments_are_gemms_of_their_own(monkeypatch):
    """Segments of at least OWN_GEMM_ROWS_PER_THREAD rows per thread run as separate GEMMs over
    every thread; only the others go to the batch call. Both kinds in one call agree with the
    per-expert loop in the forward, the input gradient and the weight gradient."""
    if not mkl_grouped.available(torch.randn(1, 4), torch.randn(1, 4, 4)):
        pytest.skip("this PyTorch build has no usable MKL batch GEMM")
    monkeypatch.setattr(mkl_grouped, "OWN_GEMM_ROWS_PER_THREAD", 8 / torch.get_num_threads())
    batched = []
    real_call = mkl_grouped._call
    monkeypatch.setattr(mkl_grouped, "_call", lambda *a: (batched.append(a[2].tolist()), real_call(*a)))
    counts = [9, 3, 0, 8, 1]  # 9 and 8 rows: their own GEMMs; 3, 0 and 1: batched
    assert_mkl_matches_the_loop(torch.randn(21, 12), torch.randn(5, 12, 20), counts)
    # forward, input gradient: rows per batched GEMM; weight gradient: its K is the rows
    assert batched[0] == [3, 0, 1] and batched[1] == [3, 0, 1], batched
    assert len(batched) == 3 and sorted(batched[2]) == [12, 12, 12], batched


def test_backward_chunks_hold_enough_experts_for_one_batch_call():
    chunks = mkl_grouped._expert_chunks
    counts = [10] * 40
    # 8 chunks of 50 rows would be 5 experts each; at least 16 experts per chunk: 16, 16, 8
    assert [(e0, e1) for e0, e1, _, _ in chunks(counts, 8, 16)] == [(0, 16), (16, 32), (32, 40)]
    assert [(r0, r1) for _, _, r0, r1 in chunks(counts, 8, 16)] == [(0, 160), (160, 320), (320, 400)]
    # a segment big enough for a GEMM of its own closes its chunk early
    big = mkl_grouped.OWN_GEMM_ROWS_PER_THREAD * torch.get_num_threads()
    assert [(e0, e1) for e0, e1, _, _ in chunks([big, big, 1, 1], 4, 16)] == [(0, 1), (1, 2), (2, 4)]


def test_gather_segment_matmul_matches_gather_then_matmul(monkeypatch):
    """The fused gather (chunked, gradient added straight into the source rows) against
    index_select + per-expert matmuls: duplicate rows (top-2), an empty expert, several chunks."""
    if not mkl_grouped.available(torch.randn(1, 4), torch.randn(1, 4, 4)):
        pytest.skip("this PyTorch build has no usable MKL batch GEMM")
    monkeypatch.setattr(mkl_grouped._GatherSegmentMatmul, "CHUNKS", 3)
    counts = [6, 0, 9, 3, 4]
    source = torch.randn(15, 12)
    index = torch.randint(0, 15, (sum(counts),))
    w = torch.randn(5, 12, 20)
    grad_y = torch.randn(sum(counts), 20)
    fused = [source.clone().requires_grad_(), w.clone().requires_grad_()]
    y = mkl_grouped.gather_segment_matmul(fused[0], index, fused[1], counts)
    y.backward(grad_y)
    plain = [source.clone().requires_grad_(), w.clone().requires_grad_()]
    y_ref = grouped_matmul(plain[0].index_select(0, index), plain[1], counts, "loop")
    y_ref.backward(grad_y)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)


def test_segment_ops_read_and_write_expanded_stacks_in_place():
    """An expanded weight stack (every expert the same matrix) is read without materialising it,
    and an expanded gradient buffer is written in place: how tools/bench_expert_gemms.py times the
    experts' GEMMs with their weights held in cache. Other layouts of `out` are refused."""
    if not mkl_grouped.available(torch.randn(1, 4), torch.randn(1, 4, 4)):
        pytest.skip("this PyTorch build has no usable MKL batch GEMM")
    E, K, P = 2048, 64, 64  # the expanded stacks would be 32 MiB as copies
    counts = [1] * E
    x, g, w = torch.randn(E, K), torch.randn(E, P), torch.randn(K, P)
    y = torch.empty(E, P)
    assert _peak_mib(lambda: mkl_grouped.segment_mm(x, w.expand(E, K, P), counts, False, out=y)) < 1
    torch.testing.assert_close(y, x @ w, rtol=1e-5, atol=1e-5)
    assert _peak_mib(lambda: mkl_grouped.segment_mm(g, w.expand(E, K, P), counts, True, out=x)) < 1
    shared = torch.empty(K, P).expand(E, K, P)  # every expert overwrites it: timing only
    assert _peak_mib(lambda: mkl_grouped.segment_outer(x, g, counts, out=shared)) < 1
    with pytest.raises(ValueError, match="expanded"):
        mkl_grouped.segment_outer(x, g, counts, out=torch.empty(E, P, K).transpose(1, 2))


def _peak_step_mib(layer: MoELayer, x: torch.Tensor) -> float:
    """Peak bytes held by tensors allocated during one forward+backward (profiler events)."""
    return _peak_mib(lambda: layer(x).y.square().sum().backward())


def _peak_mib(fn) -> float:
    """Peak bytes held by tensors allocated while `fn()` runs (profiler events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    held = peak = 0
    for e in events:
        held += e.nbytes()
        peak = max(peak, held)
    return peak / 2**20


def test_fused_gather_lowers_the_layers_peak_memory():
    """The reason for `gather_segment_matmul`: the backward no longer holds the k-fold gathered
    input and its gradient next to the expert weight gradients."""
    if not mkl_grouped.available(torch.randn(1, 4), torch.randn(1, 4, 4)):
        pytest.skip("this PyTorch build has no usable MKL batch GEMM")
    peaks = {}
    for impl in ("mkl", "grouped_mm"):
        layer = MoELayer(cfg(d_model=64, d_ff=128, top_k=2, expert_impl=impl), seed=0)
        x = torch.randn(1024, 64, requires_grad=True)
        _peak_step_mib(layer, x)  # warm: lazy one-time allocations are not the step's
        peaks[impl] = _peak_step_mib(layer, x)
    # At the peak the plain path also holds the gathered input and its gradient (2 x 0.5 MiB,
    # 2048 rows x 64); the fused one holds the source's gradient (0.25 MiB) and a chunk instead.
    assert peaks["mkl"] <= peaks["grouped_mm"] - 0.4, peaks


def test_mkl_impl_is_refused_at_build_without_mkl(monkeypatch):
    monkeypatch.setattr(mkl_grouped, "available", lambda x, w: False)
    with pytest.raises(ValueError, match="expert_impl 'mkl'"):
        MoELayer(cfg(expert_impl="mkl"), seed=0)
    MoELayer(cfg(expert_impl="auto"), seed=0)  # auto falls back


def test_mkl_impl_refuses_what_it_cannot_run():
    with pytest.raises(RuntimeError, match="expert_impl 'mkl'"):
        grouped_matmul(torch.randn(3, 4, dtype=torch.float64), torch.randn(1, 4, 4, dtype=torch.float64), [3], "mkl")
    with pytest.raises(ValueError, match="must sum to the 3 rows"):
        mkl_grouped.segment_matmul(torch.randn(3, 4), torch.randn(2, 4, 4), [1, 1])


def test_eval_is_deterministic_and_uses_eval_capacity():
    layer = MoELayer(cfg(capacity_factor=0.5, eval_capacity_factor=4.0,
                         router={"type": "topk", "jitter_eps": 0.1}), seed=1)
    x = torch.randn(64, 16)
    layer.eval()
    a, b = layer(x), layer(x)
    assert torch.equal(a.y, b.y)
    assert float(a.stats["dropped_fraction"]) == 0.0  # cf 4.0 at eval
    layer.train()
    assert float(layer(x).stats["dropped_fraction"]) > 0.0  # cf 0.5 in training


def test_dropped_tokens_contribute_zero():
    layer = MoELayer(cfg(top_k=1, capacity_factor=0.25), seed=2)
    x = torch.randn(32, 16)
    out = layer(x)
    kept_tokens = int(out.stats["tokens_per_expert_kept"].sum())
    assert kept_tokens < 32
    # k=1: a token whose only slot was dropped gets exactly zero (it keeps its residual).
    assert int((out.y.abs().sum(-1) == 0).sum()) == 32 - kept_tokens


def test_statistics_values():
    layer = MoELayer(cfg(top_k=1, capacity_factor=0.0), seed=4)
    x = torch.randn(40, 16)
    labels = torch.randint(0, 3, (40,))
    labels[:5] = -1  # unlabelled tokens are ignored
    s = layer(x, labels=labels, num_labels=3).stats
    assert float(s["tokens_per_expert"].sum()) == 40
    assert float(s["dropped_fraction"]) == 0.0
    load = s["tokens_per_expert"]
    torch.testing.assert_close(s["load_cv"], load.std(unbiased=False) / load.mean())
    assert 0 <= float(s["entropy_token"]) <= math.log(8) + 1e-6
    assert float(s["entropy_token"]) <= float(s["entropy_mean"]) + 1e-6  # concavity of entropy
    assert float(s["expert_label_counts"].sum()) == 35
    assert 0.0 <= float(s["mi_label_normalized"]) <= 1.0


def test_mutual_information_extremes():
    from moe_dist.moe.stats import mutual_information

    _, perfect = mutual_information(torch.tensor([[10.0, 0.0], [0.0, 10.0]]))
    _, none = mutual_information(torch.tensor([[5.0, 5.0], [5.0, 5.0]]))
    assert float(perfect) == pytest.approx(1.0)
    assert float(none) == pytest.approx(0.0, abs=1e-7)


def test_expert_params_tagged_for_deepspeed():
    layer = MoELayer(cfg(num_shared_experts=1), seed=0)
    for name, p in layer.named_parameters():
        if name.startswith("experts."):
            assert p.allreduce is False and p.group_name == "ep_size_1"
        else:
            assert getattr(p, "allreduce", True) is True, name


def test_aux_loss_uses_coefficients():
    layer = MoELayer(cfg(aux_loss=dict(switch=0.5, z_loss=0.0, importance=2.0)), seed=0)
    out = layer(torch.randn(16, 16))
    expected = 0.5 * out.losses["switch"] + 2.0 * out.losses["importance"]
    torch.testing.assert_close(out.aux_loss, expected)
    assert "z_loss" in out.losses  # logged even with coefficient 0,
    # but without a graph: it would hold the router's [T, E] logits through the backward
    assert not out.losses["z_loss"].requires_grad
    assert out.losses["switch"].requires_grad and out.losses["importance"].requires_grad


@pytest.mark.parametrize("bad,message", [
    (dict(num_experts=6, ep_size=4), r"num_experts \(6\) must be divisible by moe.ep_size \(4\)"),
    (dict(top_k=9), r"top_k \(9\) must be <= moe.num_experts \(8\)"),
    (dict(drop_policy="random"), r"drop_policy must be one of \['position', 'probs'\], got 'random'"),
    (dict(capacity=2), r"unknown key\(s\) \['capacity'\]"),
    (dict(router={"type": "nope"}), r"router.type must be one of .*got 'nope'"),
    (dict(router={"type": "topk", "renorm": True}), r"unknown key\(s\) \['renorm'\]"),
    (dict(aux_loss={"switch": -1}), r"aux_loss.switch must be a number >= 0, got -1"),
    (dict(d_model=0), r"moe.d_model must be an integer >= 1, got 0"),
])
def test_config_errors_name_the_value(bad, message):
    with pytest.raises(ConfigError, match=message):
        cfg(**bad)


def test_layer_rejects_groups_that_disagree_with_config():
    from moe_dist.parallel.groups import ParallelGroups

    with pytest.raises(ValueError, match=r"ep_size \(2\)"):
        MoELayer(cfg(ep_size=2), groups=ParallelGroups.single())


def test_comet_mask_inside_experts_keeps_k_hidden_units():
    from moe_dist.routing.comet import active_units

    full = MoELayer(cfg(capacity_factor=0.0), seed=6)
    masked = MoELayer(cfg(capacity_factor=0.0, comet_active_fraction=0.25), seed=6)
    all_on = MoELayer(cfg(capacity_factor=0.0, comet_active_fraction=1.0), seed=6)
    x = torch.randn(20, 16)
    torch.testing.assert_close(all_on(x).y, full(x).y)  # p_k = 1 masks nothing
    hidden = []
    masked.experts.hidden_mask.register_forward_hook(lambda m, args, out: hidden.append(out))
    assert not torch.allclose(masked(x).y, full(x).y)
    # SwiGLU hidden width is d_ff = 32: each routed row keeps exactly round(0.25 * 32) = 8 units.
    active_per_row = (hidden[0] != 0).sum(-1)
    assert int(active_per_row.max()) == active_units(32, 0.25) == 8
    assert "experts.hidden_mask.v_eDF" not in masked.state_dict()  # rebuilt from the seed, never loaded
    with pytest.raises(ConfigError, match=r"comet_active_fraction must be in \(0, 1\] or null, got 1.5"):
        cfg(comet_active_fraction=1.5)
