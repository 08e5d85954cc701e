"""Files of the checkpoint tools: the one error type, reading and writing tensor and JSON files
with errors that name the file, and the staged output directory every conversion writes into.

Errors: a checkpoint (or an output) that is not what a conversion needs is a CheckpointError
whose message names the offending file and says what was expected, so a user can tell a
truncated copy from a wrong path from an unsupported layout without reading a traceback.

Trust: no checkpoint file can run code when it is read. Every `.pt` file is loaded with
`weights_only=True` (`load_pt`, `torch_load`): moe_dist's own files hold tensors and plain values
only; DeepSpeed's ZeRO files also pickle three DeepSpeed classes, allowed by name and nothing
else (`DEEPSPEED_GLOBALS`); `deepspeed_loads_weights_only` puts DeepSpeed's own `torch.load` of a
resume under the same rule. Any other type is an UnsafeCheckpointError naming the file and the
type. Consolidated and exported weights are written as safetensors unless asked otherwise.

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
import pickle
import re
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

class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file pickles a type that could run code when loaded; it was not loaded."""


# The DeepSpeed classes its stage-1/2 optimizer files pickle (DeepSpeed 0.19.7-0.19.8, fp32 and
# bf16, ZeRO-1 and 2; `torch.serialization.get_unsafe_globals_in_checkpoint` on the tags of
# tests/harness/ckpt.py): `fragment_address` (param_slice_mappings), `ZeroStageEnum`
# (zero_stage), `LossScaler` / `DynamicLossScaler` (loss_scaler; dynamic under fp16). Each is
# rebuilt by setting attributes; none runs code of the file's choosing.
DEEPSPEED_GLOBALS = ("deepspeed.utils.tensor_fragment.fragment_address",
                     "deepspeed.runtime.zero.config.ZeroStageEnum",
                     "deepspeed.runtime.fp16.loss_scaler.LossScaler",
                     "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler")
# rank_state_*.pt written before issue 26 pickled numpy's RNG key array; numeric arrays only
# (an object array's items go through the same weights-only unpickler).
LEGACY_NUMPY_GLOBALS = ("numpy.ndarray", "numpy.dtype", "numpy.core.multiarray._reconstruct",
                        "numpy._core.multiarray._reconstruct", "numpy.dtypes.UInt32DType")


def _resolve(names: tuple[str, ...]) -> list[Any]:
    import importlib

    found = []
    for name in names:
        module, _, attr = name.rpartition(".")
        try:
            found.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):  # another numpy/DeepSpeed release: its files lack it
            continue
    return found


def allowed_globals(deepspeed: bool) -> list[Any]:
    return _resolve(LEGACY_NUMPY_GLOBALS + (DEEPSPEED_GLOBALS if deepspeed else ()))


def _refused_type(error: Exception) -> str | None:
    m = re.search(r"GLOBAL ([\w.]+)|but got <class '([\w.]+)'>", str(error))
    return (m.group(1) or m.group(2)) if m else None


def torch_load(path: str, *, deepspeed: bool = False, mmap: bool = False) -> Any:
    """`torch.load(weights_only=True)` of a checkpoint file, DeepSpeed's few classes allowed with
    `deepspeed`; a file that pickles any other type is an UnsafeCheckpointError naming the file
    and the type (nothing of it ran). Other read errors propagate as torch raises them."""
    try:
        with torch.serialization.safe_globals(allowed_globals(deepspeed)):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        kind = _refused_type(e)
        if kind is None:
            raise
        allowed = "tensors and plain values" + (" and DeepSpeed's " + ", ".join(DEEPSPEED_GLOBALS)
                                                 if deepspeed else "")
        raise UnsafeCheckpointError(f"refused to load {path!r}: it pickles {kind}, which could run code on "
                                    f"load; a checkpoint file may hold only {allowed}. Not loaded: only a "
                                    f"file from elsewhere or a tampered one holds such a type") from None


@contextlib.contextmanager
def deepspeed_loads_weights_only(engine) -> Iterator[None]:
    """DeepSpeed's engine reads its files with `checkpoint_engine.load`, `torch.load(...,
    weights_only=False)`: for the block, that method loads through `torch_load` (DeepSpeed's
    classes allowed, nothing else)."""
    ckpt_engine = engine.checkpoint_engine

    def load(path: str, map_location=None):
        return torch_load(path, deepspeed=True)

    before = vars(ckpt_engine).get("load")
    ckpt_engine.load = load  # an instance attribute shadows the class's method
    try:
        yield
    finally:
        if before is None:
            del ckpt_engine.load
        else:
            ckpt_engine.load = before


def load_pt(path: str, what: str, deepspeed: bool = False) -> Any:
    """A checkpoint file loaded weights-only (`torch_load`); a missing, truncated or foreign file
    is a CheckpointError naming it and `what` it should have held, one that pickles code an
    UnsafeCheckpointError."""
    if not os.path.isfile(path):
        raise CheckpointError(f"missing {what} file {path!r}")
    try:
        return torch_load(path, deepspeed=deepspeed)
    except UnsafeCheckpointError:
        raise
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
        # safetensors creates its file with mode 0600; a model folder is shared like any other file.
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(path, 0o666 & ~mask)
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
