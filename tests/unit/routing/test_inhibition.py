"""Neural-inhibition router (docs/routers/inhibition.md): the invariances and identities its math
promises."""

import pytest
import torch

from moe_dist.common.config import ConfigError
from moe_dist.routing.base import RoutingContext
from moe_dist.routing.inhibition import top_directions
from moe_dist.routing.registry import build_router, router_config_from_dict

D, E = 16, 8
TRAIN, EVAL = RoutingContext(training=True), RoutingContext(training=False)


def make_router(seed=0, **cfg):
    torch.manual_seed(seed)
    return build_router(router_config_from_dict({"type": "inhibition", **cfg}), d_model=D, num_experts=E,
                        top_k=2, layer_index=0)


def tokens(T=64, seed=1):
    return torch.randn(T, D, generator=torch.Generator().manual_seed(seed))


SHIFT = 3.0 * torch.randn(D, generator=torch.Generator().manual_seed(99))


@pytest.mark.parametrize("mode", ["subtractive", "rectified"])
def test_batch_statistic_makes_routing_invariant_to_a_vector_added_to_every_token(mode):
    x = tokens()
    plain = make_router(mode=mode, stat="batch")(x, TRAIN)
    shifted = make_router(mode=mode, stat="batch")(x + SHIFT, TRAIN)
    assert torch.equal(plain.idx_TK, shifted.idx_TK)
    torch.testing.assert_close(shifted.probs_TE, plain.probs_TE, rtol=0, atol=1e-5)


def test_without_inhibition_the_same_shift_changes_routing():
    # The control for the invariance tests: the shift is large enough to move a plain gate.
    x = tokens()
    router = make_router(mode="subtractive", stat="batch")
    moved = router.gate(x + SHIFT).topk(2).indices != router.gate(x).topk(2).indices
    assert moved.any(dim=1).float().mean() > 0.3


def test_ema_statistic_makes_routing_shift_invariant_once_it_has_adapted():
    # Same batches; one router's stream is shifted after 100 steps, then adapts for 700 (m^700 ~ 1e-3).
    adapted, reference = make_router(stat="ema"), make_router(stat="ema")
    for step in range(800):
        batch = tokens(seed=100 + step)
        adapted(batch + (SHIFT if step >= 100 else 0.0), TRAIN)
        reference(batch, TRAIN)
    x = tokens(T=256, seed=5)
    out, ref = adapted(x + SHIFT, EVAL), reference(x, EVAL)
    assert (out.idx_TK == ref.idx_TK).all(dim=1).float().mean() > 0.98
    torch.testing.assert_close(out.probs_TE, ref.probs_TE, rtol=0, atol=1e-2)


@pytest.mark.parametrize("stat", ["batch", "ema"])
def test_linear_router_subtractive_inhibition_subtracts_each_experts_mean_logit(stat):
    # W (x - mu) = W x - mean_t W x_t: a data-driven per-expert bias (ema: bias-corrected, = batch at step 1).
    x = tokens()
    router = make_router(stat=stat)
    logits = router.gate(x)
    torch.testing.assert_close(router(x, TRAIN).logits_TE, logits - logits.mean(0), rtol=0, atol=1e-5)


def test_alpha_scales_the_subtracted_mean():
    x = tokens()
    router = make_router(stat="batch", alpha=0.5)
    logits = router.gate(x)
    torch.testing.assert_close(router(x, TRAIN).logits_TE, logits - 0.5 * logits.mean(0), rtol=0, atol=1e-5)


def test_divisive_standardizes_each_feature_and_ignores_per_feature_scale_and_shift():
    x = tokens(T=128)
    scale = torch.rand(D) * 4 + 0.5
    router = make_router(mode="divisive", stat="batch")
    u = router.inhibition(x, TRAIN)
    torch.testing.assert_close(u.mean(0), torch.zeros(D), rtol=0, atol=1e-5)
    torch.testing.assert_close(u.var(0, unbiased=False), torch.ones(D), rtol=0, atol=1e-3)
    torch.testing.assert_close(router.inhibition(x * scale + SHIFT, TRAIN), u, rtol=0, atol=1e-4)


def test_rectified_keeps_only_units_above_the_population():
    x = tokens()
    u = make_router(mode="rectified", stat="batch").inhibition(x, TRAIN)
    torch.testing.assert_close(u, torch.relu(x - x.mean(0)), rtol=0, atol=1e-6)


@pytest.mark.parametrize("stat", ["batch", "ema"])
def test_subspace_removes_a_shared_direction(stat):
    x = tokens(T=256) + SHIFT  # the shared component dominates E[x x^T]
    u = make_router(mode="subspace", stat=stat).inhibition(x, TRAIN)
    direction = SHIFT / SHIFT.norm()
    assert float((u @ direction).abs().max()) < 0.2  # x . direction is ~12 for every token
    assert float((x @ direction).abs().min()) > 5.0


