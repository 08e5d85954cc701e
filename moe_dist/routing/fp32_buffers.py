"""A module whose own floating buffers stay fp32 when the model is cast.

DeepSpeed's bf16 mode calls `module.bfloat16()`, which casts every floating buffer too. Routing
state would suffer: an EMA updated by 1% steps stalls at bf16's 8-bit mantissa, and a frozen
projection rounded to bf16 is no longer the fp32 matrix that the seed defines (and no longer
matches fp32 inputs in a matmul). Routers compute in fp32 anyway, so their state stays fp32.
Device moves still apply.
"""

from __future__ import annotations

import torch
from torch import nn


class FP32Buffers(nn.Module):
    def _apply(self, fn, recurse=True):
        # Keep the fp32 originals: casting back after a bf16 round trip would keep the rounding.
        fp32 = {name: buf for name, buf in self._buffers.items() if buf is not None and buf.dtype == torch.float32}
        super()._apply(fn, recurse)
        for name, original in fp32.items():
            moved = self._buffers[name]
            if moved.dtype != torch.float32:
                self._buffers[name] = original.to(moved.device)
        return self
