"""Local experts as stacked weights and one grouped GEMM per projection.

Legend: moe_dist/moe/__init__.py. The experts run M rows grouped by local expert (`counts_e[j]`
rows for expert j, a device tensor; rows past their sum are dropped pairs, which come out zero),
gathered by `index_M` from the U rows of `source_UD`. The parameters are
named by their consolidated shape (`w_in_EDI`: [E, D, I]); a rank holds its [e, D, I] slice.

Each projection is one grouped GEMM over those exact segments (no capacity padding is ever
multiplied), through `moe_dist.kernels`, which picks the kernel for the device and dtype inside
its op: this module has no device branch and never reads the counts.
`recompute` (`model.moe_recompute`) trades the activations autograd keeps for work in the
backward (`moe_dist.moe.recompute`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from moe_dist.common.config import check_choice
from moe_dist.common.seeding import init_generator
from moe_dist.kernels import check_backend, gather_grouped_mm, grouped_mm
from moe_dist.moe.recompute import RECOMPUTE_MODES, recompute_saved


def ffn_activation(h: Tensor, activation: str) -> Tensor:
    """GELU, or SwiGLU on the fused [gate | up] projection (halves the width)."""
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(h)


class GroupedExperts(nn.Module):
    """`num_local` FFN experts (SwiGLU or GELU) in stacked weight tensors.

    Global expert `first_expert + j` is drawn from `init_generator(seed, layer_index, id)`, so it
    has the same weights whatever the expert-parallel size.
    """

    def __init__(self, num_local: int, d_model: int, d_ff: int, activation: str, *, first_expert: int,
                 seed: int, layer_index: int, init_std: float, impl: str = "auto",
                 recompute: str = "none") -> None:
        super().__init__()
        self.activation = activation
        check_backend(impl)
        check_choice("model.moe_recompute", recompute, RECOMPUTE_MODES)
        self.impl = impl
        self.recompute = recompute
        in_width = 2 * d_ff if activation == "swiglu" else d_ff  # I: SwiGLU's gate and up, fused
        self.w_in_EDI = nn.Parameter(torch.empty(num_local, d_model, in_width))
        self.w_out_EFD = nn.Parameter(torch.empty(num_local, d_ff, d_model))
        out_std = init_std / math.sqrt(2.0)  # keep the residual stream's scale after the sum
        with torch.no_grad():
            for j in range(num_local):
                g = init_generator(seed, layer_index, first_expert + j)
                self.w_in_EDI[j].copy_(torch.randn(d_model, in_width, generator=g) * init_std)
                self.w_out_EFD[j].copy_(torch.randn(d_ff, d_model, generator=g) * out_std)

        # Optional `(h_MF, x_MD, counts_e) -> h_MF` applied to the hidden units (e.g. COMET's mask).
        self.hidden_mask: nn.Module | None = None

    def forward(self, source_UD: Tensor, index_M: Tensor, counts_e: Tensor) -> Tensor:
        """The experts' outputs for the rows `source_UD[index_M]`, which are grouped by local
        expert (`counts_e[j]` rows for expert j). The gather is left to the first projection, so
        a backend can keep (source, index) for the backward instead of the gathered copy."""
        if self.recompute == "experts" and torch.is_grad_enabled():
            # The region's inputs are the dispatched source and index: the backward regathers
            # from them, it never dispatches again.
            return checkpoint(self._ffn, source_UD, index_M, counts_e, use_reentrant=False)
        return self._ffn(source_UD, index_M, counts_e)

    def _ffn(self, source_UD: Tensor, index_M: Tensor, counts_e: Tensor) -> Tensor:
        w_in_eDI = self.w_in_EDI.to(source_UD.dtype)
        w_out_eFD = self.w_out_EFD.to(source_UD.dtype)
        h_MI = gather_grouped_mm(source_UD, index_M, w_in_eDI, counts_e, self.impl)
        if self.recompute != "activation" or not torch.is_grad_enabled():
            return grouped_mm(self._hidden(h_MI, source_UD, index_M, counts_e), w_out_eFD, counts_e, self.impl)
        # Keep h only: the activation's own saved tensors are dropped by the checkpoint, and the
        # copy the second projection saves for its weight gradient is rebuilt from h.
        a_MF = checkpoint(self._hidden, h_MI, source_UD, index_M, counts_e, use_reentrant=False)
        with recompute_saved(a_MF, lambda: self._hidden(h_MI, source_UD, index_M, counts_e)):
            return grouped_mm(a_MF, w_out_eFD, counts_e, self.impl)

    def _hidden(self, h_MI: Tensor, source_UD: Tensor, index_M: Tensor, counts_e: Tensor) -> Tensor:
        a_MF = ffn_activation(h_MI, self.activation)
        if self.hidden_mask is not None:  # COMET's mask reads the rows without gradient: regather
            a_MF = self.hidden_mask(a_MF, source_UD.index_select(0, index_M), counts_e)
        return a_MF


class DenseFFN(nn.Module):
    """The same FFN as one expert, for dense layers and shared experts."""

    def __init__(self, d_model: int, d_ff: int, activation: str, *, init_std: float,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.activation = activation
        in_width = 2 * d_ff if activation == "swiglu" else d_ff  # I
        self.w_in_DI = nn.Parameter(torch.randn(d_model, in_width, generator=generator) * init_std)
        self.w_out_FD = nn.Parameter(torch.randn(d_ff, d_model, generator=generator) * init_std / math.sqrt(2.0))

    def forward(self, x_TD: Tensor) -> Tensor:
        h_TF = ffn_activation(x_TD @ self.w_in_DI.to(x_TD.dtype), self.activation)
        return h_TF @ self.w_out_FD.to(x_TD.dtype)
