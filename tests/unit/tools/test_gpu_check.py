"""tools/bench/gpu_check.py: `--quick` runs every part on CPU (correctness checks, the layer benchmark
with Megatron-Core reported as skipped, a short pretraining through the deepspeed launcher with
and without expert recompute) and writes its JSON and markdown reports; `--help` documents every
part; on a GPU a missing reference package is refused, by name, before any work."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tools.bench import gpu_check

ROOT = Path(__file__).resolve().parents[3]
TOOL = ["-m", "tools.bench.gpu_check"]
CHECKS = {"layer_bf16_vs_fp32", "grouped_mm_vs_loop", "dropless", "capacity", "eval_determinism",
          "recompute_gradients[activation]", "recompute_gradients[experts]"}


def test_quick_runs_every_part_and_writes_the_reports(tmp_path):
    proc = subprocess.run([sys.executable, *TOOL, "--quick", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rep = json.loads((tmp_path / "gpu_check.json").read_text())
    assert all(rep[part]["ok"] for part in ("correctness", "bench", "pretrain")), rep
    statuses = {c["name"]: c["status"] for c in rep["correctness"]["checks"]}
    assert set(statuses) == CHECKS and all(s == "pass" for s in statuses.values()), statuses
    rows = rep["bench"]["rows"]
    assert len(rows) == 2 and all(r["moe_dist_ms"] > 0 and r["deepspeed_ms"] > 0 and r["floor_ms"] > 0 for r in rows)
    assert all("CUDA-only" in r["megatron_skipped"] for r in rows), rows
    assert {r["top_k"] for r in rows} == {8, 2}
    modes = rep["pretrain"]["modes"]
    assert set(modes) == {"none", "experts"}
    assert all(m["tokens_per_s"] > 0 and m["steps"] == 4 for m in modes.values()), modes
    # Expert recompute changes no number of the run: the same losses through the real launcher.
    assert modes["none"]["last_loss"] == modes["experts"]["last_loss"], modes
    md = (tmp_path / "gpu_check.md").read_text()
    assert "## correctness" in md and "## bench" in md and "## pretrain" in md and "skipped:" in md


def test_help_documents_every_part():
    proc = subprocess.run([sys.executable, *TOOL, "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0
    for word in ("correctness", "bench", "pretrain", "--quick", "MFU", "FLOPs per token", *CHECKS - {
            "recompute_gradients[activation]", "recompute_gradients[experts]"}, "recompute_gradients"):
        assert word in proc.stdout, word


@pytest.mark.parametrize("missing,name", [("megatron.core", "megatron-core"), ("deepspeed", "deepspeed")])
def test_refuses_a_missing_reference_package_on_gpu(monkeypatch, capsys, tmp_path, missing, name):
    real_import = importlib.import_module

    def fake_import(module, *args, **kwargs):
        if module == missing or module.startswith(missing + "."):
            raise ModuleNotFoundError(f"No module named '{missing}'")
        return real_import(module, *args, **kwargs)

    monkeypatch.setattr(gpu_check.importlib, "import_module", fake_import)
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: True)  # as on a GPU machine
    assert gpu_check.main(["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert name in err and missing in err, err
    assert not (tmp_path / "out").exists()  # refused before any work
    # --quick needs only deepspeed.
    if missing == "megatron.core":
        gpu_check.check_references(quick=True)
