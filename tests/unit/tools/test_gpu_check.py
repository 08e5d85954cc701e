"""tools/bench/gpu_check.py: `--quick` runs every part on CPU (correctness checks, the layer benchmark
with Megatron-Core reported as skipped, expert parallelism over 2 gloo processes, a short
pretraining through the deepspeed launcher with and without expert recompute) and writes its JSON
and markdown reports; with a reference made to fail (at build or while it runs) that row says why,
every other row keeps its numbers and the run passes; a moe_dist failure or a crashed pretraining
mode fails the run after every row is reported; `--help` documents every part; on a GPU a missing
reference package is refused, by name, before any work."""

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
    # Megatron-Core is built as on a GPU (its spec, its expert MLP) and fails to build on CPU.
    assert all("SequentialMLP: RuntimeError: torch.cuda" in r["megatron_skipped"] for r in rows), rows
    assert all(r["moe_dist_over_deepspeed"] > 0 and r["moe_dist_over_floor"] > 0 for r in rows), rows
    assert {r["top_k"] for r in rows} == {8, 2}
    ep = rep["ep"]
    assert (ep["world"], ep["backend"]) == (2, "gloo"), ep
    assert all(ep["rows"][c]["ms"] > 0 for c in ("moe_dist_ep", "moe_dist_local", "deepspeed_ep")), ep
    assert "SequentialMLP: RuntimeError: torch.cuda" in ep["rows"]["megatron_ep"]["skipped"], ep
    modes = rep["pretrain"]["modes"]
    assert set(modes) == {"none", "experts"}
    assert all(m["tokens_per_s"] > 0 and m["steps"] == 4 for m in modes.values()), modes
    # Expert recompute changes no number of the run: the same losses through the real launcher.
    assert modes["none"]["last_loss"] == modes["experts"]["last_loss"], modes
    md = (tmp_path / "gpu_check.md").read_text()
    assert "## correctness" in md and "## bench" in md and "## ep" in md and "## pretrain" in md and "skipped:" in md


def run_quick(tmp_path, *args: str) -> tuple[subprocess.CompletedProcess, dict, str]:
    proc = subprocess.run([sys.executable, *TOOL, "--quick", "--out", str(tmp_path), *args], capture_output=True,
                          text=True, timeout=600, cwd=ROOT)
    return proc, json.loads((tmp_path / "gpu_check.json").read_text()), (tmp_path / "gpu_check.md").read_text()


def test_references_made_to_fail_are_skipped_rows_and_every_other_row_survives(tmp_path):
    # DeepSpeed fails to build in the layer benchmark and dies in its first step at EP=2; on CPU
    # Megatron-Core fails to build by itself. None of that is moe_dist's failure: exit 0.
    proc, rep, md = run_quick(tmp_path, "--parts", "bench,ep", "--fail-reference", "deepspeed",
                              "--fail-reference", "deepspeed_ep:run")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert rep["bench"]["ok"] and rep["ep"]["ok"], rep
    for r in rep["bench"]["rows"]:
        assert r["deepspeed_skipped"] == ("InjectedFailure: --fail-reference deepspeed:build: made to fail "
                                          "on purpose"), r
        assert "deepspeed_ms" not in r and "moe_dist_over_deepspeed" not in r
        assert "torch.cuda" in r["megatron_skipped"], r
        assert r["moe_dist_ms"] > 0 and r["floor_ms"] > 0 and r["moe_dist_over_floor"] > 0, r
    ep = rep["ep"]["rows"]
    assert ep["deepspeed_ep"] == {"skipped": "InjectedFailure: --fail-reference deepspeed_ep:run: made to fail "
                                             "on purpose"}, ep
    assert ep["moe_dist_ep"]["ms"] > 0 and ep["moe_dist_local"]["moe_dist_ep_over_case"] > 0, ep
    assert "torch.cuda" in ep["megatron_ep"]["skipped"], ep
    assert md.count("skipped: InjectedFailure: --fail-reference deepspeed:build") == 2, md
    assert "skipped: InjectedFailure: --fail-reference deepspeed_ep:run" in md, md
    assert md.count("| moe_dist |") == 2 and md.count("| floor |") == 2 and "| moe_dist_local |" in md, md


def test_moe_dist_failures_fail_the_run_after_every_row(tmp_path):
    # moe_dist's layer dies in its first step; the pretraining mode `none` crashes in its own
    # launcher run, and the mode `experts` still reports its numbers.
    proc, rep, md = run_quick(tmp_path, "--parts", "bench,pretrain", "--fail-reference", "moe_dist:run",
                              "--fail-reference", "pretrain-none")
    assert proc.returncode == 1, proc.stderr[-4000:]
    assert not rep["bench"]["ok"] and len(rep["bench"]["failed"]) == 2, rep["bench"]
    for r in rep["bench"]["rows"]:
        assert r["moe_dist_failed"] == "InjectedFailure: --fail-reference moe_dist:run: made to fail on purpose", r
        assert r["deepspeed_ms"] > 0 and r["floor_ms"] > 0, r
    assert md.count("FAILED: InjectedFailure") == 2, md
    assert not rep["pretrain"]["ok"], rep["pretrain"]
    modes = rep["pretrain"]["modes"]
    assert "InjectedFailure: --fail-reference pretrain-none: made to fail on purpose" in modes["none"]["error"], modes
    assert modes["experts"]["tokens_per_s"] > 0 and modes["experts"]["steps"] == 4, modes
    assert "| none | - |" in md and "FAILED: exit 1" in md, md


@pytest.mark.parametrize("value", ["nosuchcase", "deepspeed:later"])
def test_a_bad_fail_reference_is_refused_naming_it(capsys, tmp_path, value):
    with pytest.raises(SystemExit) as info:
        gpu_check.parse_args(["--out", str(tmp_path), "--fail-reference", value])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"--fail-reference {value!r}" in err and "deepspeed_ep" in err and "pretrain-experts" in err, err


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
