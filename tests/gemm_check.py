"""One check shared by the grouped-GEMM tests: `grouped_matmul('mkl')` (MKL's batch GEMM, our AVX-512
kernels or separate GEMMs, whichever the sizes pick) against the per-expert loop."""

import torch

from moe_dist.moe.experts import grouped_matmul


def assert_mkl_matches_the_loop(x: torch.Tensor, w: torch.Tensor, counts: list[int],
                                atol: float = 1e-5) -> torch.Tensor:
    """Output, input gradient and weight gradient agree; returns the `mkl` weight gradient."""
    grad_y = torch.randn(x.shape[0], w.shape[2])
    results = []
    for impl in ("mkl", "loop"):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = grouped_matmul(xi, wi, counts, impl)
        y.backward(grad_y)
        results.append((y, xi.grad, wi.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=atol)
    return results[0][2]
