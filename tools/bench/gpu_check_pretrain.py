"""The worker tools/gpu_check.py starts with the `deepspeed` launcher: pretrain one config once per
`--modes` entry (`model.moe_recompute`) in this process, and write per mode the tokens/s of the
last logging interval (the first one includes start-up) and the peak memory to `--report` (rank 0).

Peak memory: CUDA `max_memory_allocated` over the run (reset between modes); on CPU the resident
high-water mark (VmHWM, reset between modes), which includes the allocator's cached memory.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from moe_dist.common.atomic import write_text_atomic
from moe_dist.parallel import runtime
from moe_dist.train import progress as progress_module
from moe_dist.train.config import load_run_config
from moe_dist.train.trainer import pretrain


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
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
