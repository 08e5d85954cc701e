"""Padding (MoESideInputs.valid_T) is invisible: a padded batch and the same batch without its
padding give the same losses of every scope, routing statistics, aux-loss-free bias update,
outputs and gradients (issue 22, acceptance 2), also for the routers that route by population
statistics (inhibition, centred fixed_projection) and the sample-similarity loss; padding takes no
capacity from real tokens; the scopes' config is strict."""

from __future__ import annotations

import pytest
import torch
from tests.harness.dist import assert_grads_and_adamw_step_match

from moe_dist.common.config import ConfigError
from moe_dist.moe.balance import sequence_segments
from moe_dist.moe.capacity import assign_slots
from moe_dist.moe.config import BALANCE_SCOPES, MoEConfig
from moe_dist.moe.layer import MoELayer, MoESideInputs
from moe_dist.train.moe_metrics import step_load

B, S, D, E, K, LABELS = 3, 7, 16, 8, 2, 3
TOL = dict(rtol=1e-5, atol=1e-6)
SUMMABLE = ("tokens_per_expert", "tokens_per_expert_kept", "num_tokens", "importance", "entropy_token_sum",
            "expert_label_counts")


def make_layer(scope: str, **moe) -> MoELayer:
    cfg = MoEConfig.from_dict(dict(
        d_model=D, d_ff=64, num_experts=E, top_k=K, dropless=True,
        router={"type": "topk", "bias_balancing": True},
        aux_loss=dict(switch=0.1, importance=0.1, z_loss=0.01, switch_scope=scope, importance_scope=scope), **moe))
    return MoELayer(cfg, seed=3)


@pytest.mark.parametrize("scope", BALANCE_SCOPES)
def test_padded_batch_equals_the_batch_without_its_padding(scope):
    gen = torch.Generator().manual_seed(BALANCE_SCOPES.index(scope))
    padded, unpadded = make_layer(scope), make_layer(scope)
    steps = []
    for _ in range(2):  # two micro batches: the global_batch scope's running counts too
        lengths = torch.tensor([S, 4, 0])
        valid_BS = torch.arange(S)[None, :] < lengths[:, None]
        x = torch.randn(B, S, D, generator=gen)
        x = torch.where(valid_BS[..., None], x, 1e3 * torch.randn(B, S, D, generator=gen))
        labels = torch.randint(0, LABELS, (B, S), generator=gen)
        steps.append((x, valid_BS, labels, torch.randn(B, S, D, generator=gen)))

    outs = {"padded": [], "unpadded": []}
    running = {"padded": None, "unpadded": None}
    for x, valid_BS, labels, G in steps:
        real = valid_BS.reshape(-1)
        rows_T = torch.arange(B).repeat_interleave(S)[real]
        x_pad = x.clone().requires_grad_()
        x_real = x.reshape(-1, D)[real].clone().requires_grad_()
        # The batch without padding: the real tokens alone, as one [T, D] row whose documents are
        # the padded batch's rows (what the sequence scope takes as its sequences).
        for name, layer, inp, side, G_used in (
                ("padded", padded, x_pad, MoESideInputs(labels_T=labels.reshape(-1), num_labels=LABELS,
                                                        valid_T=real), G * valid_BS[..., None]),
                ("unpadded", unpadded, x_real, MoESideInputs(labels_T=labels.reshape(-1)[real], num_labels=LABELS,
                                                             segment_ids_T=rows_T), G.reshape(-1, D)[real])):
            side = MoESideInputs(labels_T=side.labels_T, num_labels=LABELS, valid_T=side.valid_T,
                                 segment_ids_T=side.segment_ids_T,
                                 step_counts=None if running[name] is None else {0: running[name]})
            out = layer(inp, side)
            running[name] = out.step_counts
            ((out.y * G_used).sum() + out.aux_loss).backward()
            outs[name].append((out, inp))

    for (out_p, x_p), (out_u, x_u), (_, valid_BS, _, _) in zip(outs["padded"], outs["unpadded"], steps):
        real = valid_BS.reshape(-1)
        assert out_p.losses.keys() == out_u.losses.keys()
        for name in out_p.losses:
            torch.testing.assert_close(out_p.losses[name], out_u.losses[name], **TOL, msg=lambda m: f"{name}: {m}")
        for name, value in out_u.stats.items():
            torch.testing.assert_close(out_p.stats[name], value, **TOL, msg=lambda m: f"stat {name}: {m}")
        torch.testing.assert_close(out_p.y.reshape(-1, D)[real], out_u.y, **TOL)
        assert (out_p.y.reshape(-1, D)[~real] == 0).all()  # padding reaches no expert
        torch.testing.assert_close(x_p.grad.reshape(-1, D)[real], x_u.grad, **TOL)
        assert (x_p.grad.reshape(-1, D)[~real] == 0).all()
        assert out_u.stats["num_tokens"].item() == real.sum().item()
    assert_grads_and_adamw_step_match(padded, unpadded, lambda _, t: t, f"scope {scope}", **TOL)

    # The aux-loss-free bias update reads the step's load: the same, so the same nudge.
    for name, layer in (("padded", padded), ("unpadded", unpadded)):
        load = step_load([{0: out.stats} for out, _ in outs[name]])[0]
        layer.router.after_step(load)
    torch.testing.assert_close(padded.router.selection_bias_E, unpadded.router.selection_bias_E)
    assert padded.router.selection_bias_E.abs().sum() > 0


