"""A hot expert through the real launcher (EP 2): every token of every MoE layer prefers expert 0,
injected as a real config would (a consolidated checkpoint whose routers carry a large selection
bias, loaded by `train.init_from`, with `bias_update_rate: 0` so it stays). Under a receive budget
(`moe.rank_capacity_factor`) the step log and TensorBoard count the pairs over budget, spilled and
dropped; under `moe.overflow: error` every rank stops with one line naming the layer, the ranks and
the expert, and exit status 5 (no traceback, no hang). The memory side (the bounded run's peak does not grow
with the hot expert, the unbounded one's does): tests/distributed/test_hot_expert_memory.py."""

from __future__ import annotations

import re

import torch
from tests.harness.train import free_port, launch, tensorboard_scalars, tiny_config, write_yaml

from moe_dist.checkpoint.consolidated import save_consolidated
from moe_dist.model.config import parse_model_config
from moe_dist.model.transformer import MoETransformer
from moe_dist.train.safety.exits import OVERFLOW

HOT_ROUTER = {"type": "topk", "bias_balancing": True, "bias_update_rate": 0.0}


def hot_run(tmp_path, overflow: str, **train) -> tuple[dict, str]:
    cfg = tiny_config(moe=dict(dropless=True, rank_capacity_factor=1.0, overflow=overflow, router=HOT_ROUTER),
                      train=dict(steps=2, grad_accum=1, log_interval=1, **train))
    del cfg["moe"]["capacity_factor"]
    single = parse_model_config(cfg["model"], {**cfg["moe"], "ep_size": 1})
    model = MoETransformer(single, seed=0)
    with torch.no_grad():
        for i in single.moe_layer_indices:
            model.blocks[i].moe.router.selection_bias_E[0] = 10.0
    cfg["train"]["init_from"] = save_consolidated(model, str(tmp_path / "hot"))
    return cfg, write_yaml(str(tmp_path / f"{overflow}.yaml"), cfg)


def test_hot_expert_counts_reach_the_log_and_tensorboard(tmp_path):
    tb = tmp_path / "tb"
    _, config = hot_run(tmp_path, "spill", tensorboard_dir=str(tb))
    proc = launch(["--num_gpus", "2", "--master_port", str(free_port()), "launch/pretrain.py", "--config", config])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    lines = re.findall(r"step (\d+) \| receive budget, pairs over budget/spilled/dropped per MoE layer: 1: "
                       r"(\d+)/(\d+)/(\d+)", out)
    assert [int(step) for step, *_ in lines] == [1, 2], out[-5000:]
    for _, over, spilled, dropped in lines:
        assert int(over) > 0 and int(over) == int(spilled) + int(dropped)
        assert int(spilled) > 0  # rank 1's experts have room: spill finds it
    scalars = tensorboard_scalars(str(tb))
    assert [v for _, v in scalars["moe/layer1/pairs_over_budget"]] == [float(o) for _, o, _, _ in lines]
    assert "moe/layer1/pairs_spilled" in scalars and "moe/layer1/pairs_budget_dropped" in scalars


def test_overflow_error_stops_every_rank_naming_layer_rank_and_expert(tmp_path):
    _, config = hot_run(tmp_path, "error")
    proc = launch(["--num_gpus", "2", "--master_port", str(free_port()), "launch/pretrain.py", "--config", config],
                  timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == OVERFLOW, out[-5000:]
    assert "Traceback" not in out, out[-5000:]
    # Both ranks raise in the same forward (each learns the other's overflow from the count exchange).
    message = (r"rank [01]: stopped: MoE layer 1: EP rank 0 routed \d+ rows to EP rank 0, over its receive budget "
               r"of 64 rows \(moe.rank_capacity_factor 1, moe.overflow: error\); expert 0 alone got 64 of them\. "
               r"Raise moe.rank_capacity_factor, or set moe.overflow: drop or spill \(exit 5\)")
    assert len(re.findall(message, out)) == 2, out[-5000:]
    assert "step 1 |" not in out  # stopped in the first step's forward
