"""The experts' grouped GEMMs: one op whatever the device, the kernels sealed inside this package.

Operands are generic: `x` [rows, in_width] grouped by expert (`counts[j]` rows for expert j, in
expert order), `w_stack` [experts, in_width, out_width]; the result is [rows, out_width].

    grouped_mm(x, w_stack, counts, backend)                  segment j of x times w_stack[j]
    gather_grouped_mm(source, index, w_stack, counts, backend)   the same for x = source[index]

Both are differentiable in the rows and the weights, and an expert without rows gets a zero
weight gradient. Which kernel runs is decided here (`ops.pick`), from the operands' device and
dtype and `backend`, the configured `moe.expert_impl` (one of BACKENDS):

    auto        `mkl` where it runs, else `grouped_mm` where it takes the operands, else `loop`
    mkl         the CPU backend, fp32 on CPU (`kernels/cpu`): our AVX-512 kernels where they
                build, else MKL's batch GEMM; segments that fill every thread as GEMMs of their own
    grouped_mm  `torch._grouped_mm` (`kernels/portable.py`)
    loop        one matmul per expert (`kernels/portable.py`)
"""

from moe_dist.kernels.ops import BACKENDS, check_backend, gather_grouped_mm, grouped_mm

__all__ = ["BACKENDS", "check_backend", "gather_grouped_mm", "grouped_mm"]
