"""The pretrain part of tools/bench/gpu_check.py: `pretrain_part` starts this module under the
`deepspeed` launcher (as a module, `--module`, from the repository root) once per mode
(`model.moe_recompute`), so that a crash or an OOM in one mode leaves the other modes' rows (the
failed mode's row says why: exit code and the last error line of its log, or the timeout). Each
worker pretrains the config with its `--modes` entry and writes the tokens/s of the last logging
interval (the first one includes start-up) and the peak memory to `--report` (rank 0);
`pretrain_part` adds the MFU.

Peak memory: CUDA `max_memory_allocated` over the run (reset between modes); on CPU the resident
high-water mark (VmHWM, reset between modes), which includes the allocator's cached memory.
"""

from __future__ import annotations

import argparse
import json
import re
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
    """Training FLOPs per token, the trainer's own count (moe_dist/train/flops.py), so the MFU
    here is the one the step log prints."""
    from moe_dist.train.config import load_run_config
    from moe_dist.train.flops import model_flops_per_token

    cfg = load_run_config(str(ROOT / config), overrides)
    return float(model_flops_per_token(cfg.model, cfg.train.seq_len).train)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _deepspeed_launcher() -> list[str]:
    """The `deepspeed` script of this Python's environment, which PATH may not lead to (a venv used
    without activating it); its runner module where the script is absent."""
    script = Path(sys.executable).with_name("deepspeed")
    return [str(script)] if script.exists() else [sys.executable, "-m", "deepspeed.launcher.runner"]


MODES = ("none", "experts")


def _why(log: str, code: int) -> str:
    """The exit code and the final exception of the last Python traceback in the log (its line
    after the frames; torch's "[rankN]: " prefixes dropped), else the last line naming a kill or a
    signal (an OOM kill leaves no traceback), else the log's last line."""
    lines = [re.sub(r"^\[rank\d+\]:\s?", "", ln) for ln in log.splitlines()]
    starts = [i for i, ln in enumerate(lines) if ln.startswith("Traceback (most recent call last):")]
    if starts:
        for ln in lines[starts[-1] + 1:]:
            if ln.strip() and not ln.startswith((" ", "\t")):
                return f"exit {code}: {ln.strip()[:300]}"
    text = [ln.strip() for ln in lines if ln.strip()]
    killed = [ln for ln in text if any(w in ln for w in ("Killed", "killed", "signal", "return code"))]
    return f"exit {code}: {(killed or text or ['(no output)'])[-1][:300]}"


def run_mode(mode: str, config: str, overrides: list[str], out: Path, timeout: int, fail: bool) -> tuple[dict, str]:
    """One `model.moe_recompute` mode through the deepspeed launcher, in processes of its own:
    (its row, the command). A crash, an OOM kill or a timeout gives a row with `error`."""
    report = out.resolve() / f"pretrain_{mode}.json"
    report.unlink(missing_ok=True)
    # As a module run from the repository root, the worker imports this tree's `tools` and
    # `moe_dist` (the root is first on its sys.path) with no path set by hand.
    cmd = [*_deepspeed_launcher(), "--num_gpus", "1", "--master_port", str(_free_port()), "--module",
           "tools.bench.gpu_check_pretrain", "--config", config, "--report", str(report), "--modes", mode,
           *[a for o in overrides for a in ("--set", o)], *(["--fail"] if fail else [])]
    log_path = out / f"pretrain_{mode}.log"
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        log_path.write_text(_text(e.stdout) + _text(e.stderr))
        return {"error": f"timed out after {timeout} s (log: {log_path})"}, " ".join(cmd)
    log_path.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not report.exists():
        why = _why(proc.stdout + proc.stderr, proc.returncode)
        return {"error": f"{why} (log: {log_path})"}, " ".join(cmd)
    return json.loads(report.read_text())[mode], " ".join(cmd)


def _text(b) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def pretrain_part(quick: bool, out: Path, peak_tflops: float, timeout: int,
                  failures: dict[str, str] | None = None) -> dict:
    """Every mode in `MODES`, each in its own launcher run, so that one mode's crash or OOM leaves
    the others' rows; a failed mode fails the part. `failures`: {"pretrain-MODE": stage} makes that
    mode's worker raise before it trains (tools/bench/inject.py)."""
    failures = failures or {}
    if quick:
        config = "configs/tiny_cpu.yaml"
        overrides = ["moe.ep_size=1", "train.steps=4", "train.log_interval=2", "train.warmup_steps=1",
                     "train.eval_iters=1", "train.checkpoint_dir=null", "train.tensorboard_dir=null",
                     "train.run_dir=null"]
    else:
        config, overrides = "configs/gpu_125m_e16_1gpu.yaml", []
    per_token = flops_per_token(config, overrides)
    on_gpu = torch.cuda.is_available() and not quick
    rows, commands = {}, {}
    for mode in MODES:
        row, commands[mode] = run_mode(mode, config, overrides, out, timeout, f"pretrain-{mode}" in failures)
        if "error" not in row:
            rate = row["tokens_per_s"]
            row["mfu"] = rate * per_token / (peak_tflops * 1e12) if (on_gpu and rate) else None
            row["peak_memory_gib"] = row["peak_memory_bytes"] / 2**30
        rows[mode] = row
    return {"config": config, "overrides": overrides, "flops_per_token": per_token,
            "peak_tflops": peak_tflops if on_gpu else None, "modes": rows, "commands": commands,
            "failed": [f"{mode}: {row['error']}" for mode, row in rows.items() if "error" in row]}


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
    p.add_argument("--fail", action="store_true", help="raise before training (gpu_check --fail-reference "
                   "pretrain-MODE), as a crash would")
    args = p.parse_args(argv)
    if args.fail:
        from .inject import InjectedFailure

        raise InjectedFailure(f"--fail-reference pretrain-{args.modes}: made to fail on purpose")
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
