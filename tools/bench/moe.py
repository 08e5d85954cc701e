"""Forward+backward time and peak memory of one MoE layer: moe_dist vs DeepSpeed's MoE vs a floor.

Legend: T tokens, D model width, F expert hidden width, E experts, K experts per token.

Cases, same shapes, dtype (`--dtype`, fp32 by default) and device (`--device`, cpu by default),
same thread count, in one process:
  moe_dist   `MoELayer` (single process, ep_size 1, GELU experts, top-k, capacity factor cf).
  deepspeed  `deepspeed.moe.layer.MoE` (ep_size 1, k=K, same cf for train and eval,
             drop_tokens=True, no random token selection, no noisy gate, no 2nd-expert sampling),
             with bias-free GELU experts and the moe_dist layer's router and expert weights copied
             in, so both layers route every token to the same experts and drop the same pairs.
  megatron   Megatron-Core's `MoELayer` (EP=1, alltoall dispatcher, same k, cf and widths) with
             its fastest expert MLP that builds here (TEGroupedMLP, GroupedMLP, SequentialMLP:
             tools/bench/megatron.py); the row names the class that ran. It builds only on CUDA:
             on CPU the case is reported as skipped with the reason. On by default with --device cuda.
  floor      the expert work with no routing at all: T*K rows through one dense GEMM pair,
             x[T*K, D] @ W1[D, F] -> GELU -> @ W2[F, D].

TFLOP/s: the expert work, 12 * T * K * D * F FLOPs per forward+backward (two GEMMs of T*K rows,
2 FLOPs per multiply-add, the backward twice the forward), over each case's time; routing,
dispatch and dropped pairs are not counted, so it compares cases doing the same useful work.
With top_k > 2 DeepSpeed uses its generic top-k gate, whose drop order differs from moe_dist's:
the routing check is skipped (same_routing null) and only the work is comparable.

Time: warmup rounds, then `--repeats` timed rounds; each round runs every case once (interleaved,
so a burst of load from other processes hits all cases alike); the median is reported.
Peak memory: on CPU each case runs again in a fresh child process: the peak of tensor bytes held
during a step (profiler allocation events) and the peak RSS increase (tools/bench/step_memory.py); on
CUDA, in this process, `max_memory_allocated` during a step minus what was allocated before it
(RSS: null).
Failures: each case is built and run on its own. A reference (deepspeed, megatron, floor) that
cannot be built, or raises while it runs, is reported as skipped with the reason (exception type
and the first line of its message) and every other case keeps its numbers; a moe_dist failure is
reported the same way, and the command exits 1 once every row is printed. `--fail-reference
CASE[:build|run]` makes a case fail on purpose (tools/bench/inject.py).
Allocator: `--cpu-malloc keep` (the default, what the trainer does on CPU) has glibc keep freed
memory, as a GPU's caching allocator does (moe_dist/common/malloc.py); `default` leaves glibc
as it is. Both the timing and the memory children use the chosen one.

    python -m tools.bench.moe                      # default sweep E = 8, 64, 256, table on stdout
    python -m tools.bench.moe --json               # one JSON object per configuration
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import asdict
from typing import Callable

import torch
from tqdm import tqdm

from . import inject, megatron, step_memory
from .layers import (
    build_deepspeed_layer,
    build_moe_dist_layer,
    check_same_function,
    make_deepspeed_step,
    make_floor_step,
    make_inputs,
    make_moe_dist_step,
)
from .spec import DTYPES, Spec, add_spec_args, check_spec_args, configure_malloc, spec_from_args
from .timing import cuda_peak_mb, first_line, time_cases

log = logging.getLogger("bench_moe")

CASES = ("moe_dist", "deepspeed", "floor")
GPU_CASES = ("moe_dist", "deepspeed", "megatron", "floor")


def memory_step(case: str, spec: Spec) -> Callable[[], None]:
    """The step `step_memory` measures in its child process.

    One thread whatever `--threads` says: the tensors a step allocates do not depend on it, but
    with more threads their placement does (per-thread malloc arenas), which made repeated RSS
    measurements of the same case differ by up to 10%; with one they agree to about 1%."""
    torch.set_num_threads(1)
    configure_malloc(spec.cpu_malloc)
    if case == "floor":
        return make_floor_step(spec)
    md = build_moe_dist_layer(spec)
    if case == "moe_dist":
        return make_moe_dist_step(md, spec)
    return make_deepspeed_step(build_deepspeed_layer(spec, md), spec)


def build_steps(spec: Spec, cases: tuple[str, ...], failures: dict[str, str] | None = None) -> tuple[dict, dict, dict]:
    """(steps by case, fairness check and labels, failed cases with their reason).

    Each case is built on its own: one that cannot be built is left out with the reason ("Type:
    first line"), and the others are still built. DeepSpeed's layer takes moe_dist's router and
    expert weights, so it needs moe_dist's layer; the floor and Megatron-Core do not."""
    failures = failures or {}
    steps, check, failed = {}, {}, {}
    md = None
    try:
        inject.check_build(failures, "moe_dist")
        md = build_moe_dist_layer(spec)
        steps["moe_dist"] = make_moe_dist_step(md, spec)
    except Exception as e:
        failed["moe_dist"] = first_line(e)
    if "deepspeed" in cases:
        try:
            inject.check_build(failures, "deepspeed")
            if md is None:
                raise RuntimeError("DeepSpeed's layer takes moe_dist's weights, and moe_dist's layer failed to build")
            ds = build_deepspeed_layer(spec, md)
            check.update(check_same_function(md, ds, spec))
            steps["deepspeed"] = make_deepspeed_step(ds, spec)
        except Exception as e:
            failed["deepspeed"] = first_line(e)
        # In bf16 the two routers may round a near-tie differently; the work stays the same, so only
        # fp32 insists on identical routing (same_routing is reported either way). Different routing
        # in fp32 is a failure of the comparison, counted as moe_dist's: it may be moe_dist's bug.
        if check.get("same_routing") is False and spec.dtype == "fp32":
            failed["moe_dist"] = (f"moe_dist and DeepSpeed routed differently at E={spec.num_experts}: "
                                  "the comparison would not be like for like")
    if "megatron" in cases:
        try:
            inject.check_build(failures, "megatron")
            built = megatron.build_megatron_layer(spec, spec.torch_dtype)
            steps["megatron"] = megatron.make_megatron_step(built.layer, spec, make_inputs)
            check["megatron_mlp"] = built.label
            check["megatron_notes"] = built.notes
        except Exception as e:
            failed["megatron"] = first_line(e)
    if "floor" in cases:
        try:
            inject.check_build(failures, "floor")
            steps["floor"] = make_floor_step(spec)
        except Exception as e:
            failed["floor"] = first_line(e)
    steps = {c: inject.wrap_step(failures, c, step) for c, step in steps.items()}
    return steps, check, failed


def bench_one(spec: Spec, warmup: int, repeats: int, memory: bool, progress: tqdm | None,
              cases: tuple[str, ...] = CASES, failures: dict[str, str] | None = None) -> dict:
    """One configuration's row. A reference that fails to build or while it runs gets
    `{case}_skipped` (the reason) and the other cases their numbers; a moe_dist failure gets
    `moe_dist_failed`, which `row_failed` reports (the callers exit non-zero on it)."""
    steps, check, failed = build_steps(spec, cases, failures)
    log.info("E=%d: timing %d warmup + %d timed rounds of %s", spec.num_experts, warmup, repeats,
             ", ".join(steps))
    load_before = os.getloadavg()[0]
    ms, cpu_ms = time_cases(steps, warmup, repeats, progress, failed=failed)
    ran = tuple(ms)
    row = {**asdict(spec), **{f"{c}_ms": round(ms[c], 2) for c in ran}}
    row.update({f"{c}_tflops": spec.expert_flops() / (ms[c] * 1e-3) / 1e12 for c in ran})
    if "moe_dist" in ms:
        row.update({f"moe_dist_over_{c}": round(ms["moe_dist"] / ms[c], 3) for c in ran if c != "moe_dist"})
    if "deepspeed" in ms and "floor" in ms:
        row["deepspeed_over_floor"] = round(ms["deepspeed"] / ms["floor"], 3)
    row.update({f"{c}_cpu_ms": round(cpu_ms[c], 2) for c in ran})
    if "moe_dist" in cpu_ms and "floor" in cpu_ms:
        row["moe_dist_over_floor_cpu"] = round(cpu_ms["moe_dist"] / cpu_ms["floor"], 3)
    row["load1"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]  # before, after timing
    if memory:
        log.info("E=%d: peak memory%s", spec.num_experts, "" if spec.device == "cuda" else
                 ", one fresh process per case")
    for c in ran:
        tensor_mb = rss_mb = None
        if memory:
            try:
                if spec.device == "cuda":
                    tensor_mb = cuda_peak_mb(steps[c])
                else:
                    tensor_mb, rss_mb = step_memory.measure_peak_mb(memory_step, (c, spec))
            except Exception as e:  # the time stands; the memory says why it is missing
                row[f"{c}_peak_error"] = first_line(e)
                if c == "moe_dist":
                    failed[c] = f"peak memory: {first_line(e)}"
        row[f"{c}_peak_mb"] = None if tensor_mb is None else round(tensor_mb, 1)
        row[f"{c}_peak_rss_mb"] = None if rss_mb is None else round(rss_mb, 1)
    del steps
    if memory and row.get("moe_dist_peak_mb") and row.get("deepspeed_peak_mb"):
        row["moe_dist_over_deepspeed_peak"] = round(row["moe_dist_peak_mb"] / row["deepspeed_peak_mb"], 3)
        if spec.device != "cuda" and None not in (row["moe_dist_peak_rss_mb"], row["deepspeed_peak_rss_mb"]):
            row["moe_dist_over_deepspeed_peak_rss"] = round(
                row["moe_dist_peak_rss_mb"] / row["deepspeed_peak_rss_mb"], 3)
    for c, reason in failed.items():
        row["moe_dist_failed" if c == "moe_dist" else f"{c}_skipped"] = reason
    row.update(check)
    row["repeats"] = repeats
    row["glibc_tunables"] = os.environ.get("GLIBC_TUNABLES", "")  # set by hand, if at all
    row["versions"] = {"torch": torch.__version__, "deepspeed": _deepspeed_version()}
    if spec.device == "cuda":
        row["gpu"] = torch.cuda.get_device_name()
    return row


def row_failed(row: dict) -> bool:
    """Whether moe_dist failed in this row (a skipped reference is not a failure)."""
    return "moe_dist_failed" in row


def _deepspeed_version() -> str | None:
    try:
        import deepspeed
    except ImportError:
        return None
    return deepspeed.__version__


def format_table(rows: list[dict]) -> str:
    """Markdown; peak memory as tensor MiB (RSS MiB) for moe_dist / DeepSpeed / floor; rows with
    a Megatron-Core case (GPU runs) or a case that failed get the per-case table instead."""
    if any(set(CASES) - {c for c in CASES if f"{c}_ms" in r} or "megatron_skipped" in r or "megatron_ms" in r
           for r in rows):
        return format_case_table(rows)
    head = ("| E | moe_dist ms | DeepSpeed ms | floor ms | moe_dist/floor | moe_dist/DeepSpeed "
            "| peak MiB moe_dist | peak MiB DeepSpeed | peak MiB floor |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        peaks = " | ".join(f"{r[f'{c}_peak_mb']} ({r[f'{c}_peak_rss_mb']})" for c in CASES)
        lines.append(f"| {r['num_experts']} | {r['moe_dist_ms']:.1f} | {r['deepspeed_ms']:.1f} | "
                     f"{r['floor_ms']:.1f} | {r['moe_dist_over_floor']:.2f} | "
                     f"{r['moe_dist_over_deepspeed']:.2f} | {peaks} |")
    return "\n".join(lines)


def case_status(row: dict, case: str) -> str | None:
    """"skipped: why" for a reference, "FAILED: why" for moe_dist, None where the case ran."""
    if case == "moe_dist" and "moe_dist_failed" in row:
        return f"FAILED: {row['moe_dist_failed']}"
    if f"{case}_skipped" in row:
        return f"skipped: {row[f'{case}_skipped']}"
    return None


def format_case_table(rows: list[dict]) -> str:
    """One line per (shape, case): ms, TFLOP/s of the expert work, moe_dist's time over the case's,
    peak MiB; a case that did not run says why."""
    lines = ["| shape | case | ms | TFLOP/s | moe_dist / case | peak MiB | note |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        shape = (f"T {r['tokens']} d {r['d_model']} d_ff {r['d_ff']} E {r['num_experts']} k {r['top_k']} "
                 f"{r['dtype']} {r['device']}")
        for c in GPU_CASES:
            name = r.get("megatron_mlp", c) if c == "megatron" else c
            status = case_status(r, c)
            if status is not None:
                lines.append(f"| {shape} | {name} | - | - | - | - | {status} |")
            elif f"{c}_ms" in r:
                ratio = r.get(f"moe_dist_over_{c}")
                note = "; ".join(r.get("megatron_notes", [])) if c == "megatron" else ""
                if f"{c}_peak_error" in r:
                    note = f"peak memory: {r[f'{c}_peak_error']}" + (f"; {note}" if note else "")
                lines.append(f"| {shape} | {name} | {r[f'{c}_ms']:.2f} | {r[f'{c}_tflops']:.3g} | "
                             f"{'-' if ratio is None else f'{ratio:.2f}'} | {r.get(f'{c}_peak_mb')} | {note} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.bench.moe",
                                description=__doc__.split("\n\n")[0])
    add_spec_args(p)
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    p.add_argument("--megatron", choices=("auto", "on", "off"), default="auto",
                   help="the Megatron-Core case: auto = on with --device cuda, off on CPU; on = "
                        "always (on CPU it is reported as skipped, with the reason)")
    p.add_argument("--fail-reference", action="append", default=[], metavar="CASE[:STAGE]",
                   help="make a case fail on purpose, to check that its row says why and the others "
                        f"survive; CASE one of {list(GPU_CASES)} (moe_dist: the run must exit 1), STAGE "
                        "build (default) or run (its step raises); repeatable")
    args = p.parse_args(argv)
    check_spec_args(p, args)
    try:
        args.failures = inject.parse_failures(args.fail_reference, GPU_CASES)
    except ValueError as e:
        p.error(str(e))
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch.cuda.is_available() is False here")
    megatron = args.megatron == "on" or (args.megatron == "auto" and args.device == "cuda")
    args.cases = GPU_CASES if megatron else CASES
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    # DeepSpeed logs and prints to stdout (also from C++ and from the memory children), so stdout
    # (fd 1) is pointed at stderr while this runs and the results go to a copy of the real one.
    sys.stdout.flush()
    results = os.fdopen(os.dup(1), "w", buffering=1)
    saved_stdout = os.dup(1)
    os.dup2(2, 1)
    try:
        rows = _sweep(args, results)
        if not args.json:
            print(format_table(rows), file=results)
    finally:
        sys.stdout.flush()
        os.dup2(saved_stdout, 1)
        os.close(saved_stdout)
        results.close()
    return rows


def _sweep(args: argparse.Namespace, results) -> list[dict]:
    torch.set_num_threads(args.threads)
    configure_malloc(args.cpu_malloc)
    if not args.no_memory and args.device == "cpu":
        step_memory.start_server(["torch", "deepspeed", "deepspeed.moe.layer", "moe_dist.moe.layer"])
    rows = []
    total = len(args.num_experts) * (args.warmup + args.repeats)
    with tqdm(total=total, desc="bench_moe rounds", file=sys.stderr, disable=None) as progress:
        for E in args.num_experts:
            row = bench_one(spec_from_args(args, E), args.warmup, args.repeats, not args.no_memory,
                            progress, args.cases, args.failures)
            for c in args.cases:
                status = case_status(row, c)
                log.info("E=%d: %s %s", E, c, status if status is not None else
                         f"{row[f'{c}_ms']:.1f} ms, peak tensor MiB {row.get(f'{c}_peak_mb')}, "
                         f"peak RSS MiB {row.get(f'{c}_peak_rss_mb')}")
            rows.append(row)
            if args.json:
                print(json.dumps(row), file=results, flush=True)
    return rows


if __name__ == "__main__":
    # Every row is printed first; then a moe_dist failure in any of them fails the command.
    sys.exit(1 if any(row_failed(r) for r in main()) else 0)
