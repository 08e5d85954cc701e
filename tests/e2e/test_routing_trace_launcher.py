"""The routing trace through the real `deepspeed` launcher (issue 23, acceptance 1): the trace of an
EP=2 run (`--trace DIR`, every token) equals the trace of the same tokens from one process (the
single-process reference with `capacity_groups=2`, the same weights): the same expert ids, weights
and drop flags, bit for bit."""

from __future__ import annotations

import numpy as np
import torch
from tests.harness.train import assert_launch_ok, free_port, launch, tiny_config, write_yaml

from moe_dist.evaluate import trace_analysis as ta
from moe_dist.model.transformer import MoETransformer
from moe_dist.train.config import parse_run_config

KEY = ("layer", "row", "position")


def launch_run(cfg: dict, tmp, *extra: str):
    path = write_yaml(str(tmp / f"run_{free_port()}.yaml"), cfg)
    return launch(["--num_gpus", "2", "--master_port", str(free_port()), "launch/pretrain.py", "--config", path,
                   *extra], timeout=600)


def test_an_ep2_trace_equals_the_one_process_trace_of_the_same_tokens(tmp_path):
    raw = tiny_config(train=dict(steps=1, warmup_steps=0))
    proc = launch_run(raw, tmp_path, "--trace", str(tmp_path / "trace"), "--set", "trace.interval=1",
                      "--set", "trace.tokens=all")
    assert_launch_ok(proc)
    trace = ta.read_trace(str(tmp_path / "trace"))
    assert trace.steps("train") == [1] and sorted(set(trace.cols["rank"].tolist())) == [0, 1]
    trace = trace.select(trace.phase == "train")  # the run's last step also traced its evaluation
    assert (trace.status == 1).any()  # capacity 1.25: some pairs dropped, so drop flags are compared

    cfg = parse_run_config(tiny_config(train=dict(steps=1, warmup_steps=0), moe=dict(ep_size=1)))
    model = MoETransformer(cfg.model, seed=cfg.train.seed).train()  # the run's weights before its first step
    B, S = cfg.train.micro_batch, cfg.train.seq_len
    layer = cfg.model.moe_layer_indices[0]
    for micro in range(cfg.train.grad_accum):
        # Rank r's micro batch from its rows of the trace; one process holds both ranks' tokens.
        parts = [trace.select((trace.cols["micro"] == micro) & (trace.cols["rank"] == r)
                              & (trace.cols["layer"] == layer)) for r in (0, 1)]
        tokens = torch.zeros(2 * B, S, dtype=torch.long)
        domains = torch.zeros(2 * B, S, dtype=torch.long)
        for r, part in enumerate(parts):
            rows = torch.from_numpy(part.cols["row"] + r * B)
            pos = torch.from_numpy(part.cols["position"])
            tokens[rows, pos] = torch.from_numpy(part.cols["token_id"])
            domains[rows, pos] = torch.from_numpy(part.cols["domain"])
        with torch.no_grad():
            route = model(tokens, domain_ids_BS=domains, capacity_groups=2, trace=True).routes[layer]
        for r, part in enumerate(parts):
            order = np.lexsort([part.cols["position"], part.cols["row"]])
            t = (part.cols["row"][order] + r * B) * S + part.cols["position"][order]
            assert np.array_equal(part.experts[order], route.idx_TK[t].numpy()), f"micro {micro} rank {r} ids"
            assert np.array_equal(part.status[order] == 0, route.keep_TK[t].numpy()), f"micro {micro} rank {r} drops"
            np.testing.assert_array_equal(part.weights[order], route.w_TK[t].numpy())
