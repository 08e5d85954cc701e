"""Reading and writing tensor files with errors that name the file.

DeepSpeed's files hold pickled Python objects (its loss scaler, enums, fragment addresses), so
`.pt` files are loaded with `weights_only=False`: only open checkpoints you trust. Consolidated
and exported weights are written as safetensors (no code on load) unless asked otherwise.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from moe_dist.checkpoint.errors import CheckpointError

SAFETENSORS, TORCH = "safetensors", "torch"
WEIGHT_FORMATS = (SAFETENSORS, TORCH)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def load_pt(path: str, what: str) -> Any:
    """`torch.load` of a checkpoint file; a missing, truncated or foreign file is a
    CheckpointError naming it and `what` it should have held."""
    if not os.path.isfile(path):
        raise CheckpointError(f"missing {what} file {path!r}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError, ... by cause
        raise CheckpointError(f"cannot read {what} file {path!r} ({type(e).__name__}: {e}); the file "
                              f"is truncated, corrupted or not a torch checkpoint") from None


def require_keys(obj: Any, keys: tuple[str, ...], path: str, what: str) -> None:
    if not isinstance(obj, dict):
        raise CheckpointError(f"{what} file {path!r} holds a {type(obj).__name__}, expected a dict")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise CheckpointError(f"{what} file {path!r} lacks key(s) {missing}; found {sorted(obj)}")


def cast_floating(state: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Floating tensors to `dtype` (None: unchanged); integer buffers (counters) keep theirs."""
    if dtype is None:
        return state
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def write_weights(path: str, state: dict[str, torch.Tensor], fmt: str, metadata: dict[str, str] | None = None) -> None:
    """One tensor file: safetensors (contiguous copies; `metadata` in its header) or torch."""
    if fmt == SAFETENSORS:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, path, metadata=metadata)
    elif fmt == TORCH:
        torch.save(state, path)
    else:
        raise CheckpointError(f"weight format must be one of {list(WEIGHT_FORMATS)}, got {fmt!r}")


def write_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def read_json(path: str, what: str) -> Any:
    if not os.path.isfile(path):
        raise CheckpointError(f"missing {what} file {path!r}")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{what} file {path!r} is not valid JSON: {e}") from None
