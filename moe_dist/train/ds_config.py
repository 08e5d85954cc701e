"""The DeepSpeed JSON: loaded, checked against the training config and the launch, completed.

The training config is the one source of truth for batch sizes; the JSON may omit them (they are
filled in) or repeat them with the same values. A disagreement is an error naming both numbers,
raised before any process group exists: DeepSpeed's own check would only fire inside
`deepspeed.initialize`, after the model is built, and would not say which file is wrong.
"""

from __future__ import annotations

import json
from typing import Any

from moe_dist.common.config import ConfigError, check
from moe_dist.train.config import TrainSection

SUPPORTED_ZERO_STAGES = (1, 2)
# Sections that would give the optimizer or LR schedule a second source of truth.
OWNED_BY_TRAIN = {"optimizer": "train.lr / weight_decay / adam_betas / adam_eps",
                  "scheduler": "train.lr / min_lr / warmup_steps / lr_decay"}


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
    return out


def bf16_enabled(ds: dict[str, Any]) -> bool:
    return bool(ds.get("bf16", {}).get("enabled", False))
