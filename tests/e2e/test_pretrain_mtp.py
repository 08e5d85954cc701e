"""Training with multi-token prediction and DeepSeek-V3's routing (group-limited sigmoid scores with
the aux-loss-free bias) through the real `deepspeed` launcher at EP=2: the MTP loss is in the step
log and in TensorBoard (`train/mtp_loss`), the MTP block's MoE statistics under its own layer
index, evaluation runs on the main model, and the checkpoint holds the MTP block's experts, every
one of them. `-m slow`: EP=2 on 2 processes and EP=1 on one (same global batch) agree on the
first step's LM and MTP losses."""

from __future__ import annotations

import math
import re

import pytest
import torch
from tests.harness.train import (assert_launch_ok, free_port, launch, logged_losses, tensorboard_scalars, tiny_config,
                                 write_yaml)

from moe_dist.checkpoint import open_checkpoint
from moe_dist.checkpoint.consolidated import full_state_dict

STEPS, GLOBAL_BATCH, N_LAYERS, E = 4, 4, 2, 4
MTP_LOSS = re.compile(r"^step \d+/\d+ \| .* \| mtp loss ([0-9.]+)")


def run_mtp(tmp_path, world: int):
    cfg = tiny_config(
        model=dict(n_layers=N_LAYERS, moe_every=1, moe_offset=1, mtp_layers=1, mtp_loss_weight=0.3),
        moe=dict(num_experts=E, ep_size=world, router={"type": "topk", "score": "sigmoid", "renormalize": True,
                                                       "bias_balancing": True, "expert_groups": 2,
                                                       "topk_groups": 1, "scale": 2.0}),
        train=dict(steps=STEPS, micro_batch=GLOBAL_BATCH // world, grad_accum=1, warmup_steps=0, eval_interval=2,
                   checkpoint_dir=str(tmp_path / f"ckpt{world}"), tensorboard_dir=str(tmp_path / f"tb{world}")))
    config = write_yaml(str(tmp_path / f"run{world}.yaml"), cfg)
    proc = launch(["--num_gpus", str(world), "--master_port", str(free_port()), "launch/pretrain.py",
                   "--config", config])
    assert_launch_ok(proc)
    mtp = [float(m.group(1)) for line in proc.stdout.splitlines() if (m := MTP_LOSS.match(line))]
    return proc, logged_losses(proc.stdout), mtp, cfg


def test_ep2_run_trains_with_mtp_and_logs_its_loss(tmp_path):
    proc, losses, mtp, cfg = run_mtp(tmp_path, 2)
    assert len(losses) == len(mtp) == STEPS, proc.stdout[-3000:]
    assert all(math.isfinite(v) for v in losses + mtp)
    assert len(set(mtp)) > 1  # the weights moved
    assert "validation loss" in proc.stdout

    scalars = tensorboard_scalars(cfg["train"]["tensorboard_dir"])
    assert [s for s, _ in scalars["train/mtp_loss"]] == list(range(1, STEPS + 1))
    for (_, logged), printed in zip(scalars["train/mtp_loss"], mtp):
        assert abs(logged - printed) <= 5e-5
    assert any(tag.startswith(f"moe/layer{N_LAYERS}/") for tag in scalars), sorted(scalars)

    state = full_state_dict(open_checkpoint(cfg["train"]["checkpoint_dir"]), progress=False)
    experts = state[f"blocks.{N_LAYERS}.moe.experts.w_in_EDI"]
    assert experts.shape[0] == E and torch.isfinite(experts).all()
    assert {f"blocks.{N_LAYERS}.{n}" for n in ("enorm.weight_D", "hnorm.weight_D", "eh_proj.weight",
                                               "head_norm.weight_D", "moe.router.selection_bias_E")} <= set(state)


@pytest.mark.slow
def test_ep2_and_one_process_agree_on_the_first_step(tmp_path):
    _, losses_2, mtp_2, _ = run_mtp(tmp_path, 2)
    _, losses_1, mtp_1, _ = run_mtp(tmp_path, 1)
    assert abs(losses_1[0] - losses_2[0]) <= 2e-4, (losses_1, losses_2)  # 4 printed decimals
    assert abs(mtp_1[0] - mtp_2[0]) <= 2e-4, (mtp_1, mtp_2)
