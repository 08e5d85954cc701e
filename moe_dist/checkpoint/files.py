"""Files of the checkpoint tools: the one error type, reading and writing tensor and JSON files
with errors that name the file, and the staged output directory every conversion writes into.

Errors: a checkpoint (or an output) that is not what a conversion needs is a CheckpointError
whose message names the offending file and says what was expected, so a user can tell a
truncated copy from a wrong path from an unsupported layout without reading a traceback.

Trust: DeepSpeed's files hold pickled Python objects (its loss scaler, enums, fragment
addresses), so `.pt` files are loaded with `weights_only=False`: only open checkpoints you
trust. Consolidated and exported weights are written as safetensors (no code on load) unless
asked otherwise.

Outputs: every conversion writes into a temporary sibling of its output directory
(`moe_dist.common.atomic.staged_directory`) that is renamed into place only when the whole
conversion succeeded: a failed or interrupted run leaves OUT as it was (absent, or the old one
with --overwrite), never half written, so nothing downstream can mistake a partial export for a
complete one.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import Any

import torch

from moe_dist.common import atomic
from moe_dist.common.config import ConfigError, check_choice

SAFETENSORS, TORCH = "safetensors", "torch"
WEIGHT_FORMATS = (SAFETENSORS, TORCH)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or inconsistent, or an output cannot be written."""


def check_option(what: str, value: Any, choices) -> None:
    """`value` is one of `choices`, else a CheckpointError saying which are."""
    try:
        check_choice(what, value, tuple(choices))
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def torch_dtype(name: str | None) -> torch.dtype | None:
    """The torch dtype a `--dtype` name stands for (None: keep the saved dtypes)."""
    if name is not None:
        check_option("dtype", name, sorted(DTYPES))
    return DTYPES.get(name)


def dtype_name(dtype: torch.dtype) -> str:
    """torch's name of a dtype without the module ("float32", "bfloat16", "int64", ...)."""
    return str(dtype).replace("torch.", "")


# ---- reading -----------------------------------------------------------------------------------

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


def read_json(path: str, what: str) -> Any:
    if not os.path.isfile(path):
        raise CheckpointError(f"missing {what} file {path!r}")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{what} file {path!r} is not valid JSON: {e}") from None


# ---- writing (into a staged directory) ---------------------------------------------------------

def cast_floating(state: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Floating tensors to `dtype` (None: unchanged); integer buffers (counters) keep theirs."""
    if dtype is None:
        return state
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def write_weights(path: str, state: dict[str, torch.Tensor], fmt: str, metadata: dict[str, str] | None = None) -> None:
    """One tensor file: safetensors (contiguous copies; `metadata` in its header) or torch."""
    check_option("weight format", fmt, WEIGHT_FORMATS)
    if fmt == SAFETENSORS:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, path, metadata=metadata)
    else:
        torch.save(state, path)


def write_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def check_output(out: str, overwrite: bool) -> None:
    """Fail before any expensive work: OUT must not exist (unless `overwrite`, and then it must be
    a directory) and its parent must exist."""
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise CheckpointError(f"the parent folder {parent!r} of output {out!r} does not exist")
    if os.path.lexists(out):
        if not overwrite:
            raise CheckpointError(f"output {out!r} already exists; choose a new path or pass --overwrite")
        if not os.path.isdir(out) or os.path.islink(out):
            raise CheckpointError(f"--overwrite replaces a directory, but output {out!r} is not one")


@contextlib.contextmanager
def staged_directory(out: str, overwrite: bool = False) -> Iterator[str]:
    """`moe_dist.common.atomic.staged_directory` after `check_output`: yield the empty temporary
    directory to write into; it becomes `out` only if the block completes."""
    check_output(out, overwrite)
    with atomic.staged_directory(out) as tmp:
        yield tmp


MAX_NAMED = 8  # tensors named in one message; the count says how many more


def is_non_finite(t: torch.Tensor) -> bool:
    return t.is_floating_point() and not bool(torch.isfinite(t).all())


def name_some(names: list[str]) -> str:
    """The first MAX_NAMED names and how many more: a message stays readable for any model size."""
    more = f" and {len(names) - MAX_NAMED} more" if len(names) > MAX_NAMED else ""
    return ", ".join(names[:MAX_NAMED]) + more
