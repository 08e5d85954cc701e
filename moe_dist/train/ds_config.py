"""The DeepSpeed JSON: loaded, checked against the training config and the launch, completed.

The training config is the one source of truth for batch sizes; the JSON may omit them (they are
filled in) or repeat them with the same values. A disagreement is an error naming both numbers,
raised before any process group exists: DeepSpeed's own check would only fire inside
`deepspeed.initialize`, after the model is built, and would not say which file is wrong.

Gradient precision under bf16. DeepSpeed 0.19.8 left to itself reduces gradients in the model's
dtype (`communication_data_type` defaults to bf16 when bf16 is on) and accumulates the micro
batches' gradients in it (`data_types.grad_accum_dtype` defaults to the model's dtype): the sum
of W ranks' and `grad_accum` micro batches' gradients then rounds to 8 bits of mantissa at every
addition. Megatron-Core reduces and accumulates in fp32 by default. So a bf16 config gets
`"communication_data_type": "fp32"` and `"data_types": {"grad_accum_dtype": "fp32"}` unless the
JSON says otherwise. Both are ZeRO-2 settings here: at ZeRO-1, DeepSpeed answers bf16 with fp32
accumulation by swapping the ZeRO optimizer for its separate BF16_Optimizer, whose checkpoint
format moe_dist's ZeRO reader refuses (moe_dist/checkpoint/training/zero.py), so a bf16 ZeRO-1
JSON must say explicitly that it accepts bf16 accumulation. A JSON that asks for bf16 in either
key is respected with a warning (it is a deliberate trade of precision for bandwidth or memory).
"""

from __future__ import annotations

import json
import warnings
from typing import Any

from moe_dist.common.config import ConfigError, check
from moe_dist.train.config import TrainSection

SUPPORTED_ZERO_STAGES = (1, 2)
# Sections that would give the optimizer or LR schedule a second source of truth.
OWNED_BY_TRAIN = {"optimizer": "train.lr / weight_decay / adam_betas / adam_eps",
                  "scheduler": "train.lr / min_lr / warmup_steps / lr_decay"}
# The gradient dtypes a JSON may name (DeepSpeed's spelling); fp16 is refused with the rest of fp16.
GRAD_DTYPES = ("fp32", "bf16")


class GradientPrecisionWarning(UserWarning):
    """A bf16 config that asks for bf16 gradient communication or accumulation."""


def load_json(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"DeepSpeed config {path!r} does not exist") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"DeepSpeed config {path!r} is not valid JSON: {e}") from None


def resolve_batch_sizes(train: TrainSection, world_size: int) -> dict[str, int]:
    """The three DeepSpeed batch keys implied by the training config for this world size."""
    implied = train.micro_batch * train.grad_accum * world_size
    if train.global_batch is not None and train.global_batch != implied:
        raise ConfigError(
            f"train.global_batch ({train.global_batch}) must equal train.micro_batch "
            f"({train.micro_batch}) * train.grad_accum ({train.grad_accum}) * world size "
            f"({world_size}) = {implied}")
    return {"train_batch_size": implied, "train_micro_batch_size_per_gpu": train.micro_batch,
            "gradient_accumulation_steps": train.grad_accum}


def reconcile_deepspeed_config(ds: dict[str, Any], train: TrainSection, world_size: int,
                               path: str = "<deepspeed config>") -> dict[str, Any]:
    """A copy of `ds` with batch sizes filled in from `train`; raises ConfigError on conflicts."""
    check(isinstance(ds, dict), f"DeepSpeed config {path!r} must hold a JSON object")
    out = dict(ds)
    for key, value in resolve_batch_sizes(train, world_size).items():
        if key in out and out[key] != value:
            raise ConfigError(
                f"batch sizes disagree: {path} sets {key} = {out[key]!r} but the training config "
                f"implies {value} (train.micro_batch {train.micro_batch}, train.grad_accum "
                f"{train.grad_accum}, world size {world_size}); remove {key} from the JSON or make "
                f"them agree")
        out[key] = value
    for section, owner in OWNED_BY_TRAIN.items():
        if section in out:
            raise ConfigError(f"{path} has a {section!r} section, but the {section} is set by {owner} "
                              f"in the training config; remove it from the JSON")
    zero = out.get("zero_optimization", {})
    stage = zero.get("stage", 0) if isinstance(zero, dict) else None
    if stage not in SUPPORTED_ZERO_STAGES:
        raise ConfigError(f"{path}: zero_optimization.stage is {stage!r}; expert-parallel training "
                          f"supports ZeRO stages {list(SUPPORTED_ZERO_STAGES)} (DeepSpeed's MoE "
                          f"support ends at stage 2)")
    # DeepSpeed asserts these for MoE at stage 2 deep inside initialize; at stage 1 a false
    # contiguous_gradients is worse: it falls back to a reduction over the whole DP group and
    # silently mixes different experts' gradients. Refuse both up front.
    for key in ("contiguous_gradients", "reduce_scatter"):
        if zero.get(key, True) is False:
            raise ConfigError(f"{path}: zero_optimization.{key} must be true for expert-parallel "
                              f"training (ZeRO stage {stage}), got false")
    if out.get("fp16", {}).get("enabled", False):
        raise ConfigError(f"{path}: fp16 is not supported (loss scaling is untested with "
                          f"expert parallelism here); use \"bf16\": {{\"enabled\": true}}")
    return with_gradient_precision(out, stage, path)


