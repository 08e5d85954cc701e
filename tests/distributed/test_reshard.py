"""Reshard 4 -> 2 on 4 gloo ranks (slow: a 4-process and a 2-process start-up): train at
ep_size 4 on 4 ranks, reshard the step-N checkpoint to ep_size 2 on 4 ranks and to ep_size 2 on
2 ranks (global batch kept: micro batch doubled), resume both; the losses of steps N+1..2N equal
the un-resharded run's. Dropless routing, because capacity is per rank and the 2-rank run has
twice the tokens per rank."""

from __future__ import annotations

import os

import pytest
import torch
from tests.harness.ckpt import N, read_losses, resume_and_record, run_config, train_and_record
from tests.harness.train import run_deepspeed_ranks

from moe_dist.checkpoint import reshard
from moe_dist.checkpoint.training.layout import tag_for_step
from moe_dist.parallel import runtime

RESUME = dict(rtol=1e-5, atol=1e-6)


def _four_ranks(rank: int, world: int, tmp: str) -> None:
    train_and_record(run_config(4, os.path.join(tmp, "ep4"), dropless=True), tmp, "ep4")
    if rank == 0:
        for name, world_size in (("ep2_w4", 4), ("ep2_w2", 2)):
            reshard(os.path.join(tmp, "ep4"), os.path.join(tmp, name), ep_size=2, world_size=world_size,
                    tag=tag_for_step(N), progress=False)
    runtime.barrier()
    resume_and_record(os.path.join(tmp, "ep2_w4"), tmp, "ep2_w4", 2, dropless=True)


def _two_ranks(rank: int, world: int, tmp: str) -> None:
    resume_and_record(os.path.join(tmp, "ep2_w2"), tmp, "ep2_w2", 2, dropless=True, micro_batch=4)


@pytest.mark.slow
def test_reshard_ep4_to_ep2_at_world_4_and_world_2_resumes_on_the_same_loss_curve(tmp_path):
    run_deepspeed_ranks(_four_ranks, 4, str(tmp_path))
    run_deepspeed_ranks(_two_ranks, 2, str(tmp_path))
    full = read_losses(tmp_path / "ep4.json")
    steps = list(range(N + 1, 2 * N + 1))
    for name in ("ep2_w4", "ep2_w2"):
        after = read_losses(tmp_path / f"{name}.json")
        assert sorted(after) == steps, name
        torch.testing.assert_close(torch.tensor([after[s] for s in steps]), torch.tensor([full[s] for s in steps]),
                                   **RESUME, msg=lambda m: f"{name}: {m}")
