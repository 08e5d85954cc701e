"""Padding (MoESideInputs.valid_T) is invisible: a padded batch and the same batch without its
padding give the same losses of every scope, routing statistics, aux-loss-free bias update,
outputs and gradients (issue 22, acceptance 2); padding takes no capacity from real tokens; the
scopes' config is strict."""

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
