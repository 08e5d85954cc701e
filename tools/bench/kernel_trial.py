"""The per-machine kernel trial (`moe_dist/kernels/cpu/kernel_choice.py`) against a direct timing
of the CPU backend's own calls: does the trial's verdict (kernels over MKL, below `MARGIN`) match
what the backend's entry points measure on this machine?

Each round runs one fresh trial (`time_both`) and then the trial's three products (x@W, dy@W.T,
x.T@dy over the trial's alternating row counts) through `mkl_grouped.segment_mm` /
`outer_products` with the choice forced each way, weights used in turn as the trial does (median
per product). Printed per round: the trial's kernels/MKL time ratio, the direct ratio, and whether
the two agree on the side of 1 where the direct timing is clear of the noise (outside 0.8-1.25).
Times are never asserted anywhere: this is for reading, on a quiet machine.

    python -m tools.bench.kernel_trial --rounds 5
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

import torch

from moe_dist.kernels.cpu import avx512_gemm, kernel_choice, mkl_grouped

CLEAR = (0.8, 1.25)  # direct ratios inside this band are a tie on a shared machine


def direct_ratio(repeats: int = 7) -> float:
    """The kernels' time over MKL's for the trial's three products, through the backend."""
    threads = torch.get_num_threads()
    rows = [kernel_choice.ROWS[j % 2] for j in range(kernel_choice.EXPERTS_PER_THREAD * threads)]
    d, f, e = kernel_choice.D, kernel_choice.F, len(rows)
    x, dy = torch.randn(sum(rows), d), torch.randn(sum(rows), f)
    pool = torch.empty(kernel_choice._weight_sets(e), e, d, f).uniform_(-0.05, 0.05)
    products = [lambda k: mkl_grouped.segment_mm(x, pool[k], rows, False),
                lambda k: mkl_grouped.segment_mm(dy, pool[k], rows, True),
                lambda k: mkl_grouped.outer_products(x, dy, rows, pool[k])]
    times: dict[str, list[list[float]]] = {"1": [[], [], []], "0": [[], [], []]}
    before, turn = os.environ.get(kernel_choice.ENV), 0
    try:
        for r in range(repeats + 1):  # round 0 warms both paths
            for value in ("1", "0") if r % 2 else ("0", "1"):  # alternate which path goes first
                os.environ[kernel_choice.ENV] = value
                for i, product in enumerate(products):
                    t0 = time.perf_counter()
                    product(turn % len(pool))
                    turn += 1
                    if r:
                        times[value][i].append(time.perf_counter() - t0)
    finally:
        if before is None:
            os.environ.pop(kernel_choice.ENV, None)
        else:
            os.environ[kernel_choice.ENV] = before
    total = {v: sum(statistics.median(ts) for ts in per) for v, per in times.items()}
    return total["1"] / total["0"]


def trial_ratio(lib) -> float:
    runs = kernel_choice.time_both(functools.partial(avx512_gemm._launch, lib))
    hand_s, mkl_s = (sum(t) for t in zip(*runs))
    return hand_s / mkl_s


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="fresh trials, each with its direct timing")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error(f"--rounds {args.rounds}: expected at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    lib = avx512_gemm._library()
    if lib is None or not avx512_gemm._self_check():
        print("no AVX-512 kernels here (no AVX-512 CPU, no C compiler or a failed self-check)")
        return 1
    print(f"threads {torch.get_num_threads()}, MARGIN {kernel_choice.MARGIN}, clear outside {CLEAR}")
    print("round  trial(kernels/MKL)  direct(kernels/MKL)  verdicts")
    for r in range(args.rounds):
        trial, direct = trial_ratio(lib), direct_ratio()
        clear = not CLEAR[0] <= direct <= CLEAR[1]
        verdict = ("agree" if (trial < kernel_choice.MARGIN) == (direct < 1) else "DISAGREE") if clear else "tie"
        print(f"{r:5d}  {trial:18.3f}  {direct:19.3f}  {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
