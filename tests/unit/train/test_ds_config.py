"""The gradient precision a DeepSpeed JSON gets (moe_dist/train/ds_config.py): bf16 reduces and
accumulates gradients in fp32 unless the JSON asks for bf16 (then a warning); what DeepSpeed
cannot do for moe_dist (fp32 accumulation at ZeRO-1) and meaningless values are refused."""

from __future__ import annotations

import warnings

import pytest

from moe_dist.common.config import ConfigError
from moe_dist.train.config import TrainSection
from moe_dist.train.ds_config import GradientPrecisionWarning, gradient_dtypes, reconcile_deepspeed_config

TRAIN = TrainSection(steps=1, seq_len=8, micro_batch=1, deepspeed_config="ds.json")


def reconcile(**ds):
    return reconcile_deepspeed_config(ds, TRAIN, world_size=2, path="ds.json")


def test_bf16_gets_fp32_gradient_communication_and_accumulation():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = reconcile(zero_optimization={"stage": 2}, bf16={"enabled": True})
    assert ds["communication_data_type"] == "fp32"
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"}
    assert gradient_dtypes(ds) == ("fp32", "fp32")
    # other data_types keys survive
    ds = reconcile(zero_optimization={"stage": 2}, bf16={"enabled": True}, data_types={"param_dtype": "bf16"})
    assert ds["data_types"] == {"param_dtype": "bf16", "grad_accum_dtype": "fp32"}


def test_fp32_configs_are_left_as_they_are():
    ds = reconcile(zero_optimization={"stage": 1})
    assert "communication_data_type" not in ds and "data_types" not in ds
    assert gradient_dtypes(ds) == ("fp32", "fp32")
    assert gradient_dtypes(reconcile(zero_optimization={"stage": 2}, communication_data_type="fp32")) == ("fp32", "fp32")


@pytest.mark.parametrize("key,ds,expected", [
    ("communication_data_type", dict(communication_data_type="bf16"), ("bf16", "fp32")),
    ("data_types.grad_accum_dtype", dict(data_types={"grad_accum_dtype": "bf16"}), ("fp32", "bf16")),
])
def test_an_explicit_bf16_is_respected_with_a_warning(key, ds, expected):
    with pytest.warns(GradientPrecisionWarning, match=rf"ds.json: {key} set to \"bf16\""):
        out = reconcile(zero_optimization={"stage": 2}, bf16={"enabled": True}, **ds)
    assert gradient_dtypes(out) == expected


def test_bf16_at_zero1_needs_an_explicit_bf16_accumulation():
    with pytest.raises(ConfigError, match=r"ds.json: bf16 with ZeRO stage 1 accumulates gradients in bf16.*"
                                          r"BF16_Optimizer.*stage 2"):
        reconcile(zero_optimization={"stage": 1}, bf16={"enabled": True})
    with pytest.raises(ConfigError, match=r"grad_accum_dtype \"fp32\" with bf16 at ZeRO stage 1"):
        reconcile(zero_optimization={"stage": 1}, bf16={"enabled": True}, data_types={"grad_accum_dtype": "fp32"})
    with pytest.warns(GradientPrecisionWarning, match="accumulated in bf16"):
        ds = reconcile(zero_optimization={"stage": 1}, bf16={"enabled": True}, data_types={"grad_accum_dtype": "bf16"})
    assert gradient_dtypes(ds) == ("fp32", "bf16")


@pytest.mark.parametrize("ds,message", [
    (dict(communication_data_type="fp16"), r"ds.json: communication_data_type is 'fp16'; expected one of"),
    (dict(data_types={"grad_accum_dtype": "float32"}), r"data_types.grad_accum_dtype is 'float32'; expected"),
    (dict(data_types="fp32"), r"ds.json: data_types must be a JSON object, got 'fp32'"),
])
def test_values_outside_fp32_and_bf16_are_refused(ds, message):
    with pytest.raises(ConfigError, match=message):
        reconcile(zero_optimization={"stage": 2}, bf16={"enabled": True}, **ds)


def test_bf16_gradients_of_fp32_weights_are_refused():
    with pytest.raises(ConfigError, match=r"ds.json: communication_data_type is 'bf16' but bf16 is off"):
        reconcile(zero_optimization={"stage": 2}, communication_data_type="bf16")
    with pytest.raises(ConfigError, match=r"data_types.grad_accum_dtype is 'bf16' but bf16 is off"):
        reconcile(zero_optimization={"stage": 2}, data_types={"grad_accum_dtype": "bf16"})