def test_top_directions_are_the_leading_eigenvectors_with_a_fixed_sign():
    a = torch.randn(6, 6, generator=torch.Generator().manual_seed(3))
    second = a @ a.t()
    U = top_directions(second, 2)
    values, vectors = torch.linalg.eigh(second)
    torch.testing.assert_close(second @ U, U * values[-2:])
    torch.testing.assert_close(U @ U.t(), vectors[:, -2:] @ vectors[:, -2:].t())
    assert (U.gather(0, U.abs().argmax(0, keepdim=True)) > 0).all()


def test_subspace_ema_directions_refresh_every_n_steps():
    router = make_router(mode="subspace", stat="ema", refresh_every=3)
    first_axis, second_axis = torch.zeros(D), torch.zeros(D)
    first_axis[0], second_axis[1] = 10.0, 1000.0

    def step(shared):
        router(tokens() + shared, TRAIN)
        return router.inhibition.basis_DZ[:, 0].abs().argmax().item()

    assert step(first_axis) == 0  # step 1 refreshes
    assert step(second_axis) == 0  # steps 2 and 3 keep the directions of step 1
    assert step(second_axis) == 0
    assert step(second_axis) == 1  # step 4 = 1 + refresh_every refreshes from the EMA


def test_ema_is_bias_corrected_persistent_and_used_in_eval_only_as_read():
    x = tokens()
    router = make_router(stat="ema", momentum=0.9)
    router(x, TRAIN)
    # After one step the corrected EMA is the batch mean, not 0.1 of it.
    torch.testing.assert_close(router.inhibition.ema_statistics()["mean_D"], x.mean(0))
    state = {k: v.clone() for k, v in router.state_dict().items()}
    assert {"inhibition.ema_mean_D", "inhibition.num_updates"} <= state.keys()
    first = router(tokens(seed=7), EVAL)
    for k, v in router.state_dict().items():
        assert torch.equal(v, state[k]), f"eval changed {k}"
    restored = make_router(seed=123, stat="ema", momentum=0.9)
    restored.load_state_dict(state)
    assert torch.equal(restored(tokens(seed=7), EVAL).idx_TK, first.idx_TK)


def test_eval_before_any_training_step_does_not_inhibit():
    x = tokens()
    for mode in ("subtractive", "divisive", "subspace"):
        u = make_router(mode=mode).inhibition(x, EVAL)
        torch.testing.assert_close(u, x / (1.0 + 1e-5) ** 0.5 if mode == "divisive" else x)


def test_statistic_is_global_over_the_data_parallel_group():
    # A stand-in all-reduce adds a second rank holding `other`: the mean must be over both ranks.
    x, other = tokens(T=32, seed=1), tokens(T=32, seed=2)
    shards = [x, other]
    ctx = RoutingContext(training=True, dp_size=2,
                         all_reduce_sum=lambda t: t + torch.cat(
                             [torch.tensor([32.0]), other.sum(0)]))
    u = make_router(stat="batch").inhibition(x, ctx)
    torch.testing.assert_close(u, x - torch.cat(shards).mean(0), rtol=0, atol=1e-6)


def test_gradient_flows_to_the_input_but_not_through_the_statistic():
    x = tokens().requires_grad_()
    make_router(stat="batch").inhibition(x, TRAIN).sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))  # d(x - mu)/dx = I with mu detached


@pytest.mark.parametrize("bad,message", [
    (dict(mode="lateral"), r"router.mode must be one of .*got 'lateral'"),
    (dict(stat="running"), r"router.stat must be one of .*got 'running'"),
    (dict(momentum=1.0), r"router.momentum must be in \[0, 1\), got 1.0"),
    (dict(alpha=-1.0), r"router.alpha must be >= 0, got -1.0"),
    (dict(rank=0), r"router.rank must be an integer >= 1, got 0"),
    (dict(refresh_every=0), r"router.refresh_every must be an integer >= 1, got 0"),
    (dict(unknown=1), r"unknown key\(s\) \['unknown'\]"),
])
def test_config_errors_name_the_value(bad, message):
    with pytest.raises(ConfigError, match=message):
        router_config_from_dict({"type": "inhibition", **bad})


def test_subspace_rank_must_be_below_the_input_width():
    with pytest.raises(ConfigError, match=r"inhibition rank \(16, router.rank\) must be < the router input width \(16\)"):
        make_router(mode="subspace", rank=16)


def test_subspace_allows_two_forwards_before_one_backward():
    # The second forward refreshes the directions in place; the first forward's graph must not
    # hold the buffer itself.
    router = make_router(mode="subspace", stat="ema", refresh_every=1)
    first = router(tokens(seed=1).requires_grad_(), TRAIN)
    second = router(tokens(seed=2).requires_grad_(), TRAIN)
    (first.probs_TE.sum() + second.logits_TE.square().sum()).backward()
