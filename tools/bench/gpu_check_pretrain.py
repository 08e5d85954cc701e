"""The pretrain part of tools/bench/gpu_check.py: `pretrain_part` starts this module under the
`deepspeed` launcher (as a module, `--module`, from the repository root), whose process
pretrains one config once per `--modes` entry (`model.moe_recompute`) and writes per mode the
tokens/s of the last logging interval (the first one includes start-up) and the peak memory to
`--report` (rank 0); `pretrain_part` adds the MFU.

Peak memory: CUDA `max_memory_allocated` over the run (reset between modes); on CPU the resident
high-water mark (VmHWM, reset between modes), which includes the allocator's cached memory.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------
# The part, in gpu_check's process.
# ---------------------------------------------------------------------------------------------

def flops_per_token(config: str, overrides: list[str]) -> float:
    from moe_dist.train.config import load_run_config
    from moe_dist.train.memory_plan import parameter_counts

    cfg = load_run_config(str(ROOT / config), overrides)
    model = cfg.model
    dense, expert = parameter_counts(model)
    active = dense + (expert * model.moe.top_k / model.moe.num_experts if model.moe else 0)
    if not model.tie_embeddings:
        active -= model.vocab_size * model.d_model  # the input embedding is a lookup, not a matmul
    return 6.0 * active + 12.0 * model.n_layers * model.d_model * cfg.train.seq_len


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _deepspeed_launcher() -> list[str]:
    """The `deepspeed` script of this Python's environment, which PATH may not lead to (a venv used
    without activating it); its runner module where the script is absent."""
    script = Path(sys.executable).with_name("deepspeed")
    return [str(script)] if script.exists() else [sys.executable, "-m", "deepspeed.launcher.runner"]


def pretrain_part(quick: bool, out: Path, peak_tflops: float, timeout: int) -> dict:
    if quick:
        config = "configs/tiny_cpu.yaml"
        overrides = ["moe.ep_size=1", "train.steps=4", "train.log_interval=2", "train.warmup_steps=1",
                     "train.eval_iters=1", "train.checkpoint_dir=null", "train.tensorboard_dir=null"]
    else:
        config, overrides = "configs/gpu_125m_e16_1gpu.yaml", []
    report = out.resolve() / "pretrain_worker.json"
    # As a module run from the repository root, the worker imports this tree's `tools` and
    # `moe_dist` (the root is first on its sys.path) with no path set by hand.
    cmd = [*_deepspeed_launcher(), "--num_gpus", "1", "--master_port", str(_free_port()), "--module",
           "tools.bench.gpu_check_pretrain",
           "--config", config, "--report", str(report),
           "--modes", "none,experts", *[a for o in overrides for a in ("--set", o)]]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    (out / "pretrain.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"the deepspeed launcher exited {proc.returncode} (log: {out / 'pretrain.log'}); "
                           f"last lines: {(proc.stdout + proc.stderr)[-1500:]}")
    rows = json.loads(report.read_text())
    per_token = flops_per_token(config, overrides)
    on_gpu = torch.cuda.is_available() and not quick
    for row in rows.values():
        rate = row["tokens_per_s"]
        row["mfu"] = rate * per_token / (peak_tflops * 1e12) if (on_gpu and rate) else None
        row["peak_memory_gib"] = row["peak_memory_bytes"] / 2**30
    return {"config": config, "overrides": overrides, "flops_per_token": per_token,
            "peak_tflops": peak_tflops if on_gpu else None, "modes": rows,
            "command": " ".join(cmd)}


# ---------------------------------------------------------------------------------------------
# The worker, in each process the launcher starts.
# ---------------------------------------------------------------------------------------------

def _reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def _peak_bytes() -> int:
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def main(argv: list[str] | None = None) -> int:
    # Imported here: gpu_check imports this module for `pretrain_part` and must first refuse a
    # missing deepspeed by name, which the trainer imports.
    from moe_dist.common.atomic import write_text_atomic
    from moe_dist.parallel import runtime
    from moe_dist.train import progress as progress_module
    from moe_dist.train.config import load_run_config
    from moe_dist.train.trainer import pretrain

    p = argparse.ArgumentParser(prog="python -m tools.bench.gpu_check_pretrain",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--modes", default="none,experts")
    p.add_argument("--report", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--local_rank", type=int, default=None)
    args = p.parse_args(argv)
    rates: list[float] = []
    original = progress_module.Progress.interval

    def recorded(self, step):
        out = original(self, step)
        rates.append(out[0])
        return out

    progress_module.Progress.interval = recorded
    rows = {}
    for mode in args.modes.split(","):
        cfg = load_run_config(args.config, [*args.overrides, f"model.moe_recompute={mode}"])
        rates.clear()
        _reset_peak()
        t0 = time.perf_counter()
        result = pretrain(cfg)
        rows[mode] = {"tokens_per_s": rates[-1] if rates else None, "intervals": len(rates),
                      "peak_memory_bytes": _peak_bytes(), "seconds": time.perf_counter() - t0,
                      "steps": result.step, "last_loss": result.losses[max(result.losses)] if result.losses else None}
    if runtime.rank() == 0:
        write_text_atomic(args.report, json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
