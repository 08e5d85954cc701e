"""A frequency-packed hash table travels in the training checkpoint (docs/routers/hash.md): a run
with a hash layer then a top-k layer, stopped and resumed after its token counts file is gone,
continues the uninterrupted run's loss curve exactly (2 ranks, ep_size 2, ZeRO-1, CPU). Without
the table in the checkpoint the resumed model could not route at all (the file it is built from
no longer exists)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch.distributed as dist
from tests.harness.train import REPO, run_deepspeed_ranks, tiny_config

from moe_dist.train.config import parse_run_config
from moe_dist.train.trainer import pretrain

N = 2


def _worker(rank: int, world: int, tmp: str) -> None:
    counts = os.path.join(tmp, "token_counts.npy")

    def cfg(name: str):
        return parse_run_config(tiny_config(
            model=dict(n_layers=3, moe_every=1),  # MoE layers 1 (hash) and 2 (top-k)
            train=dict(deepspeed_config=os.path.join(REPO, "configs/deepspeed/zero1_cpu.json"),
                       steps=2 * N, eval_interval=N, checkpoint_dir=os.path.join(tmp, name)),
            moe=dict(hash_layers=1, hash_router={"type": "hash", "table": "frequency", "token_counts": counts})))

    full = pretrain(cfg("full"))
    first = pretrain(cfg("resumed"), stop_at_step=N)
    dist.barrier()
    if rank == 0:
        os.remove(counts)
    dist.barrier()
    second = pretrain(cfg("resumed"), resume=True)
    if rank == 0:
        with open(os.path.join(tmp, "losses.json"), "w") as f:
            json.dump({"full": full.losses, "first": first.losses, "second": second.losses}, f)


@pytest.mark.slow  # three launcher-free training runs on 2 ranks: minutes on two shared cores
def test_resume_takes_the_frequency_hash_table_from_the_checkpoint(tmp_path):
    vocab = tiny_config()["model"]["vocab_size"]
    np.save(tmp_path / "token_counts.npy", np.random.default_rng(0).integers(0, 1000, vocab))
    run_deepspeed_ranks(_worker, 2, str(tmp_path))
    runs = json.loads((tmp_path / "losses.json").read_text())
    full = {int(k): v for k, v in runs["full"].items()}
    resumed = {int(k): v for k, v in {**runs["first"], **runs["second"]}.items()}
    assert sorted(resumed) == list(range(1, 2 * N + 1))
    assert resumed == full
