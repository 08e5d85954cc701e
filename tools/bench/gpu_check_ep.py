"""The expert-parallel part of tools/bench/gpu_check.py: one MoE layer's forward+backward with its
experts spread over every GPU (EP = the number of GPUs, the tokens exchanged by all-to-all), in
one spawned process per GPU joined by NCCL (moe_dist's start-up, `runtime.init_distributed`).
With --quick the same code runs on CPU: 2 processes joined by gloo.

Cases, timed in interleaved rounds (tools/bench/timing.py) on every rank, each rank with its own
T tokens:
  moe_dist_ep     `MoELayer` with ep_size = W: E/W experts per rank, tokens exchanged both ways.
  moe_dist_local  the same layer at ep_size 1 on each rank (all E experts, no all-to-all): the same
                  expert work per rank, so moe_dist_ep / moe_dist_local is what expert parallelism
                  costs (the all-to-all and its bookkeeping).
  deepspeed_ep    DeepSpeed's MoE with ep_size = W and moe_dist_ep's router and local expert
                  weights.
  megatron_ep     Megatron-Core's MoE at expert_model_parallel_size = W, alltoall dispatcher, its
                  fastest expert MLP that builds (tools/bench/megatron.py; the row names it); its
                  own weights. On CPU it fails to build (CUDA streams) and is skipped with the reason.
The references are skipped with the reason where they cannot be built or run.
A case's time is the slowest rank's median. A case that fails to build on any rank is left out on
every rank (the ranks agree before timing, so none waits in a collective the others skip) and its
row says why; a moe_dist failure fails the part. The part runs under a deadline: a rank that dies
or hangs (a collective waiting on a dead peer) ends the part with the reason, not the kit.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import multiprocessing
import os
import socket
import time
import traceback
from pathlib import Path

import torch

from . import inject
from .spec import Spec
from .timing import first_line, time_cases

CASES = ("moe_dist_ep", "moe_dist_local", "deepspeed_ep", "megatron_ep")
REFERENCES = ("deepspeed_ep", "megatron_ep")


def ep_spec(quick: bool, world: int) -> Spec:
    if quick:
        return Spec(tokens=64, d_model=32, d_ff=64, num_experts=8, top_k=2, capacity_factor=1.25, threads=1,
                    device="cpu", dtype="fp32")
    return Spec(tokens=8192, d_model=2048, d_ff=1024, num_experts=8 * world, top_k=8, capacity_factor=1.25,
                threads=1, device="cuda", dtype="bf16")


# ---------------------------------------------------------------------------------------------
# The worker, one per rank.
# ---------------------------------------------------------------------------------------------

def _moe_dist_layer(spec: Spec, ep_size: int):
    from moe_dist.moe.config import MoEConfig
    from moe_dist.moe.layer import MoELayer
    from moe_dist.parallel.groups import ParallelGroups

    cfg = MoEConfig.from_dict(dict(
        d_model=spec.d_model, d_ff=spec.d_ff, num_experts=spec.num_experts, top_k=spec.top_k,
        capacity_factor=spec.capacity_factor, eval_capacity_factor=spec.capacity_factor, activation="gelu",
        ep_size=ep_size, router={"type": "topk", "renormalize": spec.top_k == 2},
        aux_loss={"switch": 0.01, "z_loss": 0.0}))
    groups = ParallelGroups.build(ep_size, spec.num_experts) if ep_size > 1 else None
    return MoELayer(cfg, seed=spec.seed, groups=groups).to(spec.device, spec.torch_dtype)


def _build(spec: Spec, rank: int, world: int, failures: dict[str, str]) -> tuple[dict, dict, dict]:
    from . import megatron
    from .layers import build_deepspeed_layer, make_deepspeed_step, make_inputs, make_moe_dist_step

    # Each rank routes its own tokens: the inputs' seed differs per rank, the weights' does not.
    local_inputs = dataclasses.replace(spec, seed=spec.seed + 1000 * (1 + rank))
    steps, failed, labels = {}, {}, {}
    md_ep = None
    for case in CASES:
        try:
            inject.check_build(failures, case)
            if case == "moe_dist_ep":
                md_ep = _moe_dist_layer(spec, world)
                layer, make = md_ep, make_moe_dist_step
            elif case == "moe_dist_local":
                layer, make = _moe_dist_layer(spec, 1), make_moe_dist_step
            elif case == "megatron_ep":
                built = megatron.build_megatron_layer(spec, spec.torch_dtype, ep_size=world)
                labels["megatron_ep"] = built.label
                layer, make = built.layer, functools.partial(megatron.make_megatron_step, make_inputs=make_inputs)
            else:
                if md_ep is None:
                    raise RuntimeError("DeepSpeed's layer takes moe_dist_ep's weights, and moe_dist_ep failed to build")
                layer, make = build_deepspeed_layer(spec, md_ep, world), make_deepspeed_step
            steps[case] = inject.wrap_step(failures, case, make(layer, local_inputs))
        except Exception as e:
            failed[case] = first_line(e)
    return steps, failed, labels


def _worker(rank: int, world: int, port: int, spec: Spec, warmup: int, repeats: int, failures: dict[str, str],
            report: str, timeout_s: float) -> None:
    from moe_dist.parallel import runtime

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    if spec.device == "cuda":
        spec = dataclasses.replace(spec, device=f"cuda:{rank}")
    else:
        torch.set_num_threads(1)  # W processes share the cores
    runtime.init_distributed(timeout_s=timeout_s)
    import torch.distributed as dist

    try:
        steps, failed, labels = _build(spec, rank, world, failures)
        # The ranks agree on what runs before any collective of a case: a case that failed on
        # one rank is left out on all of them.
        everyone: list = [None] * world
        dist.all_gather_object(everyone, failed)
        for theirs in everyone:
            for case, reason in theirs.items():
                failed.setdefault(case, reason)
        steps = {c: s for c, s in steps.items() if c not in failed}
        ms, _ = time_cases(steps, warmup, repeats, failed=failed)
        gathered: list = [None] * world
        dist.all_gather_object(gathered, {"ms": ms, "failed": failed})
        if rank == 0:
            rows = _rows(spec, world, gathered)
            for case, label in labels.items():
                rows[case]["label"] = label
            Path(report).write_text(json.dumps(rows, indent=1))
    except Exception:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()


def _rows(spec: Spec, world: int, gathered: list[dict]) -> dict:
    failed: dict[str, str] = {}
    for g in gathered:
        for case, reason in g["failed"].items():
            failed.setdefault(case, reason)
    rows = {}
    for case in CASES:
        if case in failed:
            rows[case] = {"skipped" if case in REFERENCES else "failed": failed[case]}
            continue
        ms = max(g["ms"][case] for g in gathered)
        rows[case] = {"ms": round(ms, 3), "tokens_per_s": world * spec.tokens / (ms * 1e-3),
                      "tflops_per_rank": spec.expert_flops() / (ms * 1e-3) / 1e12}
    ep = rows["moe_dist_ep"].get("ms")
    for case in CASES[1:]:
        if ep is not None and "ms" in rows[case]:
            rows[case]["moe_dist_ep_over_case"] = round(ep / rows[case]["ms"], 3)
    return rows


# ---------------------------------------------------------------------------------------------
# The part, in gpu_check's process.
# ---------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ep_part(quick: bool, out: Path, failures: dict[str, str], timeout: int) -> dict:
    world = 2 if quick else torch.cuda.device_count()
    if world < 2:
        return {"skipped": f"expert parallelism needs at least 2 GPUs; torch.cuda.device_count() is {world}",
                "rows": {}}
    spec = ep_spec(quick, world)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()  # rank 0 shares GPU 0 with this process and the bench part's cache
    warmup, repeats = (1, 2) if quick else (3, 10)
    report = out.resolve() / "ep_worker.json"
    report.unlink(missing_ok=True)
    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    collective_timeout = max(30, timeout // 2)  # a rank left waiting on a dead peer gives up first
    procs = [ctx.Process(target=_worker, args=(r, world, port, spec, warmup, repeats, failures, str(report),
                                               collective_timeout)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for r in hung:
        procs[r].kill()
        procs[r].join()
    codes = [p.exitcode for p in procs]
    head = {"world": world, "backend": "gloo" if quick else "nccl", "spec": dataclasses.asdict(spec)}
    if hung or any(codes) or not report.exists():
        why = (f"rank(s) {hung} still running after {timeout} s, killed" if hung else
               f"rank exit codes {codes}" + ("" if report.exists() else "; rank 0 wrote no report"))
        return {**head, "rows": {}, "failed": [f"ep: {why} (the ranks' tracebacks are on stderr)"]}
    rows = json.loads(report.read_text())
    failed = [f"{case}: {row['failed']}" for case, row in rows.items() if "failed" in row]
    return {**head, "rows": rows, "failed": failed}


def format_ep_table(part: dict) -> str:
    if "skipped" in part:
        return f"skipped: {part['skipped']}"
    spec = part["spec"]
    shape = (f"T {spec['tokens']}/rank d {spec['d_model']} d_ff {spec['d_ff']} E {spec['num_experts']} "
             f"k {spec['top_k']} {spec['dtype']}, EP {part['world']} ({part['backend']})")
    lines = [f"{shape}", "", "| case | ms | tokens/s (all ranks) | TFLOP/s per rank | moe_dist_ep / case | note |",
             "|---|---|---|---|---|---|"]
    for case in CASES:
        row = part["rows"].get(case)
        if row is None:
            continue
        name = f"{case} ({row['label']})" if "label" in row else case
        if "ms" not in row:
            why = f"skipped: {row['skipped']}" if "skipped" in row else f"FAILED: {row['failed']}"
            lines.append(f"| {name} | - | - | - | - | {why} |")
            continue
        ratio = row.get("moe_dist_ep_over_case")
        lines.append(f"| {name} | {row['ms']:.2f} | {row['tokens_per_s']:,.0f} | {row['tflops_per_rank']:.3g} | "
                     f"{'-' if ratio is None else f'{ratio:.2f}'} | |")
    for reason in part.get("failed", []):
        if not part["rows"]:
            lines.append(f"\nFAILED: {reason}")
    return "\n".join(lines)
