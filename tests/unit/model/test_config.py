"""The model config is strict and names the offending values."""

from __future__ import annotations

import pytest

from moe_dist.common.config import ConfigError
from moe_dist.model.config import parse_model_config

BASE = dict(vocab_size=64, d_model=32, n_layers=4, n_heads=4, d_ff=64)
MOE = dict(num_experts=4, d_ff=32)


def test_moe_layer_placement():
    cfg = parse_model_config(dict(BASE, moe_every=2, moe_offset=1), MOE)
    assert cfg.moe_layer_indices == [1, 3]
    assert parse_model_config(dict(BASE, moe_every=1), MOE).moe_layer_indices == [0, 1, 2, 3]
    assert parse_model_config(dict(BASE, moe_every=3, moe_offset=0), MOE).moe_layer_indices == [0, 3]
    assert parse_model_config(BASE).moe_layer_indices == []  # no moe section: all dense


def test_moe_width_is_filled_from_the_model():
    assert parse_model_config(BASE, MOE).moe.d_model == 32


@pytest.mark.parametrize("model,moe,message", [
    (dict(BASE, colour=1), None, "unknown key(s) ['colour']"),
    (dict(BASE, n_heads=5), None, "d_model (32) must be divisible by model.n_heads (5)"),
    (dict(BASE, moe_offset=4), None, "model.moe_offset (4) must be an integer in [0, n_layers (4))"),
    (BASE, dict(MOE, d_model=48), "moe.d_model (48) must equal model.d_model (32)"),
    (BASE, dict(MOE, ep_size=3), "moe.num_experts (4) must be divisible by moe.ep_size (3)"),
    (dict(BASE, moe_every=0), MOE, "moe_every is 0"),
    (dict(BASE, moe=MOE), None, "top-level `moe:` section"),
    (dict(BASE, vocab_size=0), None, "model.vocab_size must be an integer >= 1, got 0"),
])
def test_bad_values_are_named(model, moe, message):
    with pytest.raises(ConfigError) as e:
        parse_model_config(model, moe)
    assert message in str(e.value)
