"""Fixed random-projection routing, block COMET (docs/routers/fixed_projection.md): frozen,
identical everywhere, untouched by training, fooled by a shared component unless centred, and the
embedding stream."""

import pytest
import torch
from tests.harness.dist import run_distributed, shard

from moe_dist.common.config import ConfigError
from moe_dist.moe.config import MoEConfig
from moe_dist.moe.layer import MoELayer, MoESideInputs
from moe_dist.parallel.groups import ParallelGroups
from moe_dist.routing.base import RoutingContext
from moe_dist.routing.comet import kwta_mask
from moe_dist.routing.registry import router_config_from_dict

D, E = 16, 8
TRAIN, EVAL = RoutingContext(training=True), RoutingContext(training=False)


def layer_cfg(router: dict | None = None, **kw) -> MoEConfig:
    base = dict(d_model=D, d_ff=12, num_experts=E, top_k=2, min_capacity=1)
    return MoEConfig.from_dict({**base, **kw, "router": {"type": "fixed_projection", **(router or {})}})


def tokens(T=40, seed=1, width=D):
    return torch.randn(T, width, generator=torch.Generator().manual_seed(seed))


def test_projection_is_a_frozen_persistent_buffer_seeded_by_config_seed_and_layer():
    torch.manual_seed(0)
    layer = MoELayer(layer_cfg(), seed=5, layer_index=3)
    assert list(layer.router.parameters()) == []
    assert all(p is not layer.router.v_projection for p in layer.parameters())
    assert "router.v_projection" in layer.state_dict()
    v = layer.router.v_projection
    assert v.shape == (E, D) and not v.requires_grad and float(v.abs().max()) <= D ** -0.5
    torch.manual_seed(123)  # neither the global RNG nor the layer's seed moves V
    assert torch.equal(MoELayer(layer_cfg(), seed=6, layer_index=3).router.v_projection, v)
    assert not torch.equal(MoELayer(layer_cfg(), seed=5, layer_index=4).router.v_projection, v)
    assert not torch.equal(MoELayer(layer_cfg({"seed": 1}), seed=5, layer_index=3).router.v_projection, v)


@pytest.mark.parametrize("router", [{}, {"weights": "softmax"}, {"source": "embedding"}])
def test_routes_are_unchanged_by_a_training_step(router):
    layer = MoELayer(layer_cfg(router), seed=1)
    x, stream = tokens(), tokens(seed=2)
    before = layer.router(x, RoutingContext(training=True, stream_TD=stream))
    v = layer.router.v_projection.clone()
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1)
    out = layer(x.clone().requires_grad_(), MoESideInputs(stream_TD=stream))
    (out.y.square().sum()).backward()
    opt.step()
    after = layer.router(x, RoutingContext(training=True, stream_TD=stream))
    assert torch.equal(after.idx_TK, before.idx_TK)
    assert torch.equal(layer.router.v_projection, v)


def test_weights_uniform_and_softmax_and_no_distribution_or_aux_loss():
    x = tokens()
    uniform = MoELayer(layer_cfg(), seed=1)
    route = uniform.router(x, TRAIN)
    assert torch.equal(route.w_TK, torch.ones(40, 2)) and route.probs_TE is None and route.logits_TE is None
    scores = x @ uniform.router.v_projection.t()
    assert torch.equal(route.idx_TK, scores.topk(2).indices)
    torch.testing.assert_close(route.priority_TK, scores.gather(1, route.idx_TK))  # ranks tokens for "probs"
    out = uniform(x)
    assert out.losses == {} and out.aux_loss is None

    soft = MoELayer(layer_cfg({"weights": "softmax"}), seed=1).router(x, TRAIN)
    torch.testing.assert_close(soft.w_TK, torch.softmax(scores.gather(1, soft.idx_TK), -1))


@pytest.mark.parametrize("norm", [1.0, 2.0, 3.0])
def test_a_shared_component_overflows_capacity_unless_centred(norm):
    # Tokens of norm ~1 plus one shared vector: the frozen scores of a few experts win everywhere.
    g = torch.Generator().manual_seed(0)
    width = 32
    shared = torch.randn(width, generator=g)
    x = torch.randn(4096, width, generator=g) / width ** 0.5 + shared * (norm / shared.norm())
    dropped = {}
    for center in (False, True):
        layer = MoELayer(layer_cfg({"center": center}, d_model=width, d_ff=4, top_k=1, capacity_factor=1.25))
        with torch.no_grad():
            dropped[center] = float(layer(x).stats["dropped_fraction"])
    assert dropped[False] > 0.30
    assert dropped[True] < 0.05


