"""Every collective of a training run, its evaluations and its --resume goes through the seam that
puts tensors on the device the group's backend serves (moe_dist/parallel/collectives.py), on 2 gloo
ranks with tests/harness/collective_guard.py installed: no moe_dist module calls torch.distributed
itself, every tensor the seam hands over is on a device its group registered, and the guard saw the
paths that died under NCCL go through the seam: the trainer's log-interval reduction, its
evaluation, the resume's finite check and tools/evaluate.py's runner. On the code before the seam
each of these was a bypass (runtime.all_reduce_mean / all_reduce_max reduced a CPU tensor where it
lay, which NCCL refuses), and the test names them."""

from __future__ import annotations

import json
import os

from tests.harness.collective_guard import CollectiveGuard, report
from tests.harness.train import run_deepspeed_ranks, tiny_config


def _worker(rank: int, world: int, tmp: str) -> None:
    import torch

    from moe_dist.evaluate import runner
    from moe_dist.evaluate.sources import Window
    from moe_dist.model.transformer import MoETransformer
    from moe_dist.parallel.groups import ParallelGroups
    from moe_dist.train.config import parse_run_config
    from moe_dist.train.trainer import pretrain

    guard = CollectiveGuard().install()
    try:
        cfg = parse_run_config(tiny_config(train=dict(steps=2, log_interval=1, eval_interval=2,
                                                      checkpoint_dir=os.path.join(tmp, "ckpt"))))
        pretrain(cfg, stop_at_step=1)
        pretrain(cfg, resume=True)  # the finite check of the loaded tensors, then step 2 and its evaluation
        moe = cfg.model.moe
        model = MoETransformer(cfg.model, groups=ParallelGroups.from_deepspeed(moe.ep_size, moe.num_experts))
        g = torch.Generator().manual_seed(0)
        windows = [Window(tokens=torch.randint(0, 256, (9,), generator=g), domain_ids=torch.full((9,), i % 2))
                   for i in range(5)]
        runner.evaluate(model, windows, ["a", "b"], batch=2, groups=model.blocks[1].moe.groups, progress=False)
    finally:
        guard.uninstall()
        guard.dump(os.path.join(tmp, f"guard_{rank}.json"))


def test_every_collective_goes_through_the_seam_on_the_groups_device(tmp_path):
    try:
        run_deepspeed_ranks(_worker, 2, str(tmp_path))
    finally:
        seen = report(str(tmp_path / "guard_{rank}.json"), 2)
    assert not seen["bypasses"], "collectives issued around the seam:\n" + "\n".join(sorted(set(seen["bypasses"])))
    assert not seen["misplaced"], "\n".join(seen["misplaced"])
    sites = "\n".join(seen["sites"])
    for path in ("moe_dist/train/trainer.py:", "(Trainer.log_interval)", "(Trainer.evaluate)",
                 "moe_dist/checkpoint/training/finite.py:", "(check_resumed_finite)",
                 "moe_dist/evaluate/runner.py:", "(evaluate)", "(RunSafety.end_step)"):
        assert path in sites, f"{path} never reached the seam; sites:\n{sites}"
    print(json.dumps(sorted(set(s.split(": ", 1)[1] for s in seen["sites"])), indent=1))
