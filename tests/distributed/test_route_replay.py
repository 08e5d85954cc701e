"""Route replay at EP=2 (issue 23, acceptance 2): a run that replays the routing trace of another
reproduces its training and validation losses bit for bit (fp32, CPU, 2 ranks, ep_size 2), although
its routers would route otherwise: they balance with a large selection bias, which moves the
top-k but never the weights (`router.bias_balancing`), and the same run without replay has other
losses. With ids alone the weights are the router's own at those ids, so the replayed run's own
trace equals the recorded one (ids, weights, drop flags). tools/routing_trace.py then summarizes the
recorded run's trace (a quickstart-like run, tiny config)."""

from __future__ import annotations

import json
import os

import numpy as np
from tests.harness.train import run_deepspeed_ranks, tiny_config

from moe_dist.evaluate import trace_analysis as ta
from moe_dist.train.config import parse_run_config
from moe_dist.train.trainer import pretrain

STEPS = 4
BIASED = {"type": "topk", "bias_balancing": True, "bias_update_rate": 0.5}


def _worker(rank: int, world: int, tmp: str) -> None:
    def cfg(router: dict, **trace):
        return parse_run_config(tiny_config(train=dict(steps=STEPS, eval_interval=2), moe=dict(router=router),
                                            trace=trace))

    recorded = pretrain(cfg({"type": "topk"}, dir=os.path.join(tmp, "recorded"), interval=1, tokens="all"))
    replayed = pretrain(cfg(BIASED, dir=os.path.join(tmp, "replayed"), interval=1, tokens="all",
                            replay=os.path.join(tmp, "recorded")))
    free = pretrain(cfg(BIASED))
    if rank == 0:
        with open(os.path.join(tmp, "losses.json"), "w") as f:
            json.dump({name: [r.losses, r.val_losses] for name, r in
                       (("recorded", recorded), ("replayed", replayed), ("free", free))}, f)


def test_a_replayed_run_reproduces_the_recorded_losses_exactly(tmp_path):
    run_deepspeed_ranks(_worker, 2, str(tmp_path))
    runs = json.loads((tmp_path / "losses.json").read_text())
    recorded, replayed, free = runs["recorded"], runs["replayed"], runs["free"]
    assert sorted(map(int, recorded[0])) == list(range(1, STEPS + 1)) and sorted(recorded[1]) == ["2", "4"]
    assert replayed == recorded  # every training and validation loss, bit for bit
    assert free[0]["1"] == recorded[0]["1"]  # the bias starts at 0, then moves the routes
    assert free[0][str(STEPS)] != recorded[0][str(STEPS)] and free[1] != recorded[1]

    a, b = ta.read_trace(str(tmp_path / "recorded")), ta.read_trace(str(tmp_path / "replayed"))
    assert len(a.phase) == len(b.phase) > 0 and sorted(set(a.cols["rank"].tolist())) == [0, 1]
    assert a.steps("train") == list(range(1, STEPS + 1)) and a.steps("eval") == [2, 4]
    order_a = np.lexsort([a.cols[k] for k in ("position", "row", "layer", "micro", "rank", "step")] + [a.phase])
    order_b = np.lexsort([b.cols[k] for k in ("position", "row", "layer", "micro", "rank", "step")] + [b.phase])
    for name in ("experts", "weights", "status"):
        assert np.array_equal(getattr(a, name)[order_a], getattr(b, name)[order_b]), name
    assert (a.status == 1).any()  # capacity 1.25 drops some pairs: the drop flags are compared too

    from tools import routing_trace

    out = tmp_path / "report"
    assert routing_trace.main(["summarize", str(tmp_path / "recorded"), "--out", str(out), "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["expert_load"]["1"]["steps"] == list(range(1, STEPS + 1))
    assert summary["stability"]["1"][0]["tokens"] > 0
    for name in ("load_over_steps.png", "stability.png", "domain_affinity.png", "token_affinity.png"):
        assert (out / name).stat().st_size > 0, name