POPULATION_ROUTERS = {
    "inhibition_subtractive_batch": (dict(type="inhibition", mode="subtractive", stat="batch"), {}),
    "inhibition_divisive_ema": (dict(type="inhibition", mode="divisive", stat="ema", momentum=0.5), {}),
    "inhibition_subspace_batch": (dict(type="inhibition", mode="subspace", stat="batch", rank=2), {}),
    "fixed_projection_centred": (dict(type="fixed_projection", center=True, center_stat="ema",
                                      center_momentum=0.5), {}),
    "attentive_sample_similarity": (dict(type="attentive", hidden=8), dict(sample_similarity=0.5)),
}


@pytest.mark.parametrize("name", POPULATION_ROUTERS)
def test_padding_is_in_no_population_statistic_or_sample_similarity(name):
    """Padding far from the real tokens (1e3 x) would move every batch mean, variance, second
    moment and distance it entered, and with them the real tokens' routes."""
    router, aux = POPULATION_ROUTERS[name]
    cfg = MoEConfig.from_dict(dict(d_model=D, d_ff=64, num_experts=E, top_k=K, dropless=True, router=router,
                                   aux_loss=dict(switch=0.1, z_loss=0.01, **aux)))
    padded, unpadded = MoELayer(cfg, seed=5), MoELayer(cfg, seed=5)
    gen = torch.Generator().manual_seed(11)
    for _ in range(2):  # the second step routes by the first's EMAs
        valid_BS = torch.arange(S)[None, :] < torch.tensor([S, 3, 5])[:, None]
        real = valid_BS.reshape(-1)
        x = torch.randn(B * S, D, generator=gen)
        x = torch.where(real[:, None], x, 1e3 * torch.randn(B * S, D, generator=gen))
        G = torch.randn(B * S, D, generator=gen)
        x_pad, x_real = x.clone().requires_grad_(), x[real].clone().requires_grad_()
        out_p = padded(x_pad, MoESideInputs(valid_T=real))
        out_u = unpadded(x_real)
        for out, y_G in ((out_p, out_p.y * G * real[:, None]), (out_u, out_u.y * G[real])):
            (y_G.sum() + (0.0 if out.aux_loss is None else out.aux_loss)).backward()
        assert out_p.losses.keys() == out_u.losses.keys()
        if aux:
            assert "sample_similarity" in out_p.losses
        for loss in out_p.losses:
            torch.testing.assert_close(out_p.losses[loss], out_u.losses[loss], **TOL, msg=lambda m: f"{loss}: {m}")
        torch.testing.assert_close(out_p.y[real], out_u.y, **TOL)
        torch.testing.assert_close(x_pad.grad[real], x_real.grad, **TOL)
    for key, value in unpadded.router.state_dict().items():  # the EMAs and counters
        torch.testing.assert_close(padded.router.state_dict()[key], value, **TOL, msg=lambda m: f"{key}: {m}")
    assert_grads_and_adamw_step_match(padded, unpadded, lambda _, t: t, name, **TOL)