def with_gradient_precision(ds: dict[str, Any], stage: int, path: str) -> dict[str, Any]:
    """`ds` with the gradient communication and accumulation dtypes settled (module docstring)."""
    data_types = ds.get("data_types", {})
    check(isinstance(data_types, dict), f"{path}: data_types must be a JSON object, got {data_types!r}")
    comm, accum = ds.get("communication_data_type"), data_types.get("grad_accum_dtype")
    for key, value in (("communication_data_type", comm), ("data_types.grad_accum_dtype", accum)):
        if value is not None and value not in GRAD_DTYPES:
            raise ConfigError(f"{path}: {key} is {value!r}; expected one of {list(GRAD_DTYPES)}")
    if not bf16_enabled(ds):
        # Gradients of fp32 weights are fp32; narrower reduction or accumulation only loses bits.
        for key, value in (("communication_data_type", comm), ("data_types.grad_accum_dtype", accum)):
            if value not in (None, "fp32"):
                raise ConfigError(f"{path}: {key} is {value!r} but bf16 is off; fp32 training reduces "
                                  f"and accumulates gradients in fp32 (remove the key or set \"fp32\")")
        return ds
    out = dict(ds)
    if comm is None:
        out["communication_data_type"] = "fp32"
    if accum is None:
        if stage == 1:
            raise ConfigError(
                f"{path}: bf16 with ZeRO stage 1 accumulates gradients in bf16: DeepSpeed's fp32 "
                f"accumulation at stage 1 is its BF16_Optimizer, whose checkpoints moe_dist cannot "
                f"read. Use zero_optimization.stage 2 (fp32 accumulation), or accept bf16 "
                f"accumulation explicitly with \"data_types\": {{\"grad_accum_dtype\": \"bf16\"}}")
        out["data_types"] = {**data_types, "grad_accum_dtype": "fp32"}
    elif accum == "fp32" and stage == 1:
        raise ConfigError(f"{path}: data_types.grad_accum_dtype \"fp32\" with bf16 at ZeRO stage 1 makes "
                          f"DeepSpeed use its BF16_Optimizer, whose checkpoints moe_dist cannot read; use "
                          f"zero_optimization.stage 2 for fp32 gradient accumulation")
    asked = {key: what for key, value, what in (("communication_data_type", comm, "reduced"),
                                                 ("data_types.grad_accum_dtype", accum, "accumulated"))
             if value == "bf16"}
    if asked:
        warnings.warn(f"{path}: {' and '.join(asked)} set to \"bf16\": gradients are "
                      f"{' and '.join(asked.values())} in bf16, as the JSON asks (the default under bf16 is "
                      f"fp32)", GradientPrecisionWarning, stacklevel=2)
    return out


def gradient_dtypes(ds: dict[str, Any]) -> tuple[str, str]:
    """(communication, accumulation) dtypes of gradients as moe_dist runs a DeepSpeed JSON, before or
    after `reconcile_deepspeed_config`: what it names, else fp32 (bf16 or not)."""
    return (ds.get("communication_data_type") or "fp32",
            (ds.get("data_types") or {}).get("grad_accum_dtype") or "fp32")


def bf16_enabled(ds: dict[str, Any]) -> bool:
    return bool(ds.get("bf16", {}).get("enabled", False))
