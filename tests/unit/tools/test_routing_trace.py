"""tools/routing_trace.py on traces of a tiny model's evaluations (two checkpoints of one model
through `evaluate(..., trace=...)`, as tools/evaluate.py --trace writes them): summary.json and
the PNGs are written, two traces of the same tokens compare, and a trace of another model is
refused with exit 2 naming the difference. The tool on a training run's trace (the quickstart's
config, shrunk): tests/distributed/test_route_replay.py."""

from __future__ import annotations

import json
import os

import pytest
import torch
from tests.harness import REPO
from tests.harness.train import tiny_config, write_yaml

from moe_dist.evaluate import trace_analysis as ta
from moe_dist.evaluate.runner import evaluate
from moe_dist.evaluate.sources import run_split_windows
from moe_dist.evaluate.trace_format import model_identity
from moe_dist.evaluate.trace_writer import TraceWriter, trace_meta
from moe_dist.model.transformer import MoETransformer
from moe_dist.train.config import load_run_config
from tools import routing_trace

PNG = b"\x89PNG\r\n\x1a\n"


def traced_eval(config: str, out: str, seed: int, step: int) -> None:
    cfg = load_run_config(config).model
    model = MoETransformer(cfg, seed=seed)
    names, windows = run_split_windows(config, cfg.vocab_size, 32, 512)
    writer = TraceWriter(out, trace_meta(model_identity(cfg), source="evaluate", world_size=1, ep_size=1),
                         rank=0, top_k=cfg.moe.top_k, eod=256)
    with torch.no_grad():
        evaluate(model, windows, names, batch=4, progress=False, trace=writer, step=step)


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("traces")
    config = write_yaml(str(tmp / "tiny.yaml"), tiny_config(moe=dict(ep_size=1)))
    for step, seed in ((10, 1), (20, 2)):  # two "checkpoints": one directory, and one each
        traced_eval(config, str(tmp / "both"), seed, step)
        traced_eval(config, str(tmp / f"step{step}"), seed, step)
    return tmp, config


def test_summarize_writes_the_summary_and_figures(traces):
    tmp, config = traces
    out = tmp / "report"
    assert routing_trace.main(["summarize", str(tmp / "both"), "--out", str(out), "--config", config,
                               "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == {"train": [], "eval": [10, 20]} and summary["model"]["moe_layers"] == [1]
    stab = summary["stability"]["1"][0]
    assert (stab["from_step"], stab["to_step"]) == (10, 20) and stab["tokens"] > 100
    direct = ta.stability(ta.read_trace(str(tmp / "step10")), ta.read_trace(str(tmp / "step20")))[1]
    assert {k: stab[k] for k in direct} == direct and 0.0 < stab["top1_unchanged"] < 1.0
    assert len(summary["expert_load"]["1"]["share"][0]) == 4
    assert "mi_domain" in summary["affinity"]["1"] and summary["affinity"]["1"]["top_tokens"]
    for name in ("load_over_steps.png", "stability.png", "domain_affinity.png", "token_affinity.png"):
        assert (out / name).read_bytes()[:8] == PNG, name


def test_compare_two_checkpoints_traces(traces):
    tmp, _ = traces
    out = tmp / "compare"
    assert routing_trace.main(["compare", str(tmp / "step10"), str(tmp / "step20"), "--out", str(out),
                               "--no-progress"]) == 0
    diff = json.loads((out / "compare.json").read_text())["layers"]["1"]
    # Two random initializations agree on some top-1 experts by chance, not on all.
    assert 0.0 < diff["top1_agreement"] < 1.0 and sum(map(sum, diff["top1_confusion"])) == diff["tokens"]
    assert (out / "top1_confusion.png").read_bytes()[:8] == PNG
    same = tmp / "same"
    assert routing_trace.main(["compare", str(tmp / "step10"), str(tmp / "step10"), "--out", str(same),
                               "--no-progress"]) == 0
    assert json.loads((same / "compare.json").read_text())["layers"]["1"]["top1_agreement"] == 1.0


@pytest.mark.parametrize("change, named", [(dict(model=dict(vocab_size=300)), "vocab_size 257 vs 300"),
                                           (dict(model=dict(n_layers=3)), "n_layers 2 vs 3"),
                                           (dict(model=dict(d_model=64)), "d_model 32 vs 64")])
def test_a_trace_of_another_model_is_refused_with_exit_2(traces, change, named, capsys):
    tmp, _ = traces
    other = write_yaml(str(tmp / "other.yaml"), tiny_config(moe=dict(ep_size=1), **change))
    assert routing_trace.main(["summarize", str(tmp / "both"), "--out", str(tmp / "x"), "--config", other,
                               "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "comes from another model than --config" in err and named in err
    assert not (tmp / "x").exists()  # refused before writing anything


def test_the_cost_benchmark_runs_and_reports_every_number(capsys):
    from tools.bench import routing_trace as bench

    assert bench.main(["--config", os.path.join(REPO, "configs/tiny_cpu.yaml"), "--warmup", "0", "--repeats", "1", "--json"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["tokens_per_layer"] == 256 and row["moe_layers"] == 4 and row["file_bytes"] > 0
    for key in ("untraced_ms", "traced_ms", "overhead_per_traced_step_ms", "overhead_at_interval_percent"):
        assert isinstance(row[key], float), key


def test_checkpoint_option_checks_the_trace_against_that_model(traces, capsys):
    from moe_dist.checkpoint import save_consolidated

    tmp, config = traces
    same = load_run_config(config).model
    wide = load_run_config(write_yaml(str(tmp / "wide.yaml"), tiny_config(moe=dict(ep_size=1),
                                                                          model=dict(d_model=64)))).model
    for name, cfg in (("same", same), ("wide", wide)):
        save_consolidated(MoETransformer(cfg, seed=1), str(tmp / f"ckpt_{name}"))
    assert routing_trace.main(["summarize", str(tmp / "step10"), "--out", str(tmp / "ok"), "--checkpoint",
                               str(tmp / "ckpt_same"), "--no-progress"]) == 0
    assert routing_trace.main(["summarize", str(tmp / "step10"), "--out", str(tmp / "no"), "--checkpoint",
                               str(tmp / "ckpt_wide"), "--no-progress"]) == 2
    assert "comes from another model than --checkpoint" in capsys.readouterr().err
