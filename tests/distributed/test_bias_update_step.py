"""The aux-loss-free bias update and the global_batch scope's running counts, through the
trainer's own step loop (`Trainer.train_step`, DeepSpeed engine, two gloo ranks, two micro
batches per optimizer step; docs/training.md, "Balance-loss scopes").

- The bias moves once per optimizer step, by the load of the whole step: every micro batch of
  every data-parallel rank (the test fails if the update read one micro batch or one rank: the
  data make those loads differ from the step's).
- The running counts start empty at each optimizer step and go from one micro batch to the next.
"""

from __future__ import annotations

import json

import torch
from tests.harness.train import run_deepspeed_ranks, tiny_config

STEPS, ACCUM, RATE = 2, 2, 0.01


def _worker(rank: int, world: int, out: str) -> None:
    from moe_dist.train.config import parse_run_config
    from moe_dist.train.preflight import preflight
    from moe_dist.train.trainer import Trainer

    router = {"type": "topk", "bias_balancing": True, "bias_update_rate": RATE}
    cfg = parse_run_config(tiny_config(moe=dict(router=router, aux_loss=dict(switch_scope="global_batch")),
                                       train=dict(steps=STEPS, grad_accum=ACCUM, log_interval=STEPS)))
    trainer = Trainer(cfg, preflight(cfg, world, cfg.train.deepspeed_config))
    trainer.evaluate = lambda: None
    [(layer_index, moe)] = trainer.model.moe_layers()

    micro_loads: list[torch.Tensor] = []  # this rank's, per micro batch
    handed: list[bool] = []  # whether the micro batch was handed running counts
    updates: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (load, bias before, bias after)
    forward, after_step = trainer.forward, moe.router.after_step

    def recording_forward(batch, phase="train", micro=0, step_counts=None):
        handed.append(step_counts is not None and layer_index in step_counts)
        result = forward(batch, phase, micro, step_counts)
        micro_loads.append(result.moe_stats[layer_index]["tokens_per_expert"].detach().clone())
        return result

    def recording_after_step(load_E):
        before = moe.router.selection_bias_E.clone()
        after_step(load_E)
        updates.append((load_E.clone(), before, moe.router.selection_bias_E.clone()))

    trainer.forward = recording_forward
    moe.router.after_step = recording_after_step
    try:
        trainer.run()
    finally:
        trainer.safety.close()

    rows = []
    for step, (load, before, after) in enumerate(updates):
        mine = micro_loads[step * ACCUM:(step + 1) * ACCUM]
        rank_step = torch.stack(mine).sum(0).double()
        step_global = trainer.groups.all_reduce_sum_dp(rank_step.clone())
        last_global = trainer.groups.all_reduce_sum_dp(mine[-1].double().clone())
        expected_bias = before + RATE * torch.sign(step_global.mean() - step_global).to(before)
        rows.append({"load": load.tolist(), "step_global": step_global.tolist(), "rank_step": rank_step.tolist(),
                     "last_micro_batch_global": last_global.tolist(), "bias_after": after.tolist(),
                     "expected_bias": expected_bias.tolist()})
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"updates": rows, "handed": handed}, f)


def test_bias_update_reads_the_whole_step_of_every_rank_once_per_step(tmp_path):
    out = str(tmp_path / "bias.json")
    run_deepspeed_ranks(_worker, 2, out)
    with open(out) as f:
        result = json.load(f)
    updates = result["updates"]
    assert len(updates) == STEPS  # once per optimizer step, not per micro batch
    for row in updates:
        assert row["load"] == row["step_global"]
        # The data make the wrong loads differ, so the equality above can fail.
        assert row["step_global"] != row["rank_step"]
        assert row["step_global"] != row["last_micro_batch_global"]
        torch.testing.assert_close(torch.tensor(row["bias_after"]), torch.tensor(row["expected_bias"]))
    # Running counts: none at each step's first micro batch, the previous one's after it.
    assert result["handed"] == [False, True] * STEPS
