"""Single-process properties of the MoE layer: dense equivalence, initialisation, determinism,
statistics, DeepSpeed parameter tags, config errors."""

import math

import pytest
import torch

from moe_dist.common.config import ConfigError
from moe_dist.moe.config import MoEConfig
from moe_dist.moe.experts import DenseFFN, GroupedExperts
from moe_dist.moe.layer import MoELayer, MoESideInputs


def cfg(**kw) -> MoEConfig:
    base = dict(d_model=16, d_ff=32, num_experts=8, top_k=2, min_capacity=1)
    return MoEConfig.from_dict({**base, **kw})


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_single_expert_without_drops_equals_dense_ffn(activation):
    layer = MoELayer(cfg(num_experts=1, top_k=1, capacity_factor=1.0, activation=activation), seed=5)
    dense = DenseFFN(16, 32, activation, init_std=0.02)
    with torch.no_grad():
        dense.w_in_DI.copy_(layer.experts.w_in_EDI[0])
        dense.w_out_FD.copy_(layer.experts.w_out_EFD[0])
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
    torch.testing.assert_close(upper_half.w_in_EDI, all8.w_in_EDI[4:], rtol=0, atol=0)
    torch.testing.assert_close(quarter.w_out_EFD, all8.w_out_EFD[2:4], rtol=0, atol=0)
    other_layer = GroupedExperts(8, first_expert=0, **{**kw, "layer_index": 3})
    assert not torch.equal(other_layer.w_in_EDI, all8.w_in_EDI)


def test_layer_weights_do_not_depend_on_global_rng():
    torch.manual_seed(0)
    a = MoELayer(cfg(num_shared_experts=1), seed=9, layer_index=1)
    torch.manual_seed(123)
    b = MoELayer(cfg(num_shared_experts=1), seed=9, layer_index=1)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


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
    s = layer(x, MoESideInputs(labels_T=labels, num_labels=3)).stats
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

    with pytest.raises(ConfigError, match=r"world size \(1\) must be divisible by ep_size \(2\)"):
        MoELayer(cfg(ep_size=2), groups=ParallelGroups.single())
    # Sizes that divide, but groups built for another ep_size: the same class of error.
    with pytest.raises(ConfigError, match=r"moe.ep_size \(2\) differs from the process groups' ep_size \(1\)"):
        MoELayer(cfg(ep_size=2), groups=ParallelGroups(world_size=2, rank=0, ep_size=1))


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
