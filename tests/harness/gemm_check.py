"""Helpers shared by the kernel tests (pytest puts this folder on sys.path for them)."""

import pytest
import torch

from moe_dist.kernels import grouped_mm
from moe_dist.kernels.cpu import mkl_grouped

needs_mkl = pytest.mark.skipif(not mkl_grouped.available(torch.randn(1, 4), torch.randn(1, 4, 4)),
                               reason="this PyTorch build has no usable MKL batch GEMM")


def assert_mkl_matches_the_loop(x: torch.Tensor, w: torch.Tensor, counts: list[int],
                                atol: float = 1e-5) -> torch.Tensor:
    """`grouped_mm(backend='mkl')` (MKL's batch GEMM, our AVX-512 kernels or separate GEMMs,
    whichever the sizes pick) against the per-expert loop: output, input gradient and weight
    gradient agree; returns the `mkl` weight gradient."""
    grad_y = torch.randn(x.shape[0], w.shape[2])
    results = []
    for backend in ("mkl", "loop"):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = grouped_mm(xi, wi, counts, backend)
        y.backward(grad_y)
        results.append((y, xi.grad, wi.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=atol)
    return results[0][2]

