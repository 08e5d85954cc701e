"""tools/evaluate.py --trace / --replay: an evaluation's routing trace holds every token of every
forward; replaying it on the same checkpoint gives the same loss bit for bit; replayed on another
checkpoint (another router's weights) the routes are the trace's, with its weights too under
--replay-weights; a trace of another model is refused with exit 2."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moe_dist.checkpoint import save_consolidated
from moe_dist.evaluate import trace_analysis as ta
from moe_dist.model.config import parse_model_config
from moe_dist.model.transformer import MoETransformer
from tests.harness import load_tool

DOCS = ["the cat sat on the mat", "le chat est sur le tapis", "der Hund schläft im Garten " * 3, "ok " * 20]


def model(seed: int, d_model: int = 32) -> MoETransformer:
    cfg = parse_model_config(dict(vocab_size=257, d_model=d_model, n_layers=2, n_heads=2, d_ff=48, max_seq_len=32,
                                  moe_every=1),
                             dict(num_experts=4, top_k=2, d_ff=16, capacity_factor=1.0, eval_capacity_factor=0.5))
    return MoETransformer(cfg, seed=seed).eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval_trace")
    data = tmp / "held_out.txt"
    data.write_text("\n".join(DOCS) + "\n")
    ckpts = {name: save_consolidated(model(seed, **kw), str(tmp / name))
             for name, seed, kw in (("a", 5, {}), ("b", 6, {}), ("wide", 5, dict(d_model=64)))}
    return ckpts, str(data), tmp


def run(ckpt: str, data: str, out, *extra: str) -> float:
    args = [ckpt, "--data", data, "--seq-len", "16", "--batch", "3", "--capacity", "config", "--json", str(out),
            "--no-progress", *extra]
    assert load_tool("evaluate").main(args) == 0
    return json.loads(out.read_text())["loss"]


def test_trace_and_replay_of_an_evaluation(setup):
    ckpts, data, tmp = setup
    loss_a = run(ckpts["a"], data, tmp / "a.json", "--trace", str(tmp / "trace_a"))
    trace = ta.read_trace(str(tmp / "trace_a"))
    assert trace.meta["source"] == "evaluate" and trace.steps("eval") == [0]
    assert (trace.status == 1).any()  # eval_capacity_factor 0.5 drops pairs
    tokens_per_layer = len(trace.phase) // 2
    assert tokens_per_layer == sum(len(d.encode()) + 1 for d in DOCS) - 1  # every predicted token, once

    assert run(ckpts["a"], data, tmp / "ar.json", "--replay", str(tmp / "trace_a")) == loss_a

    loss_b = run(ckpts["b"], data, tmp / "b.json", "--trace", str(tmp / "trace_b"))
    replayed = run(ckpts["b"], data, tmp / "br.json", "--replay", str(tmp / "trace_a"), "--trace",
                   str(tmp / "trace_ba"))
    assert replayed != loss_b
    a, b, ba = (ta.read_trace(str(tmp / n)) for n in ("trace_a", "trace_b", "trace_ba"))
    assert np.array_equal(ba.experts, a.experts) and not np.array_equal(b.experts, a.experts)
    assert not np.array_equal(ba.weights, a.weights)  # b's router weighs a's routes its own way
    run(ckpts["b"], data, tmp / "bw.json", "--replay", str(tmp / "trace_a"), "--replay-weights", "--trace",
        str(tmp / "trace_baw"))
    baw = ta.read_trace(str(tmp / "trace_baw"))
    assert np.array_equal(baw.experts, a.experts) and np.array_equal(baw.weights, a.weights)


def test_replaying_another_models_trace_exits_2(setup, capsys):
    ckpts, data, tmp = setup
    run(ckpts["a"], data, tmp / "a2.json", "--trace", str(tmp / "trace_a2"))
    assert load_tool("evaluate").main([ckpts["wide"], "--data", data, "--replay", str(tmp / "trace_a2"),
                                       "--no-progress"]) == 2
    assert "comes from another model than this run's model: d_model 32 vs 64" in capsys.readouterr().err
    assert load_tool("evaluate").main([ckpts["a"], "--data", data, "--trace-tokens", "x", "--trace", "t"]) == 2
    assert "--trace-tokens must be a positive number of tokens or 'all', got 'x'" in capsys.readouterr().err