def test_the_similarity_subsample_draws_real_tokens_first():
    from moe_dist.routing.regularizers import subsample
    valid = torch.ones(40, dtype=torch.bool)
    valid[::3] = False
    every = subsample(40, 10)
    assert subsample(40, 10, valid_T=torch.ones(40, dtype=torch.bool)).tolist() == every.tolist()
    pick = subsample(40, 10, valid_T=valid)
    assert valid[pick].all() and len(set(pick.tolist())) == 10
    few = torch.zeros(40, dtype=torch.bool)
    few[:4] = True
    assert set(subsample(40, 10, valid_T=few).tolist()) >= {0, 1, 2, 3}


@pytest.mark.parametrize("policy", ["position", "probs"])
def test_padding_takes_no_capacity(policy):
    gen = torch.Generator().manual_seed(0)
    T, num_groups = 12, 2
    idx = torch.randint(0, 3, (T, 2), generator=gen)
    idx[:, 1] = (idx[:, 0] + 1) % 3
    idx[:4, 0] = 0  # padding first in position order, all on expert 0: it would take its slots
    idx[6:9, 0] = 0
    w = torch.rand(T, 2, generator=gen)
    w[:4] += 10  # and the highest weights under the probs policy
    w[6:9] += 10
    valid = torch.ones(T, dtype=torch.bool)
    valid[:3] = False
    valid[6:8] = False
    plan = assign_slots(idx, 3, capacity=2, policy=policy, priority_TK=w, num_groups=num_groups, valid_T=valid)
    assert not plan.keep_TK[~valid].any()
    # Each group's real tokens alone, with the same capacity, keep exactly what they keep here.
    G = T // num_groups
    for g in range(num_groups):
        sel = valid[g * G:(g + 1) * G]
        alone = assign_slots(idx[g * G:(g + 1) * G][sel], 3, capacity=2, policy=policy,
                             priority_TK=w[g * G:(g + 1) * G][sel])
        assert plan.keep_TK[g * G:(g + 1) * G][sel].tolist() == alone.keep_TK.tolist()
    real_pairs = idx[valid].reshape(-1)
    assert plan.load_E.tolist() == torch.bincount(real_pairs, minlength=3).tolist()
    assert plan.kept_E.sum() == plan.keep_TK.sum()
    # Without the mask the padding does take expert 0's slots (what the mask prevents).
    unmasked = assign_slots(idx, 3, capacity=2, policy=policy, priority_TK=w, num_groups=num_groups)
    assert unmasked.keep_TK[valid].sum() < plan.keep_TK[valid].sum()


def test_scope_config_is_strict_and_defaults_to_dp_global():
    cfg = MoEConfig.from_dict(dict(d_model=8, d_ff=8, num_experts=4))
    assert cfg.aux_loss.scopes() == {"switch": "dp_global", "importance": "dp_global"}
    with pytest.raises(ConfigError, match=r"aux_loss\.switch_scope must be one of .*'per_token'"):
        MoEConfig.from_dict(dict(d_model=8, d_ff=8, num_experts=4, aux_loss=dict(switch_scope="per_token")))
    with pytest.raises(ConfigError, match="importance_scope"):
        MoEConfig.from_dict(dict(d_model=8, d_ff=8, num_experts=4, aux_loss=dict(importance_scope=1)))


def test_sequence_scope_needs_sequences():
    with pytest.raises(ValueError, match="sequence balance scope needs a \\[B, S, D\\] input"):
        sequence_segments(torch.Size([12, D]), None, "cpu")
    segments = sequence_segments(torch.Size([2, 3, D]), torch.tensor([0, 0, 1, 0, 1, 1]), "cpu")
    assert segments.key_T.tolist() == [0, 0, 1, 3, 4, 4] and segments.count == 6
    layer = make_layer("sequence")
    with pytest.raises(ValueError, match="segment_ids_T"):
        layer(torch.randn(12, D))


def test_side_input_masks_are_checked():
    with pytest.raises(ValueError, match="valid_T must be a bool tensor"):
        MoESideInputs(valid_T=torch.ones(4))
    with pytest.raises(ValueError, match="segment_ids_T must be an integer tensor"):
        MoESideInputs(segment_ids_T=torch.zeros(4))
    with pytest.raises(ValueError, match="valid_T has 5 entries for the input's 4 tokens"):
        make_layer("dp_global")(torch.randn(4, D), MoESideInputs(valid_T=torch.ones(5, dtype=torch.bool)))