def test_embedding_stream_chains_kwta_states_and_scores_expert_blocks():
    cfg = layer_cfg({"source": "embedding", "stream_active_fraction": 0.25})
    first, second = MoELayer(cfg, layer_index=0), MoELayer(cfg, layer_index=1)
    x, emb = tokens(), tokens(seed=2)

    def expected(router, z):
        c = z @ router.v_projection.t()
        z_next = kwta_mask(c, 4) * c  # 0.25 of 16 units
        return z_next, z_next.view(-1, E, D // E).sum(-1).topk(2).indices

    z1, idx1 = expected(first.router, emb)
    route1 = first.router(x, RoutingContext(training=True, stream_TD=emb))
    torch.testing.assert_close(route1.stream_TD, z1)
    assert torch.equal(route1.idx_TK, idx1)
    out1 = first(x, MoESideInputs(stream_TD=emb))
    assert torch.equal(out1.stream, route1.stream_TD)
    z2, idx2 = expected(second.router, z1)
    route2 = second.router(tokens(seed=9), RoutingContext(training=True, stream_TD=out1.stream))
    torch.testing.assert_close(route2.stream_TD, z2)
    assert torch.equal(route2.idx_TK, idx2)  # the hidden state plays no part


def test_embedding_stream_errors():
    layer = MoELayer(layer_cfg({"source": "embedding"}))
    with pytest.raises(ValueError, match="needs the routing stream"):
        layer(tokens())
    with pytest.raises(ConfigError, match=r"d_model \(16\) .* num_experts \(6\) equal blocks"):
        MoELayer(layer_cfg({"source": "embedding"}, num_experts=6))


def test_bias_balancing_shifts_selection_and_never_v():
    layer = MoELayer(layer_cfg({"bias_balancing": True, "bias_update_rate": 10.0}, top_k=1))
    x = tokens()
    v = layer.router.v_projection.clone()
    before = layer.router(x, TRAIN).idx_TK
    load = torch.bincount(before[:, 0], minlength=E).float()
    layer.router.after_step(load)
    assert torch.equal(layer.router.selection_bias_E, 10.0 * torch.sign(load.mean() - load))
    assert not torch.equal(layer.router(x, TRAIN).idx_TK, before)
    assert torch.equal(layer.router.v_projection, v)


@pytest.mark.parametrize("bad,message", [
    (dict(weights="linear"), r"router.weights must be one of .*got 'linear'"),
    (dict(source="tokens"), r"router.source must be one of .*got 'tokens'"),
    (dict(stream_active_fraction=0.0), r"router.stream_active_fraction must be in \(0, 1\], got 0.0"),
    (dict(center_stat="median"), r"router.center_stat must be one of .*got 'median'"),
    (dict(center_momentum=1.5), r"router.center_momentum must be in \[0, 1\), got 1.5"),
])
def test_config_errors_name_the_value(bad, message):
    with pytest.raises(ConfigError, match=message):
        router_config_from_dict({"type": "fixed_projection", **bad})


# Routers whose routes are row-wise functions of the token (no population statistic), hence
# bit-identical whatever the sharding.
BITWISE_ROUTERS = [{}, {"weights": "softmax"}, {"source": "embedding"}]
TOKENS_PER_RANK = 24


def _bitwise_worker(rank: int, world: int, ep_sizes: tuple[int, ...]) -> None:
    torch.manual_seed(7)
    x, stream = torch.randn(world * TOKENS_PER_RANK, D), torch.randn(world * TOKENS_PER_RANK, D)
    for ep_size in ep_sizes:
        groups = ParallelGroups.build(ep_size, E)
        for router in BITWISE_ROUTERS:
            ref = MoELayer(layer_cfg(router), seed=3, layer_index=2)
            layer = MoELayer(layer_cfg(router, ep_size=ep_size), seed=3, layer_index=2, groups=groups)
            assert torch.equal(layer.router.v_projection, ref.router.v_projection)
            ctx = RoutingContext(training=True, all_reduce_sum=groups.all_reduce_sum_dp, dp_size=groups.dp_size,
                                 stream_TD=shard(stream, rank, world))
            route = layer.router(shard(x, rank, world), ctx)
            ref_route = ref.router(x, RoutingContext(training=True, stream_TD=stream))
            what = f"rank {rank} world {world} ep {ep_size} {router}"
            assert torch.equal(route.idx_TK, shard(ref_route.idx_TK, rank, world)), what
            assert torch.equal(route.w_TK, shard(ref_route.w_TK, rank, world)), what
            out = layer(shard(x, rank, world), MoESideInputs(stream_TD=shard(stream, rank, world)))
            out_ref = ref(x, MoESideInputs(stream_TD=stream, capacity_groups=world))
            for name in ("tokens_per_expert", "tokens_per_expert_kept"):  # this rank's: their sum over ranks
                assert torch.equal(groups.all_reduce_sum_dp(out.stats[name]), out_ref.stats[name]), f"{name} {what}"
            if out.stream is not None:
                assert torch.equal(out.stream, shard(out_ref.stream, rank, world)), what


@pytest.mark.parametrize("world,ep_sizes", [(2, (1, 2)), (4, (1, 2, 4))])
def test_routes_are_bit_identical_across_ranks_and_ep_sizes(world, ep_sizes):
    run_distributed(_bitwise_worker, world, ep_sizes)
