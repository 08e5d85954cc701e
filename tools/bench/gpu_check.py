"""moe_dist's GPU acceptance kit: one command that checks and measures moe_dist on a GPU.

    python -m tools.bench.gpu_check --out runs/gpu_check          # on one GPU (designed for < 8 min on an H200)
    python -m tools.bench.gpu_check --quick --out /tmp/gpu_check  # the same parts at tiny sizes on CPU

Parts (`--parts`, default all; each writes its results into OUT/gpu_check.json and a table into
OUT/gpu_check.md):

  correctness  On the device (CUDA; with --quick the CPU):
               - layer_bf16_vs_fp32: the MoE layer in bf16 against the same layer in fp32 on the same
                 device, same weights and input; relative Frobenius error of the output (tokens
                 routed alike in both) <= 2e-2, of the input and expert-weight gradients <= 5e-2;
               - grouped_mm_vs_loop: `torch._grouped_mm` (kernels backend `grouped_mm`) against one
                 matmul per expert (`loop`): output, input and weight gradients, relative error
                 <= 1e-2 in bf16 (<= 1e-5 in fp32); skipped, with the reason, where
                 `torch._grouped_mm` does not take the operands;
               - dropless / capacity: the fp32 layer against a per-token loop over its own routes
                 and kept pairs (relative error <= 1e-5); capacity factor 1.0 must drop pairs,
                 dropless none;
               - eval_determinism: two eval forwards of a model give bit-identical logits;
               - recompute_gradients: a model's loss and gradients with `model.moe_recompute`
                 activation and experts against none, fp32: bit-equal on CPU; on CUDA within 1e-6
                 relative (index_add_ accumulates with atomics there).
  bench        tools/bench/moe.py --device cuda --dtype bf16 at an OLMoE-like shape (T 8192,
               d 2048, d_ff 1024, E 64, top-8) and a Mixtral-like one scaled to fit the time (T 8192,
               d 2048, d_ff 7168, E 8, top-2): moe_dist, DeepSpeed's MoE, Megatron-Core's MoE
               (EP=1, alltoall dispatcher, its grouped-GEMM experts where they build: TEGroupedMLP
               with Transformer Engine, else the legacy GroupedMLP with the grouped_gemm package,
               else SequentialMLP; the row names the class that ran, e.g. "megatron-core 0.16.1
               SequentialMLP") and the bf16 dense GEMM floor; ms, TFLOP/s of the expert work,
               moe_dist's time over each case's, peak memory. A reference that cannot be built or
               fails while it runs is a skipped row with the reason (exception type and first line);
               the other rows keep their numbers. --quick: fp32 on CPU at T 128, d 64, d_ff 128, no
               peak memory (it needs a child process per case on CPU); Megatron-Core is built as on
               a GPU and fails there (its dispatcher creates CUDA streams), so its row is skipped.
  ep           With W >= 2 GPUs: the layer with its experts spread over all of them (EP = W, NCCL,
               one spawned process per GPU, T 8192 per GPU, d 2048, d_ff 1024, E 8W, top-8, bf16)
               against the same layer at EP=1 on each GPU (the same expert work, no all-to-all),
               DeepSpeed's MoE and Megatron-Core's at EP = W (tools/bench/gpu_check_ep.py); skipped
               on one GPU.
               --quick: 2 CPU processes joined by gloo at T 64, d 32, d_ff 64, E 8, top-2.
  pretrain     A short bf16 pretraining of configs/gpu_125m_e16_1gpu.yaml (configs/gpu_125m_e16.yaml
               on one GPU, synthetic data) through the `deepspeed` launcher, with
               `model.moe_recompute` none and experts: tokens/s of the last logging interval,
               peak memory (max_memory_allocated), MFU = tokens/s * FLOPs per token / the GPU's
               peak bf16 FLOP/s (`--peak-tflops`, default 989 for H100/H200 SXM dense bf16).
               FLOPs per token = 6 * active parameters (dense parameters, the tied embedding once
               as the output projection, plus top_k / E of the expert parameters; dropped pairs
               not subtracted) + 12 * n_layers * d_model * seq_len (attention scores and values,
               PaLM's appendix B). Each mode runs in its own launcher run, so a crash or OOM in
               one leaves the other's row; the failed mode's row says why. --quick:
               configs/tiny_cpu.yaml with ep_size 1 for 4 steps, fp32, on CPU (peak = resident
               high-water mark; no MFU).

Exit status: 0 when every part passed (a skipped reference does not fail a part); 1 when a
correctness check, a moe_dist case of bench or ep, or a pretraining mode failed, after every part
has run and the reports are written; 2 when it refuses to start. `--fail-reference CASE[:STAGE]`
makes a case fail on purpose (build, the default, or run), so that --quick on CPU takes the
failure paths a GPU run may meet (tools/bench/inject.py).

On a GPU it first checks the reference packages (deepspeed, megatron-core) and refuses, exit 2,
naming a missing one. --quick needs deepspeed only (Megatron-Core cannot run on CPU anyway).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

import torch

from moe_dist.common.atomic import write_text_atomic

from . import gpu_check_ep, inject
from .gpu_check_correctness import correctness_part
from .gpu_check_pretrain import MODES, pretrain_part
from .moe import GPU_CASES, bench_one, format_case_table, row_failed
from .spec import Spec

PARTS = ("correctness", "bench", "ep", "pretrain")
# What --fail-reference can name: the bench's cases, the EP part's and each pretraining mode.
FAILABLE = (*GPU_CASES, *gpu_check_ep.CASES, *(f"pretrain-{m}" for m in MODES))
# Reference packages by their pip name -> the module that must import.
REFERENCES = {"deepspeed": "deepspeed", "megatron-core": "megatron.core"}


class MissingReference(RuntimeError):
    pass


def check_references(quick: bool) -> None:
    """Refuse before any work when a reference package the run compares against is missing."""
    needed = ["deepspeed"] if quick else list(REFERENCES)
    missing = []
    for name in needed:
        try:
            importlib.import_module(REFERENCES[name])
        except ImportError as e:
            missing.append(f"{name} (import {REFERENCES[name]}: {e})")
    if missing:
        raise MissingReference("gpu_check needs the reference package(s) " + ", ".join(missing) +
                               "; install them (pip install deepspeed megatron-core) or run --quick on CPU")


def run_part(name: str, fn, results: dict, *args) -> None:
    t0 = time.perf_counter()
    print(f"[gpu_check] {name} ...", file=sys.stderr, flush=True)
    try:
        out = fn(*args)
        results[name] = {"ok": not out.get("failed"), **out}
    except Exception as e:  # a failing part is reported, the others still run
        results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    results[name]["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"[gpu_check] {name}: {'ok' if results[name]['ok'] else 'FAILED'} in {results[name]['seconds']} s",
          file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# bench
# ---------------------------------------------------------------------------------------------

def bench_specs(quick: bool, device: str) -> list[Spec]:
    if quick:
        common = dict(tokens=128, d_model=64, d_ff=128, capacity_factor=1.25, threads=1, device="cpu", dtype="fp32")
        return [Spec(num_experts=16, top_k=8, **common), Spec(num_experts=8, top_k=2, **common)]
    common = dict(tokens=8192, d_model=2048, capacity_factor=1.25, threads=1, device=device, dtype="bf16")
    return [Spec(d_ff=1024, num_experts=64, top_k=8, **common),  # OLMoE-like
            Spec(d_ff=7168, num_experts=8, top_k=2, **common)]  # Mixtral-like, width halved


def bench_part(quick: bool, device: str, failures: dict[str, str]) -> dict:
    """Every row of every shape; a reference that fails is a skipped row, a moe_dist failure
    (`moe_dist_failed`) fails the part after all rows are measured."""
    rows = []
    for spec in bench_specs(quick, device):
        warmup, repeats = (0, 1) if quick else (3, 10)
        rows.append(bench_one(spec, warmup, repeats, memory=not quick, progress=None, cases=GPU_CASES,
                              failures=failures))
    failed = [f"E={r['num_experts']}: moe_dist: {r['moe_dist_failed']}" for r in rows if row_failed(r)]
    return {"rows": rows, "table": format_case_table(rows), "failed": failed}


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------

def markdown(results: dict) -> str:
    env = results["environment"]
    lines = [f"# gpu_check ({'quick, CPU' if results['quick'] else 'GPU'})", "",
             f"device: {env['device']}; torch {env['torch']}; deepspeed {env.get('deepspeed')}; "
             f"megatron-core {env.get('megatron_core')}", ""]
    corr = results.get("correctness")
    if corr:
        lines += ["## correctness", "", "| check | result | measured | tolerance |", "|---|---|---|---|"]
        for check in corr.get("checks", []):
            lines.append(f"| {check['name']} | {check['status']} | {check.get('measured', '')} | "
                         f"{check.get('tolerance', '')} |")
        if "error" in corr:
            lines.append(f"\nerror: {corr['error']}")
        lines.append("")
    bench = results.get("bench")
    if bench:
        lines += ["## bench (tools/bench/moe.py)", "", bench.get("table", f"error: {bench.get('error')}"), ""]
    ep = results.get("ep")
    if ep:
        lines += ["## ep (tools/bench/gpu_check_ep.py)", "",
                  gpu_check_ep.format_ep_table(ep) if "error" not in ep else f"error: {ep['error']}", ""]
    pre = results.get("pretrain")
    if pre:
        lines += ["## pretrain", ""]
        if "modes" in pre:
            lines += [f"`{cmd}`" for cmd in pre["commands"].values()]
            lines += ["", f"FLOPs per token {pre['flops_per_token']:.3e}", "",
                      "| moe_recompute | tokens/s | MFU | peak memory GiB | steps | last loss |",
                      "|---|---|---|---|---|---|"]
            for mode, row in pre["modes"].items():
                if "error" in row:
                    lines.append(f"| {mode} | - | - | - | - | FAILED: {row['error']} |")
                    continue
                mfu = "-" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
                rate = "-" if row["tokens_per_s"] is None else f"{row['tokens_per_s']:,.0f}"
                lines.append(f"| {mode} | {rate} | {mfu} | {row['peak_memory_gib']:.2f} | {row['steps']} | "
                             f"{row['last_loss']} |")
        else:
            lines.append(f"error: {pre['error']}")
    return "\n".join(lines) + "\n"


def environment(device: str) -> dict:
    env = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__}
    for key, module in (("deepspeed", "deepspeed"), ("megatron_core", "megatron.core")):
        try:
            env[key] = getattr(importlib.import_module(module), "__version__", "?")
        except ImportError:
            env[key] = None
    return env


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.bench.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.md")
    p.add_argument("--quick", action="store_true", help="every part at tiny sizes on CPU (the test suite runs it)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="the GPU's peak dense bf16 TFLOP/s for MFU (989: H100/H200 SXM)")
    p.add_argument("--pretrain-timeout", type=int, default=420,
                   help="seconds for each pretraining mode's launcher run")
    p.add_argument("--ep-timeout", type=int, default=300, help="seconds for the expert-parallel part's processes")
    p.add_argument("--fail-reference", action="append", default=[], metavar="CASE[:STAGE]",
                   help="make a case fail on purpose, to check that its row says why and every other row "
                        f"survives: one of {list(FAILABLE)}; STAGE build (default) or run; moe_dist cases "
                        "and pretraining modes fail the run (exit 1); repeatable")
    args = p.parse_args(argv)
    args.parts = [x for x in args.parts.split(",") if x]
    bad = [x for x in args.parts if x not in PARTS]
    if bad:
        p.error(f"--parts: unknown part(s) {bad}; expected a subset of {list(PARTS)}")
    try:
        args.failures = inject.parse_failures(args.fail_reference, FAILABLE)
    except ValueError as e:
        p.error(str(e))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = "cpu" if args.quick else "cuda"
    if not args.quick and not torch.cuda.is_available():
        print("error: no CUDA device here (torch.cuda.is_available() is False); use --quick on CPU",
              file=sys.stderr)
        return 2
    try:
        check_references(args.quick)
    except MissingReference as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"quick": args.quick, "environment": environment(device), "parts": args.parts}
    if "correctness" in args.parts:
        run_part("correctness", correctness_part, results, device)
    if "bench" in args.parts:
        run_part("bench", bench_part, results, args.quick, device, args.failures)
    if "ep" in args.parts:
        run_part("ep", gpu_check_ep.ep_part, results, args.quick, out, args.failures, args.ep_timeout)
    if "pretrain" in args.parts:
        run_part("pretrain", pretrain_part, results, args.quick, out, args.peak_tflops, args.pretrain_timeout,
                 args.failures)
    write_text_atomic(str(out / "gpu_check.json"), json.dumps(results, indent=1, default=str))
    write_text_atomic(str(out / "gpu_check.md"), markdown(results))
    failed = [p for p in args.parts if not results[p]["ok"]]
    print(f"[gpu_check] report: {out / 'gpu_check.md'}; " + (f"FAILED: {failed}" if failed else "all parts ok"),
          file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
