"""A census of the reads that make the host wait for the device, countable on CPU.

On a GPU each of these blocks the Python thread until the device has caught up (a host sync):
converting a tensor to a Python value (`item`, `tolist`, `bool`/`float`/`int`/`index`, a branch on
a tensor), copying it to the host (`cpu`, `numpy`), ops whose output size depends on the values
(`nonzero`, `bincount`, `unique`, `masked_select`, boolean-mask indexing, `repeat_interleave`
without `output_size`), and building a tensor from Python data (`torch.tensor` and kin: a
blocking host-to-device copy where the run's device is a GPU). On CPU none of them costs a wait,
which is why CPU tests never noticed them; this census counts them on any device, so a test can
hold a code path to a budget (tests/unit/moe/test_host_sync.py).

    with HostSyncCensus() as census:
        loss = layer(x).y.sum(); loss.backward()
    census.count, census.where   # how many, and at which moe_dist lines

Reads inside an op that declares itself a device kernel's business (`allowed()`, the CPU
backend reading its split sizes, where a read is free) are not counted.
"""

from __future__ import annotations

import contextlib
import threading
import traceback
from collections import Counter
from collections.abc import Iterator

import torch
from torch.overrides import TorchFunctionMode

# Methods and functions that read tensor values into Python or size outputs by them.
_ALWAYS = {
    torch.Tensor.item: "item", torch.Tensor.tolist: "tolist", torch.Tensor.cpu: "cpu",
    torch.Tensor.numpy: "numpy", torch.Tensor.__bool__: "__bool__", torch.Tensor.__float__: "__float__",
    torch.Tensor.__int__: "__int__", torch.Tensor.__index__: "__index__", torch.Tensor.nonzero: "nonzero",
    torch.nonzero: "nonzero", torch.argwhere: "argwhere", torch.Tensor.argwhere: "argwhere",
    torch.bincount: "bincount", torch.Tensor.bincount: "bincount", torch.unique: "unique",
    torch.Tensor.unique: "unique", torch.unique_consecutive: "unique",
    torch.masked_select: "masked_select", torch.Tensor.masked_select: "masked_select",
    torch.tensor: "tensor from host data", torch.as_tensor: "tensor from host data",
    torch.Tensor.new_tensor: "tensor from host data", torch.equal: "equal", torch.allclose: "allclose",
}
_INDEXING = (torch.Tensor.__getitem__, torch.Tensor.__setitem__, torch.Tensor.index_put_,
             torch.Tensor.index_put, torch.index_put)
_REPEAT = (torch.repeat_interleave, torch.Tensor.repeat_interleave)

_state = threading.local()


def _has_bool_mask(index) -> bool:
    items = index if isinstance(index, (tuple, list)) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def _kind(func, args, kwargs) -> str | None:
    kind = _ALWAYS.get(func)
    if kind is not None:
        return kind
    if func in _INDEXING and len(args) > 1 and _has_bool_mask(args[1]):
        return "boolean-mask indexing"
    if func in _REPEAT and kwargs.get("output_size") is None:
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
        if isinstance(repeats, torch.Tensor) and repeats.numel() > 1:
            return "repeat_interleave without output_size"
    return None


def _caller() -> str:
    """The innermost frame in moe_dist outside this module: where the read was written."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "moe_dist" in frame.filename and not frame.filename.endswith("host_sync.py"):
            return f"{frame.filename.split('moe_dist/', 1)[-1]}:{frame.lineno} ({frame.name})"
    return "outside moe_dist"


@contextlib.contextmanager
def allowed() -> Iterator[None]:
    """Reads inside are a device kernel's own (the CPU backend's split sizes): not counted."""
    previous = getattr(_state, "allowed", False)
    _state.allowed = True
    try:
        yield
    finally:
        _state.allowed = previous


class HostSyncCensus(TorchFunctionMode):
    """Counts host reads (see the module docstring) made while it is active, by kind and line.
    It is a torch function mode: it sees the forward, and the backward's Python-level code
    (custom autograd functions) when the backward runs inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.kinds: Counter[str] = Counter()
        self.where: Counter[str] = Counter()

    @property
    def count(self) -> int:
        return sum(self.kinds.values())

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not getattr(_state, "allowed", False):
            kind = _kind(func, args, kwargs)
            if kind is not None:
                self.kinds[kind] += 1
                self.where[f"{kind} at {_caller()}"] += 1
        return func(*args, **kwargs)

    def report(self) -> str:
        return "\n".join(f"{n:4d}  {place}" for place, n in self.where.most_common())
