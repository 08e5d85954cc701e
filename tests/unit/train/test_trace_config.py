"""The `trace:` config section and the launcher's `--trace` / `--replay_routes` flags: strict
values with one-line errors, traced layers that must be MoE layers, and a replayed trace of
another model refused at the entry point with exit 2, before any process group or model."""

from __future__ import annotations

import pytest
import torch
from tests.harness import load_script
from tests.harness.train import tiny_config, write_yaml

from moe_dist.common.config import ConfigError
from moe_dist.evaluate.trace_format import model_identity
from moe_dist.evaluate.trace_writer import TraceWriter, trace_meta
from moe_dist.moe.layer import RouteRecord
from moe_dist.train.config import parse_run_config


def test_defaults_are_off_and_round_trip():
    cfg = parse_run_config(tiny_config())
    assert cfg.trace.dir is None and cfg.trace.replay is None and cfg.trace.tokens_per_layer == 256
    assert cfg.to_dict()["trace"]["interval"] == 50
    assert parse_run_config(tiny_config(trace=dict(dir="t", tokens="all"))).trace.tokens_per_layer is None


@pytest.mark.parametrize("trace, message", [
    (dict(interval=0), "trace.interval must be an integer >= 1, got 0"),
    (dict(tokens="some"), "trace.tokens must be an integer >= 1 or 'all', got 'some'"),
    (dict(tokens=0), "trace.tokens must be an integer >= 1 or 'all', got 0"),
    (dict(layers=[0]), "trace.layers [0] are not MoE layers; the model's MoE layers are [1]"),
    (dict(layers=[]), "trace.layers must be a non-empty list"),
    (dict(max_file_mb=0), "trace.max_file_mb must be a number of MiB > 0, got 0"),
    (dict(replay_weights=True), "trace.replay_weights needs trace.replay"),
    (dict(every=3), "trace: unknown key(s) ['every']"),
])
def test_bad_trace_settings_are_one_line_errors(trace, message):
    with pytest.raises(ConfigError) as e:
        parse_run_config(tiny_config(trace=trace))
    assert message in str(e.value)


def _entry(monkeypatch):
    monkeypatch.setenv("RANK", "1")  # no rank-0 claim on a checkpoint folder
    monkeypatch.setenv("WORLD_SIZE", "2")
    entry = load_script("launch/pretrain.py")
    monkeypatch.setattr(entry, "guard_launcher", lambda: None)
    return entry


def test_the_flags_set_the_trace_section(tmp_path, monkeypatch):
    from moe_dist.train import trainer

    seen = {}
    monkeypatch.setattr(trainer, "pretrain", lambda cfg, **kw: seen.setdefault("cfg", cfg))
    entry = _entry(monkeypatch)
    monkeypatch.setattr("moe_dist.train.safety.run_dir.claim", lambda *a: None)
    path = write_yaml(str(tmp_path / "run.yaml"), tiny_config())
    monkeypatch.setattr("moe_dist.parallel.runtime.destroy", lambda: None)
    assert entry.main(["--config", path, "--trace", "runs/x y/trace", "--replay_routes", "123"]) == 0
    assert seen["cfg"].trace.dir == "runs/x y/trace" and seen["cfg"].trace.replay == "123"


def test_replaying_a_trace_of_another_model_exits_2_before_the_run(tmp_path, monkeypatch, capsys):
    other = parse_run_config(tiny_config(model=dict(d_model=48, n_heads=2))).model
    writer = TraceWriter(str(tmp_path / "trace"), trace_meta(model_identity(other), source="train", world_size=2,
                                                             ep_size=2), rank=1, top_k=2, tokens=None)
    idx = torch.zeros(4, 2, dtype=torch.long)
    writer.add(0, torch.zeros(1, 4, dtype=torch.long), None,
               {1: RouteRecord(idx, torch.ones(4, 2), torch.ones(4, 2, dtype=torch.bool))})
    writer.flush("train", 1)
    entry = _entry(monkeypatch)
    path = write_yaml(str(tmp_path / "run.yaml"), tiny_config())
    assert entry.main(["--config", path, "--replay_routes", str(tmp_path / "trace")]) == 2
    err = capsys.readouterr().err
    assert "config error: trace" in err and "comes from another model than this run's model: d_model 48 vs 32" in err
