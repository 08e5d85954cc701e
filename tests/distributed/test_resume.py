"""Exact resume: train N steps, stop (checkpoint), resume to 2N; the losses of steps N+1..2N equal
those of an uninterrupted 2N-step run, under ZeRO-1 and ZeRO-2 (CPU, fp32, 2 ranks, ep_size 2), and
under ZeRO-2 with bf16 (DeepSpeed's bf16 path runs on CPU too).

What must round-trip for that: dense and expert weights (experts from moe_dist's per-EP-rank
files), ZeRO's fp32 partitions and Adam moments, the LR scheduler, router buffers, the data
position (consumed samples) and each rank's RNG.
"""

from __future__ import annotations

import json
import os

import pytest
from tests.harness.train import REPO, run_deepspeed_ranks, tiny_config

from moe_dist.checkpoint.training.layout import read_latest
from moe_dist.train.config import parse_run_config
from moe_dist.train.trainer import pretrain

N = 3


def _worker(rank: int, world: int, ds_json: str, tmp: str) -> None:
    def cfg(name: str):
        return parse_run_config(tiny_config(
            train=dict(deepspeed_config=os.path.join(REPO, "configs/deepspeed", ds_json),
                       steps=2 * N, eval_interval=N, checkpoint_dir=os.path.join(tmp, name)),
            # bias balancing: router state that changes after every step must round-trip too
            moe=dict(router={"type": "topk", "bias_balancing": True, "bias_update_rate": 0.01})))

    full = pretrain(cfg("full"))
    first = pretrain(cfg("resumed"), stop_at_step=N)
    second = pretrain(cfg("resumed"), resume=True)
    if rank == 0:
        with open(os.path.join(tmp, "losses.json"), "w") as f:
            json.dump({"full": full.losses, "first": first.losses, "second": second.losses,
                       "full_val": full.val_losses, "second_val": second.val_losses}, f)


@pytest.mark.parametrize("ds_json", ["zero1_cpu.json", "zero2_cpu.json",
                                     pytest.param("zero2_bf16.json", marks=pytest.mark.slow)])
def test_resume_continues_the_same_loss_curve(ds_json, tmp_path):
    run_deepspeed_ranks(_worker, 2, ds_json, str(tmp_path))
    runs = json.loads((tmp_path / "losses.json").read_text())
    full = {int(k): v for k, v in runs["full"].items()}
    first = {int(k): v for k, v in runs["first"].items()}
    second = {int(k): v for k, v in runs["second"].items()}
    assert sorted(first) == list(range(1, N + 1))
    assert sorted(second) == list(range(N + 1, 2 * N + 1))
    for step in range(1, N + 1):
        assert first[step] == full[step], f"step {step}: {first[step]} != {full[step]}"
    for step in range(N + 1, 2 * N + 1):
        assert second[step] == full[step], f"{ds_json} step {step} after resume: {second[step]} != {full[step]}"
    final = str(2 * N)
    assert runs["second_val"][final] == runs["full_val"][final]
    assert full[2 * N] < full[1]
    assert read_latest(str(tmp_path / "resumed")) == f"step_{2 * N:08d}"
