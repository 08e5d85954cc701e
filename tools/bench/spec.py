"""The MoE layer a benchmark builds (`Spec`) and the command-line flags that set it, shared by
tools/bench/moe.py and tools/bench/expert_gemms.py so both measure the same layer for the same flags.

Legend: T tokens, D model width, F expert hidden width, E experts, K experts per token.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from moe_dist.common.cpus import usable_cpus

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Spec:
    tokens: int
    d_model: int
    d_ff: int
    num_experts: int
    top_k: int
    capacity_factor: float
    threads: int
    seed: int = 0
    cpu_malloc: str = "keep"  # or "default" (see --cpu-malloc)
    device: str = "cpu"  # or "cuda"
    dtype: str = "fp32"  # or "bf16"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def expert_flops(self) -> float:
        """Forward+backward FLOPs of the expert work: two GEMMs of T*K rows, 2 FLOPs per
        multiply-add, the backward twice the forward."""
        return 12.0 * self.tokens * self.top_k * self.d_model * self.d_ff


def add_spec_args(p: argparse.ArgumentParser) -> None:
    """The layer shape, timing and allocator flags."""
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--d-ff", type=int, default=1024)
    p.add_argument("--num-experts", type=int, nargs="+", default=[8, 64, 256])
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--capacity-factor", type=float, default=1.25)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=usable_cpus())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu-malloc", choices=("keep", "default"), default="keep",
                   help="keep: glibc keeps freed memory, as the trainer has it on CPU (default); "
                        "default: glibc unchanged (large blocks unmapped on free)")
    p.add_argument("--json", action="store_true", help="print one JSON object per configuration")


def check_spec_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.repeats < 1 or args.warmup < 0:
        p.error(f"--repeats ({args.repeats}) must be >= 1 and --warmup ({args.warmup}) >= 0")
    if min(args.threads, args.tokens, args.d_model, args.d_ff, args.top_k) < 1:
        p.error(f"--threads ({args.threads}), --tokens ({args.tokens}), --d-model ({args.d_model}), "
                f"--d-ff ({args.d_ff}) and --top-k ({args.top_k}) must be >= 1")
    if min(args.num_experts) < max(2, args.top_k):
        p.error(f"--num-experts {args.num_experts}: each must be >= 2 and >= --top-k ({args.top_k})")
    if args.capacity_factor <= 0:
        p.error(f"--capacity-factor ({args.capacity_factor}) must be > 0 (drop_tokens=True)")


def spec_from_args(args: argparse.Namespace, num_experts: int) -> Spec:
    return Spec(tokens=args.tokens, d_model=args.d_model, d_ff=args.d_ff, num_experts=num_experts,
                top_k=args.top_k, capacity_factor=args.capacity_factor, threads=args.threads,
                seed=args.seed, cpu_malloc=args.cpu_malloc, device=getattr(args, "device", "cpu"),
                dtype=getattr(args, "dtype", "fp32"))


def configure_malloc(mode: str) -> None:
    """`--cpu-malloc` for this process; the memory-measuring children call it too, so they
    allocate as the timed process does."""
    from moe_dist.common import malloc as cpu_malloc

    if mode == "keep" and not cpu_malloc.keep_freed_memory():
        raise RuntimeError("--cpu-malloc keep needs glibc; use --cpu-malloc default here")
