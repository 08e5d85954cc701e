"""Per-rank memory of a training config before launching it (moe_dist/train/memory_plan.py).

    python tools/estimate_memory.py configs/gpu_1b_active_e64.yaml --world-size 64 --gpu-memory 141
    python tools/estimate_memory.py CONFIG --json

Prints weights, gradients and optimizer state per rank under the DeepSpeed JSON's ZeRO stage and
precision and the config's expert-parallel layout; the activations of one micro batch
(`train.micro_batch` x `train.seq_len`) under each checkpointing mode (`model.activation_checkpointing`
x `model.moe_recompute`); and, with --gpu-memory, the largest micro batch that fits each mode.
`--device cpu` counts what the CPU expert backend keeps instead of the GPU one.
Only the `model`, `moe` and `train` sections are read (data files need not exist yet).

`--measure` (CPU, fp32 or bf16 as the JSON says) instead runs a few steps of the real DeepSpeed
engine on `--world-size` gloo processes and prints, per rank, the estimate next to the measured
peak tensor memory: the bytes of every live tensor between steps (weights, optimizer state:
each storage once, found by the garbage collector) plus the peak of the profiler's allocation
events during one step (forward, backward, optimizer step; moe_dist/common/tensor_memory.py).
Use small configs: it allocates what it measures.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from dataclasses import asdict

import torch

from moe_dist.common.config import ConfigError, from_dict
from moe_dist.model.config import ModelConfig, parse_model_config
from moe_dist.train.config import TrainSection, read_config_file
from moe_dist.train.ds_config import load_json
from moe_dist.train.memory_plan import (
    MemoryPlan,
    ZeroSettings,
    estimate,
    largest_micro_batch,
    mode_of,
)

GiB = 2**30


def load_config(path: str, overrides: list[str] | None = None) -> tuple[ModelConfig, TrainSection, dict]:
    """(model, train, DeepSpeed JSON) of a run config; ConfigError names the file."""
    raw = read_config_file(path, overrides)
    try:
        model = parse_model_config(raw.get("model"), raw.get("moe"))
        train = from_dict(TrainSection, raw.get("train") or {}, "train")
        ds = load_json(train.deepspeed_config)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e
    return model, train, ds


def plan_for(model: ModelConfig, train: TrainSection, ds: dict, world_size: int,
             gpu_experts: bool = False, gpu_runtime: bool = False) -> MemoryPlan:
    return estimate(model, ZeroSettings.from_deepspeed(ds), world_size=world_size,
                    micro_batch=train.micro_batch, seq_len=train.seq_len, gpu_experts=gpu_experts,
                    gpu_runtime=gpu_runtime)


def report(plan: MemoryPlan, gpu_gib: float | None, current_mode: str) -> dict:
    out = {"world_size": plan.world_size, "ep_size": plan.ep_size, "zero_stage": plan.zero.stage,
           "dtype": plan.zero.dtype, "micro_batch": plan.micro_batch, "seq_len": plan.seq_len,
           "dense_params": plan.dense_params, "expert_params_per_rank": plan.expert_params,
           "weights_gib": plan.weights / GiB, "gradients_gib": plan.gradients / GiB,
           "optimizer_gib": plan.optimizer / GiB, "static_gib": plan.static / GiB,
           "grad_comm_copy_gib": plan.grad_comm_copy / GiB, "router_fp32_input_gib": plan.router_fp32_input / GiB,
           "cuda_context_gib": plan.cuda_context / GiB,
           "nccl_buffers_gib": plan.nccl_buffers / GiB, "fragmentation_margin": plan.fragmentation_margin,
           "kv_cache_bytes_per_token": plan.kv_cache_per_token, "receive_rows": plan.receive_rows,
           "config_mode": current_mode, "modes": {}}
    for mode, act in plan.activations.items():
        row = {"activations_gib": act / GiB, "fragmentation_gib": plan.fragmentation(mode) / GiB,
               "total_gib": plan.total(mode) / GiB}
        if gpu_gib is not None:
            row["largest_micro_batch"] = largest_micro_batch(plan, gpu_gib * GiB, mode)
        out["modes"][mode] = row
    return out


def format_report(rep: dict) -> str:
    """Markdown-ish text; GiB, or MiB for runs under 1 GiB."""
    unit, scale = ("GiB", 1.0) if rep["static_gib"] >= 1 else ("MiB", 1024.0)
    rep = {k: v * scale if k.endswith("_gib") else v for k, v in rep.items()}
    rep["modes"] = {m: {k: v * scale if k.endswith("_gib") else v for k, v in row.items()}
                    for m, row in rep["modes"].items()}
    lines = [(f"per rank: world {rep['world_size']}, ep {rep['ep_size']}, ZeRO-{rep['zero_stage']}, "
             f"{rep['dtype']}, micro batch {rep['micro_batch']} x {rep['seq_len']} tokens"),
             (f"  parameters: {rep['dense_params']:,} dense (replicated) + "
             f"{rep['expert_params_per_rank']:,} expert (this rank's experts)"),
             (f"  weights {rep['weights_gib']:.3f} {unit}, gradients {rep['gradients_gib']:.3f} {unit}, "
             f"optimizer {rep['optimizer_gib']:.3f} {unit}: static {rep['static_gib']:.3f} {unit}")]
    extra = [("grad_comm_copy_gib", "fp32 copies of the gradient reduction buckets (fp32 communication of bf16)"),
             ("router_fp32_input_gib", "routers' fp32 copies of their bf16 input (one micro batch)"),
             ("cuda_context_gib", "CUDA context and cuBLAS workspaces (an allowance)"),
             ("nccl_buffers_gib", "NCCL buffers (NCCL_BUFFSIZE x channels x peers, every communicator)")]
    lines += [f"  {what}: {rep[key]:.3f} {unit}" for key, what in extra]
    if rep.get("receive_rows") is not None:
        lines.append(f"  receive budget: at most {rep['receive_rows']:,} rows per MoE layer reach this rank's experts "
                     f"(moe.rank_capacity_factor; activations are sized from it)")
    lines += [f"  fragmentation margin: {100 * rep['fragmentation_margin']:g}% of the allocated total",
              f"  generation's KV cache (not a training term): {rep['kv_cache_bytes_per_token']:,} bytes per token of "
              f"a sequence", "",
              f"| checkpointing | activations {unit} | fragmentation {unit} | total {unit} | largest micro batch |",
              "|---|---|---|---|---|"]
    for mode, row in rep["modes"].items():
        mark = " (config)" if mode == rep["config_mode"] else ""
        fits = row.get("largest_micro_batch", "-")
        lines.append(f"| {mode}{mark} | {row['activations_gib']:.3f} | {row['fragmentation_gib']:.3f} | "
                     f"{row['total_gib']:.3f} | {fits} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# --measure: the real engine on CPU.
# ---------------------------------------------------------------------------------------------

def live_tensor_bytes() -> int:
    """Bytes of every tensor storage the garbage collector can reach, each storage once."""
    import warnings

    gc.collect()
    seen: dict[int, int] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance on some library objects warns of deprecations
        for obj in gc.get_objects():
            try:
                if isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and not obj.is_meta:
                    storage = obj.untyped_storage()
                    seen[storage.data_ptr()] = storage.nbytes()
            except (RuntimeError, ReferenceError):
                continue
    return sum(seen.values())


_COLLECTIVES = ("all_to_all_single", "all_reduce", "reduce", "broadcast", "all_gather", "all_gather_into_tensor",
                "reduce_scatter", "reduce_scatter_tensor", "_all_gather_base", "_reduce_scatter_base")


def settle_collectives() -> None:
    """Make every synchronous gloo collective return only once gloo's worker thread has dropped its
    references to the collective's tensors. Otherwise the last reference to a tensor that autograd
    frees right after its all-to-all is sometimes gloo's, the free happens on gloo's thread, and the
    profiler (whose state is thread-local) never records it: the tensor stays counted for the rest
    of the step, by a different amount in every run. The memory is really freed at that moment."""
    import time

    import torch.distributed as dist

    def tensors(args, kwargs):
        for a in list(args) + list(kwargs.values()):
            for t in (a if isinstance(a, (list, tuple)) else [a]):
                if isinstance(t, torch.Tensor):
                    yield t

    def use_count(t: torch.Tensor) -> tuple[int, int]:
        """References to the tensor and to its storage (gloo may hold either)."""
        return t._use_count(), torch._C._storage_Use_Count(t.untyped_storage()._cdata)

    def settled(fn):
        def call(*args, **kwargs):
            before = [(s, use_count(s)) for s in tensors(args, kwargs)]
            out = fn(*args, **kwargs)
            deadline = time.monotonic() + 10.0
            while not kwargs.get("async_op") and time.monotonic() < deadline \
                    and any(max(a - b for a, b in zip(use_count(s), n)) > 0 for s, n in before):
                time.sleep(0)
            return out
        return call

    for name in _COLLECTIVES:
        if hasattr(dist, name):
            setattr(dist, name, settled(getattr(dist, name)))


def measure_rank(model: ModelConfig, train: TrainSection, ds: dict, world: int, steps: int = 2) -> dict:
    """On an initialised gloo group: build the engine, run `steps` warm-up steps, then measure
    (live bytes between steps + peak of one step's allocations)."""
    from moe_dist.common.tensor_memory import peak_tensor_mb
    from moe_dist.model.transformer import MoETransformer
    from moe_dist.parallel.groups import ParallelGroups
    from moe_dist.train.ds_config import reconcile_deepspeed_config
    from moe_dist.train.engine import build_engine

    settle_collectives()
    torch.manual_seed(0)
    groups = (ParallelGroups.from_deepspeed(model.moe.ep_size, model.moe.num_experts)
              if model.moe is not None else ParallelGroups.build(1))
    ds = reconcile_deepspeed_config(dict(ds), train, world)
    engine, _, _ = build_engine(MoETransformer(model, seed=train.seed, groups=groups), train, ds)
    tokens = torch.randint(0, model.vocab_size, (train.micro_batch, train.seq_len + 1))
    dtype = next(engine.module.parameters()).dtype

    def step() -> None:
        for _ in range(train.grad_accum):
            out = engine(tokens[:, :-1], tokens[:, 1:])
            engine.backward(out.loss.to(torch.float32) if dtype != torch.float32 else out.loss)
            engine.step()

    for _ in range(steps):
        step()
    static = live_tensor_bytes()
    peak = peak_tensor_mb(step) * 2**20
    return {"live_between_steps": static, "step_peak": int(peak), "measured": int(static + peak)}


def _measure_worker(rank: int, world: int, path: str, overrides: list[str], results: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_SIZE=str(world))
    from moe_dist.parallel import runtime

    runtime.init_distributed()
    model, train, ds = load_config(path, overrides)
    row = measure_rank(model, train, ds, world)
    with open(f"{results}.{rank}", "w") as f:
        json.dump(row, f)


def measure(path: str, world: int, overrides: list[str] | None = None) -> list[dict]:
    """Measured rows, one per rank, from `world` gloo processes (spawned here)."""
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        init = os.path.join(tmp, "rendezvous")
        mp.spawn(_spawned, args=(world, init, path, overrides or [], os.path.join(tmp, "row")), nprocs=world)
        return [json.load(open(os.path.join(tmp, f"row.{r}"))) for r in range(world)]


def _spawned(rank: int, world: int, init: str, path: str, overrides: list[str], results: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        _measure_worker(rank, world, path, overrides, results)
    finally:
        dist.destroy_process_group()


def compare(path: str, world: int, overrides: list[str] | None = None) -> dict:
    """Estimate vs the measured rank with the most memory, for one config."""
    model, train, ds = load_config(path, overrides)
    plan = plan_for(model, train, ds, world)
    est = plan.total(mode_of(model))
    rows = measure(path, world, overrides)
    # Ranks differ by their experts' share of the routed rows: the largest is the one that must fit.
    top = max(range(len(rows)), key=lambda r: rows[r]["measured"])
    meas = rows[top]["measured"]
    return {"config": path, "overrides": overrides or [], "world_size": world, "zero_stage": plan.zero.stage,
            "mode": mode_of(model), "estimate_mib": est / 2**20, "measured_mib": meas / 2**20,
            "estimate_over_measured": est / meas, "static_estimate_mib": plan.static / 2**20,
            "measured_rank": top, "live_between_steps_mib": rows[top]["live_between_steps"] / 2**20,
            "step_peak_mib": rows[top]["step_peak"] / 2**20,
            "measured_mib_per_rank": [r["measured"] / 2**20 for r in rows]}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="run config YAML (model, moe and train sections are read)")
    p.add_argument("--world-size", type=int, default=1, help="data-parallel ranks (GPUs) of the run")
    p.add_argument("--gpu-memory", type=float, default=None, help="GiB per GPU: report the largest micro batch")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="where the run trains: on cuda the experts' GEMM (torch._grouped_mm) keeps the "
                        "gathered expert input for its backward, the CPU backend regathers it (default cuda)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--measure", action="store_true", help="measure the real engine on CPU (small configs)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable)")
    args = p.parse_args(argv)
    if args.world_size < 1:
        p.error(f"--world-size ({args.world_size}) must be >= 1")
    if args.gpu_memory is not None and args.gpu_memory <= 0:
        p.error(f"--gpu-memory ({args.gpu_memory}) must be > 0 GiB")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        model, train, ds = load_config(args.config, args.set)
        if args.measure:
            row = compare(args.config, args.world_size, args.set)
            print(json.dumps(row) if args.json else
                  f"estimate {row['estimate_mib']:.1f} MiB, measured {row['measured_mib']:.1f} MiB "
                  f"(x{row['estimate_over_measured']:.3f}) for {args.config} at world {args.world_size}")
            return 0
        gpu = args.device == "cuda"
        plan = plan_for(model, train, ds, args.world_size, gpu_experts=gpu, gpu_runtime=gpu)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rep = report(plan, args.gpu_memory, mode_of(model))
    rep["device"] = args.device
    rep["zero"] = asdict(plan.zero)
    print(json.dumps(rep, indent=1) if args.json else format_report(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
