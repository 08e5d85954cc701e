"""Expert-only recompute: the local experts' activations are rebuilt in the backward, nothing else.

Legend: moe_dist/moe/__init__.py. Modes (`model.moe_recompute`, docs/training.md):

    none        autograd keeps what the experts' ops save: per routed row the first projection's
                output (2F for SwiGLU), silu(gate) (F) and the activation (F) the second
                projection multiplies
    activation  keeps only the first projection's output; the activation (SwiGLU / GELU, COMET's
                mask) is recomputed from it in the backward, no GEMM is repeated (Megatron-Core's
                `moe_act`)
    experts     keeps nothing per row but the dispatched source and index the first projection
                gathers from; the whole expert FFN (both GEMMs) runs again in the backward
                (Megatron-Core's `moe`)

Only the experts are recomputed, so the router, the capacity plan, the all-to-alls, the
loss-counts all-reduce and router buffer updates run once per step, as without recompute: a
recompute of the whole MoE layer would run them again in the backward (re-routing on changed
buffers is a bug class of its own, OLMo PR #639). The gather source is an input of the
recomputed region, never rebuilt by a second dispatch.

Recomputed values are bit-identical to the first computation (the same ops on the same inputs),
so losses and gradients equal those without recompute exactly (tests/unit/moe/test_recompute.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

RECOMPUTE_MODES = ("none", "activation", "experts")


class _Rebuilt:
    """The rebuilt tensor shared by every saved view of it, built on the first unpack. It lives as
    long as the autograd nodes that saved a view of it, as the original would have."""

    def __init__(self, rebuild: Callable[[], Tensor]) -> None:
        self.rebuild = rebuild
        self.value: Tensor | None = None

    def get(self) -> Tensor:
        if self.value is None:
            with torch.no_grad():
                self.value = self.rebuild()
        return self.value


@contextmanager
def recompute_saved(of: Tensor, rebuild: Callable[[], Tensor]) -> Iterator[None]:
    """Ops run inside this block save, instead of `of` (or any view of it), a note to rebuild it
    with `rebuild()` when the backward needs it. `rebuild` must return a tensor of `of`'s
    values and layout. Other saved tensors (weights) are saved as usual."""
    if not of.is_contiguous():
        raise ValueError("recompute_saved needs a contiguous tensor (a rebuilt one is contiguous)")
    # The hooks must not hold `of`: autograd keeps them with every tensor saved in the block.
    ptr, device, base = of.untyped_storage().data_ptr(), of.device, of.storage_offset()
    shared = _Rebuilt(rebuild)

    def pack(t: Tensor):
        if t.untyped_storage().data_ptr() != ptr or t.device != device:
            return t
        return shared, tuple(t.shape), t.stride(), t.storage_offset() - base

    def unpack(packed):
        if isinstance(packed, Tensor):
            return packed
        holder, shape, stride, offset = packed
        value = holder.get()
        return value.as_strided(shape, stride, value.storage_offset() + offset)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield
