"""The trainer drops each micro batch's output (its [B, S, V] logits above all) before the next
forward, in training and in evaluation, so the memory plan need not hold two micro batches' logits
(moe_dist/train/memory_plan.py). One gloo rank, the real trainer, grad_accum 3."""

from __future__ import annotations

import json
import weakref

from tests.harness.train import run_deepspeed_ranks, tiny_config


def _worker(rank: int, world: int, out: str) -> None:
    from moe_dist.train.config import parse_run_config
    from moe_dist.train.preflight import preflight
    from moe_dist.train.trainer import Trainer

    cfg = parse_run_config(tiny_config(moe=dict(ep_size=1), train=dict(steps=2, grad_accum=3, eval_iters=3)))
    trainer = Trainer(cfg, preflight(cfg, world, cfg.train.deepspeed_config))
    previous: list[weakref.ref] = []
    alive_at_forward: list[bool] = []
    forward = trainer.forward

    def watched(batch, *args):
        alive_at_forward.append(bool(previous) and previous[-1]() is not None)
        result = forward(batch, *args)
        previous.append(weakref.ref(result.logits_BSV))
        return result

    trainer.forward = watched
    try:
        trainer.run()  # two steps of three micro batches, then the final evaluation
    finally:
        trainer.safety.close()
    with open(out, "w") as f:
        json.dump(alive_at_forward, f)


def test_no_micro_batch_output_is_alive_at_the_next_forward(tmp_path):
    out = str(tmp_path / "alive.json")
    run_deepspeed_ranks(_worker, 1, out)
    with open(out) as f:
        alive = json.load(f)
    assert len(alive) >= 6 + 1, alive  # the training micro batches and at least one evaluation batch
    assert not any(alive), alive
