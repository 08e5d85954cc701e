"""tools/bench/moe.py runs end to end on a tiny configuration and prints the promised JSON keys.

It runs as a subprocess: DeepSpeed's MoE initialises torch.distributed and caches its expert groups
in module globals, which must not leak into the other tests of this pytest process. No timing is
asserted, only that every number is there and that both layers routed alike.
"""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
KEYS = {"num_experts", "tokens", "moe_dist_ms", "deepspeed_ms", "floor_ms", "moe_dist_peak_mb",
        "deepspeed_peak_mb", "floor_peak_mb", "moe_dist_over_floor", "moe_dist_over_deepspeed"}


def test_bench_moe_tiny_json():
    cmd = [sys.executable, "-m", "tools.bench.moe", "--num-experts", "4", "--tokens", "64", "--d-model", "32",
           "--d-ff", "64", "--repeats", "1", "--warmup", "0", "--threads", "1", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 1, proc.stdout
    row = rows[0]
    assert KEYS <= row.keys(), KEYS - row.keys()
    assert (row["num_experts"], row["tokens"]) == (4, 64)
    for key in KEYS - {"num_experts", "tokens"}:
        assert isinstance(row[key], (int, float)) and row[key] >= 0, (key, row[key])
    assert row["same_routing"], row
    assert row["cpu_malloc"] == "keep", row  # the trainer's CPU allocator setting by default
