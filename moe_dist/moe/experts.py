"""Local experts as stacked weights and one grouped GEMM per projection.

Legend: e local experts, N rows (tokens routed here, grouped by expert), D model width, F expert
hidden width (per branch).

Rows arrive sorted by expert with `counts_e[j]` rows for local expert j; each projection is one
grouped GEMM over those exact segments (no capacity padding is ever multiplied): MKL's batch GEMM
for fp32 on CPU, `torch._grouped_mm` where it takes the dtype/device, else a loop of plain
matmuls over the same segments.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_dist.common.seeding import init_generator
from moe_dist.kernels.cpu import mkl_grouped


def _grouped_mm_supported(x: Tensor, w: Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    # The kernel requires 16-byte aligned row strides of both operands and of the output.
    if any((n * x.element_size()) % 16 for n in (x.shape[-1], w.shape[-1])):
        return False
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.bfloat16, torch.float16)
    if x.device.type == "cuda":  # the CUDA kernel is bf16-only on Hopper and newer
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (9, 0)
    return False


def _use_mkl(x: Tensor, w: Tensor, impl: str) -> bool:
    """Whether `impl` means MKL's batch GEMM for these operands (`auto`: where it can run)."""
    if impl not in ("auto", "mkl"):
        return False
    if mkl_grouped.available(x, w):
        return True
    if impl == "mkl":
        raise RuntimeError(f"expert_impl 'mkl' needs fp32 CPU tensors and PyTorch's MKL; got "
                           f"{x.dtype} on {x.device} (use 'auto')")
    return False


def grouped_matmul(x_ND: Tensor, w_eDF: Tensor, counts_e: list[int], impl: str = "auto") -> Tensor:
    """Row segment j of `x_ND` (counts_e[j] rows) times `w_eDF[j]`.

    `auto` picks MKL's batch GEMM for fp32 on CPU (experts in parallel, `mkl_grouped`), else
    `torch._grouped_mm` where it takes the dtype/device/alignment, else the loop."""
    if _use_mkl(x_ND, w_eDF, impl):
        return mkl_grouped.segment_matmul(x_ND, w_eDF, counts_e)
    if impl == "grouped_mm" or (impl == "auto" and _grouped_mm_supported(x_ND, w_eDF)):
        offs = torch.tensor(counts_e, device=x_ND.device).cumsum(0).to(torch.int32)
        return torch._grouped_mm(x_ND, w_eDF, offs=offs)
    segments = torch.split(x_ND, counts_e)
    return torch.cat([seg @ w_eDF[j] for j, seg in enumerate(segments)])


def ffn_activation(h_NF: Tensor, activation: str) -> Tensor:
    """GELU, or SwiGLU on the fused [gate | up] projection (halves the width)."""
    if activation == "swiglu":
        gate_NF, up_NF = h_NF.chunk(2, dim=-1)
        return F.silu(gate_NF) * up_NF
    return F.gelu(h_NF)


class GroupedExperts(nn.Module):
    """`num_local` FFN experts (SwiGLU or GELU) in stacked weight tensors.

    Global expert `first_expert + j` is drawn from `init_generator(seed, layer_index, id)`, so it
    has the same weights whatever the expert-parallel size.
    """

    def __init__(self, num_local: int, d_model: int, d_ff: int, activation: str, *, first_expert: int,
                 seed: int, layer_index: int, init_std: float, impl: str = "auto") -> None:
        super().__init__()
        self.activation = activation
        if impl == "mkl" and not mkl_grouped.available(torch.empty(1, 1), torch.empty(1, 1, 1)):
            raise ValueError("moe.expert_impl 'mkl': this PyTorch build has no usable MKL batch GEMM "
                             "(use 'auto', 'grouped_mm' or 'loop')")
        self.impl = impl
        in_width = 2 * d_ff if activation == "swiglu" else d_ff  # SwiGLU's gate and up, fused
        self.w_in_eDF = nn.Parameter(torch.empty(num_local, d_model, in_width))
        self.w_out_eFD = nn.Parameter(torch.empty(num_local, d_ff, d_model))
        out_std = init_std / math.sqrt(2.0)  # keep the residual stream's scale after the sum
        with torch.no_grad():
            for j in range(num_local):
                g = init_generator(seed, layer_index, first_expert + j)
                self.w_in_eDF[j].copy_(torch.randn(d_model, in_width, generator=g) * init_std)
                self.w_out_eFD[j].copy_(torch.randn(d_ff, d_model, generator=g) * out_std)

        # Optional `(h_NF, x_ND, counts_e) -> h_NF` applied to the hidden units (e.g. COMET's mask).
        self.hidden_mask: nn.Module | None = None

    def forward(self, source_SD: Tensor, index_N: Tensor, counts_e: list[int]) -> Tensor:
        """The experts' outputs for the rows `source_SD[index_N]`, which are grouped by local
        expert (`counts_e[j]` rows for expert j). The gather is left to the first projection:
        on the MKL path it then never keeps the gathered copy for the backward."""
        w_in_eDF = self.w_in_eDF.to(source_SD.dtype)
        if _use_mkl(source_SD, w_in_eDF, self.impl):
            h_NF = mkl_grouped.gather_segment_matmul(source_SD, index_N, w_in_eDF, counts_e)
        else:
            h_NF = grouped_matmul(source_SD.index_select(0, index_N), w_in_eDF, counts_e, self.impl)
        h_NF = ffn_activation(h_NF, self.activation)
        if self.hidden_mask is not None:  # COMET's mask reads the rows without gradient: regather
            h_NF = self.hidden_mask(h_NF, source_SD.index_select(0, index_N), counts_e)
        return grouped_matmul(h_NF, self.w_out_eFD.to(source_SD.dtype), counts_e, self.impl)


class DenseFFN(nn.Module):
    """The same FFN as one expert, for dense layers and shared experts."""

    def __init__(self, d_model: int, d_ff: int, activation: str, *, init_std: float,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.activation = activation
        in_width = 2 * d_ff if activation == "swiglu" else d_ff
        self.w_in_DF = nn.Parameter(torch.randn(d_model, in_width, generator=generator) * init_std)
        self.w_out_FD = nn.Parameter(torch.randn(d_ff, d_model, generator=generator) * init_std / math.sqrt(2.0))

    def forward(self, x_TD: Tensor) -> Tensor:
        h_TF = ffn_activation(x_TD @ self.w_in_DF.to(x_TD.dtype), self.activation)
        return h_TF @ self.w_out_FD.to(x_TD.dtype)
