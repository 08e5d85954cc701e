"""Branching a warmup-stable-decay decay from a stable-phase checkpoint (docs/training.md,
"Learning-rate schedules"): a long WSD run is stopped in its stable phase at step K; its tag is
copied into a new folder and resumed with `train.steps = K + D`, `train.decay_steps = D`. The
branch's losses equal those of a run configured with that decay from the start (2 ranks, ep_size
2, ZeRO-1, the DeepSpeed engine)."""

from __future__ import annotations

import json
import os
import shutil

from tests.harness.train import run_deepspeed_ranks, tiny_config

from moe_dist.checkpoint.training.layout import LATEST, tag_for_step
from moe_dist.parallel import runtime
from moe_dist.train.config import parse_run_config
from moe_dist.train.schedule import lr_at
from moe_dist.train.trainer import pretrain

K, D = 4, 3  # the branch point (steps 1..K are stable) and the decay's length


def _config(tmp: str, name: str, steps: int, decay_steps: int):
    return parse_run_config(tiny_config(train=dict(steps=steps, lr_decay="wsd", decay_steps=decay_steps,
                                                   decay_shape="1-sqrt", min_lr=0.0,
                                                   checkpoint_dir=os.path.join(tmp, name))))


def _worker(rank: int, world: int, tmp: str) -> None:
    reference = pretrain(_config(tmp, "reference", K + D, D))
    stable = pretrain(_config(tmp, "stable", 100, 20), stop_at_step=K)
    if rank == 0:  # the documented branch: the stable run's tag K, alone in a new folder
        tag = tag_for_step(K)
        branch_dir = os.path.join(tmp, "branch")
        shutil.copytree(os.path.join(tmp, "stable", tag), os.path.join(branch_dir, tag))
        with open(os.path.join(branch_dir, LATEST), "w") as f:
            f.write(tag)
    runtime.barrier()
    branch = pretrain(_config(tmp, "branch", K + D, D), resume=True)
    if rank == 0:
        with open(os.path.join(tmp, "losses.json"), "w") as f:
            json.dump({"reference": reference.losses, "stable": stable.losses, "branch": branch.losses,
                       "reference_val": reference.val_losses, "branch_val": branch.val_losses}, f)


def test_a_decay_branched_from_a_stable_checkpoint_equals_that_decay_from_the_start(tmp_path):
    run_deepspeed_ranks(_worker, 2, str(tmp_path))
    runs = json.loads((tmp_path / "losses.json").read_text())
    reference, stable, branch = ({int(k): v for k, v in runs[name].items()}
                                 for name in ("reference", "stable", "branch"))
    assert sorted(stable) == list(range(1, K + 1)) and sorted(branch) == list(range(K + 1, K + D + 1))
    # The stable phase is the same LR in both configs, so the same losses up to the branch point.
    for step in range(1, K + 1):
        assert stable[step] == reference[step], f"stable step {step}: {stable[step]} != {reference[step]}"
    for step in range(K + 1, K + D + 1):
        assert branch[step] == reference[step], f"branched step {step}: {branch[step]} != {reference[step]}"
    assert runs["branch_val"][str(K + D)] == runs["reference_val"][str(K + D)]
    # The decay did happen in the branch: its LRs fall below the stable LR after step K.
    cfg = _config(str(tmp_path), "x", K + D, D).train
    assert lr_at(K - 1, cfg) == cfg.lr and lr_at(K + 1, cfg) < cfg.lr
