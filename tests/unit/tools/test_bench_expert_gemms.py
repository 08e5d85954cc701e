"""tools/bench/expert_gemms.py runs on a tiny configuration and reports every GEMM of the layer in
every variant, with the streamed bytes priced at the measured bandwidth; its cached variant keeps
the weights and gradients in cache. No timing is asserted.

Subprocesses for whole runs: the tool sets the process's thread count and glibc's allocator mode.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_dist.common.tensor_memory import peak_tensor_mb
from moe_dist.kernels.cpu import mkl_grouped
from tools.bench import expert_gemms
from tools.bench.spec import Spec

ROOT = Path(__file__).resolve().parents[3]
GEMMS = {"fwd1", "fwd2", "dx2", "dW2", "dx1", "dW1"}
VARIANT_KEYS = {"dense_ms", "grouped_ms", "cached_ms", "stream_ms"}
TINY = ["--tokens", "64", "--d-model", "32", "--d-ff", "48", "--repeats", "1", "--warmup", "0",
        "--threads", "1"]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tools.bench.expert_gemms", *args], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)


@pytest.fixture(autouse=True)
def _needs_mkl():
    if not mkl_grouped.available(torch.randn(1, 4), torch.randn(1, 4, 4)):
        pytest.skip("this PyTorch build has no usable MKL batch GEMM")


def test_tiny_json_reports_every_gemm_and_prices_the_streamed_bytes():
    proc = _run("--num-experts", "4", "8", "--json", *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["num_experts"] for r in rows] == [4, 8]
    for r in rows:
        assert set(r["gemms"]) == GEMMS
        assert 0 < r["rows"] <= 64 * 2 and r["rows_per_expert"][0] <= r["rows_per_expert"][2]
        for name, g in r["gemms"].items():
            assert set(g) == VARIANT_KEYS and all(v > 0 for v in g.values()), (name, g)
            # One [32, 48] fp32 matrix per expert moved once: read, or written for a gradient.
            gbs = r["write_gbs"] if name.startswith("dW") else r["read_gbs"]
            want = r["num_experts"] * 32 * 48 * 4 / (gbs * 1e9) * 1e3
            assert math.isclose(g["stream_ms"], want, rel_tol=0.05, abs_tol=0.01), (name, g, want)
        for variant in ("dense", "grouped", "cached"):
            total = sum(g[f"{variant}_ms"] for g in r["gemms"].values())
            assert math.isclose(r[f"{variant}_ms"], total, rel_tol=0.01, abs_tol=0.05), variant
        assert r["grouped_over_dense"] == pytest.approx(r["grouped_ms"] / r["dense_ms"], rel=0.01)


def test_table_and_bad_flags():
    proc = _run("--num-experts", "4", *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("| E | rows/expert") and "\n| 4 | " in proc.stdout
    bad = _run("--capacity-factor", "0", *TINY)
    assert bad.returncode == 2 and "--capacity-factor (0.0) must be > 0" in bad.stderr


def test_cached_variants_read_and_write_one_matrix_in_place():
    """The cached variant reads an expanded weight stack and writes every expert's gradient into
    one shared buffer, without materialising either: a copy would be 32 MiB here."""
    spec = Spec(tokens=1024, d_model=64, d_ff=64, num_experts=2048, top_k=2, capacity_factor=1.0, threads=1)
    counts = [1] * spec.num_experts
    w = torch.randn(spec.num_experts, 64, 64)
    for gemm in expert_gemms.GEMMS:
        cached = expert_gemms.make_variants(gemm, spec, counts, {"w1": w, "w2": w})["cached"]
        assert peak_tensor_mb(cached) < 1, gemm.name
