"""The MoE layer's six expert GEMMs against the floor's dense GEMMs, with the expert weights
streamed from memory and with them held in cache: how much of the layer's gap to the floor is
the E weight matrices it must read (and the E gradient matrices it must write) every step.

Legend: moe_dist/moe/__init__.py (M rows the experts run: kept pairs, grouped by expert); R = T*K
rows of the floor.

Per GEMM of the layer (fwd1 x@W1, fwd2 h@W2, dx2 g@W2.T, dW2 h.T@g, dx1 gh@W1.T, dW1 x.T@gh),
three variants, each with preallocated outputs, timed in interleaved rounds (median):
  dense    one GEMM over the floor's R rows with one [D, F] weight (tools/bench/moe.py's floor)
  grouped  the CPU backend's segment GEMMs (moe_dist/kernels/cpu/mkl_grouped.py) over the
           layer's real per-expert row counts (the routing of tools/bench/moe.py's input), every
           expert with its own weights: what the layer runs
  cached   the same call with every expert reading expert 0's weights (an expanded view)
           or writing its gradient into one shared buffer, which therefore stay in cache: the
           same arithmetic, row counts and threading without streaming E weight matrices
`cached`'s shared gradient buffer is written by every thread at once, which some runs showed as
contention between the cores (BENCHMARKS.md), so read a `cached` dW far above `dense` as that,
not as a bound. The library's `segment_outer` writes only contiguous gradient stacks; the shared
buffer goes to its raw products (`outer_products`), which take any stack of dense matrices.
`grouped - cached` is what streaming the weights costs; `stream_ms` is what moving their bytes at
the measured bandwidth takes, the part a kernel that prefetched the next expert's weights during
the current one could hide; `cached / dense` is what would remain.

    python -m tools.bench.expert_gemms --threads 2            # E = 8, 64, 256; table on stdout
    python -m tools.bench.expert_gemms --threads 2 --json     # one JSON object per E
    MOE_DIST_AVX512_GEMM=0 python -m tools.bench.expert_gemms --threads 2   # MKL instead of our kernels
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm import tqdm

from moe_dist.kernels.cpu import mkl_grouped
from moe_dist.moe.capacity import assign_slots
from moe_dist.routing.base import RoutingContext

from .layers import build_moe_dist_layer, make_inputs
from .spec import Spec, add_spec_args, check_spec_args, configure_malloc, spec_from_args
from .timing import time_cases

log = logging.getLogger("bench_expert_gemms")

VARIANTS = ("dense", "grouped", "cached")


@dataclass(frozen=True)
class Gemm:
    name: str
    weight: str  # "w1" [E, D, F] or "w2" [E, F, D]: the matrix read, or whose gradient is written
    kind: str  # "mm": rows @ W, "mm_t": rows @ W.T, "outer": lhs.T @ rhs (a weight gradient)
    lhs: str  # row operand: x_D, h_F, g_D, gh_F
    rhs: str | None = None  # second row operand of an outer product


GEMMS = (
    Gemm("fwd1", "w1", "mm", "x_D"),
    Gemm("fwd2", "w2", "mm", "h_F"),
    Gemm("dx2", "w2", "mm_t", "g_D"),
    Gemm("dW2", "w2", "outer", "h_F", "g_D"),
    Gemm("dx1", "w1", "mm_t", "gh_F"),
    Gemm("dW1", "w1", "outer", "x_D", "gh_F"),
)


@torch.no_grad()
def routed_counts(spec: Spec) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """Rows per expert after the capacity drop for tools/bench/moe.py's input, and the layer's
    expert weights (w1 [E, D, F], w2 [E, F, D])."""
    layer = build_moe_dist_layer(spec)
    x, _ = make_inputs(spec, spec.tokens)
    route = layer.router(x, RoutingContext(training=True))
    plan = assign_slots(route.idx_TK, spec.num_experts, layer.capacity(spec.tokens), "position")
    return plan.kept_E.tolist(), layer.experts.w_in_EDI.detach(), layer.experts.w_out_EFD.detach()


def _rows(spec: Spec, n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    D, F = spec.d_model, spec.d_ff
    return {"x_D": torch.randn(n, D, generator=g), "h_F": torch.randn(n, F, generator=g),
            "g_D": torch.randn(n, D, generator=g), "gh_F": torch.randn(n, F, generator=g)}


def make_variants(gemm: Gemm, spec: Spec, counts_e: list[int], weights: dict[str, torch.Tensor]
                  ) -> dict[str, Callable[[], None]]:
    """One no-argument function per variant, each computing `gemm` into buffers made here."""
    W = weights[gemm.weight]
    E, M, R = W.shape[0], sum(counts_e), spec.tokens * spec.top_k
    rows, dense_rows = _rows(spec, M, 1), _rows(spec, R, 2)
    w_dense = W[0].clone()
    transpose = gemm.kind == "mm_t"

    if gemm.kind == "outer":
        a, b = rows[gemm.lhs], rows[gemm.rhs]
        dW, dW_shared = torch.empty_like(W), torch.empty_like(w_dense).expand_as(W)
        dense_a, dense_b, dense_out = dense_rows[gemm.lhs], dense_rows[gemm.rhs], torch.empty_like(w_dense)
        return {"dense": lambda: torch.mm(dense_a.t(), dense_b, out=dense_out),
                "grouped": lambda: mkl_grouped.segment_outer(a, b, counts_e, out=dW),
                "cached": lambda: mkl_grouped.outer_products(a, b, counts_e, dW_shared)}

    a, out_width = rows[gemm.lhs], (W.shape[1] if transpose else W.shape[2])
    y, dense_a, dense_y = torch.empty(M, out_width), dense_rows[gemm.lhs], torch.empty(R, out_width)
    w_dense_op = w_dense.t() if transpose else w_dense
    W_shared = w_dense.expand(E, *w_dense.shape)
    return {"dense": lambda: torch.mm(dense_a, w_dense_op, out=dense_y),
            "grouped": lambda: mkl_grouped.segment_mm(a, W, counts_e, transpose, out=y),
            "cached": lambda: mkl_grouped.segment_mm(a, W_shared, counts_e, transpose, out=y)}


def memory_bandwidth_gbs(mib: int = 256, repeats: int = 5) -> tuple[float, float]:
    """(read, write) GB/s of this process's threads over a buffer far larger than any cache:
    the medians of `repeats` passes after one unmeasured pass."""
    buf = torch.ones(mib * 2**20 // 4)
    read, write = [], []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        buf.sum()
        t1 = time.perf_counter()
        buf.fill_(1.0)
        t2 = time.perf_counter()
        read.append(t1 - t0)
        write.append(t2 - t1)
    gb = buf.numel() * 4 / 1e9
    return gb / statistics.median(read[1:]), gb / statistics.median(write[1:])


def bench_one(spec: Spec, warmup: int, repeats: int, progress: tqdm | None) -> dict:
    counts_e, w1, w2 = routed_counts(spec)
    weights = {"w1": w1.contiguous(), "w2": w2.contiguous()}
    expert_bytes = spec.d_model * spec.d_ff * 4
    read_gbs, write_gbs = memory_bandwidth_gbs()
    row = {"num_experts": spec.num_experts, "tokens": spec.tokens, "d_model": spec.d_model,
           "d_ff": spec.d_ff, "top_k": spec.top_k, "capacity_factor": spec.capacity_factor,
           "threads": spec.threads, "cpu_malloc": spec.cpu_malloc, "rows": sum(counts_e),
           "rows_per_expert": [min(counts_e), round(sum(counts_e) / len(counts_e), 1), max(counts_e)],
           "read_gbs": round(read_gbs, 1),
           "write_gbs": round(write_gbs, 1), "gemms": {}}
    total = dict.fromkeys((*VARIANTS, "stream"), 0.0)
    for gemm in GEMMS:
        variants = make_variants(gemm, spec, counts_e, weights)
        ms, _ = time_cases(variants, warmup, repeats, progress)
        # Every expert's weight matrix is read once, or its gradient written once.
        bandwidth = write_gbs if gemm.kind == "outer" else read_gbs
        ms["stream"] = spec.num_experts * expert_bytes / (bandwidth * 1e9) * 1e3
        row["gemms"][gemm.name] = {f"{k}_ms": round(v, 4) for k, v in ms.items()}
        for k in total:
            total[k] += ms[k]
    row.update({f"{k}_ms": round(v, 4) for k, v in total.items()})
    for k in ("grouped", "cached"):
        row[f"{k}_over_dense"] = round(total[k] / total["dense"], 3)
    row["grouped_minus_cached_ms"] = round(total["grouped"] - total["cached"], 2)
    row["versions"] = {"torch": torch.__version__}
    return row


def format_table(rows: list[dict]) -> str:
    head = ("| E | rows/expert min/mean/max | dense ms | grouped ms | cached ms | grouped/dense | "
            "cached/dense | grouped - cached ms | stream ms (read/write GB/s) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        rpe = "/".join(str(v) for v in r["rows_per_expert"])
        lines.append(f"| {r['num_experts']} | {rpe} | {r['dense_ms']:.0f} | {r['grouped_ms']:.0f} | "
                     f"{r['cached_ms']:.0f} | {r['grouped_over_dense']:.2f} | "
                     f"{r['cached_over_dense']:.2f} | {r['grouped_minus_cached_ms']:.0f} | "
                     f"{r['stream_ms']:.0f} ({r['read_gbs']}/{r['write_gbs']}) |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.bench.expert_gemms",
                                description=__doc__.split("\n\n")[0])
    add_spec_args(p)
    args = p.parse_args(argv)
    check_spec_args(p, args)
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    probe = torch.ones(1, 1)
    if not mkl_grouped.available(probe, probe.view(1, 1, 1)):
        raise SystemExit("this PyTorch build has no usable MKL batch GEMM (mkl_grouped.available)")
    torch.set_num_threads(args.threads)
    configure_malloc(args.cpu_malloc)
    rows = []
    total = len(args.num_experts) * len(GEMMS) * (args.warmup + args.repeats)
    with tqdm(total=total, desc="bench_expert_gemms rounds", file=sys.stderr, disable=None) as progress:
        for E in args.num_experts:
            row = bench_one(spec_from_args(args, E), args.warmup, args.repeats, progress)
            log.info("E=%d: grouped/dense %.2f, cached/dense %.2f, grouped - cached %.0f ms, "
                     "stream %.0f ms", E, row["grouped_over_dense"], row["cached_over_dense"],
                     row["grouped_minus_cached_ms"], row["stream_ms"])
            rows.append(row)
            if args.json:
                print(json.dumps(row), flush=True)
    if not args.json:
        print(format_table(rows))
    return rows


if __name__ == "__main__":
    main()
