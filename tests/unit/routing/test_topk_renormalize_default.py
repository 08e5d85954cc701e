"""`router.renormalize`'s default (docs/routers/topk.md, "Why renormalize defaults to true for K >
1"): true for K > 1 and false for K = 1 when unset, an explicit value kept, the resolved value the
one a config records (so a checkpoint of the old default resumes only as a named routing change)."""

from __future__ import annotations

import pytest
import torch

from moe_dist.checkpoint.training.resume import config_differences
from moe_dist.common.config import ConfigError, to_dict
from moe_dist.moe.config import MoEConfig
from moe_dist.routing.base import RoutingContext
from moe_dist.routing.registry import build_router
from moe_dist.routing.topk import TopKRouterConfig


def moe(top_k: int, **router) -> MoEConfig:
    return MoEConfig.from_dict(dict(d_model=8, d_ff=8, num_experts=4, top_k=top_k, router={"type": "topk", **router}))


@pytest.mark.parametrize("top_k,expected", [(1, False), (2, True), (4, True)])
def test_unset_resolves_by_top_k(top_k, expected):
    assert moe(top_k).router.renormalize is expected
    assert moe(top_k, renormalize=None).router.renormalize is expected
    inhibition = MoEConfig.from_dict(dict(d_model=8, d_ff=8, num_experts=4, top_k=top_k, router={"type": "inhibition"}))
    assert inhibition.router.renormalize is expected  # topk's gate and weights, so topk's default


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("value", [True, False])
def test_an_explicit_value_is_kept(top_k, value):
    assert moe(top_k, renormalize=value).router.renormalize is value


def test_a_non_boolean_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"router.renormalize must be true, false or null .* got 'yes'"):
        moe(2, renormalize="yes")


@pytest.mark.parametrize("top_k", [1, 2])
def test_a_router_built_without_moe_config_takes_the_default(top_k):
    router = build_router(TopKRouterConfig(), d_model=8, num_experts=4, top_k=top_k, layer_index=0)
    out = router(torch.randn(5, 8), RoutingContext(training=False))
    chosen_TK = out.probs_TE.gather(1, out.idx_TK)
    if top_k > 1:
        torch.testing.assert_close(out.w_TK.sum(-1), torch.ones(5))
    else:  # the chosen probability itself, so the LM loss still reaches the router
        torch.testing.assert_close(out.w_TK, chosen_TK)
        assert (out.w_TK < 1).all()


def test_a_checkpoint_of_the_old_default_resumes_only_as_a_named_change():
    stored = {"moe": to_dict(moe(2, renormalize=False))}
    current = {"moe": to_dict(moe(2))}
    structural, changed = config_differences(stored, current)
    assert structural == [] and changed == ["moe.router.renormalize: False -> True"]
    assert config_differences(stored, {"moe": to_dict(moe(2, renormalize=False))}) == ([], [])
