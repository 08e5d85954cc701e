"""The CPU backend: MKL's batch GEMM and our own AVX-512 kernels, for fp32 on CPU."""
