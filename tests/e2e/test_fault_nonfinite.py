"""The non-finite policy: flagged steps are skipped, named and counted, N in a row stop the run
with exit 3, and no committed checkpoint ever holds a non-finite weight."""

from __future__ import annotations

import glob
import math
import os
import re
from types import SimpleNamespace

import pytest
import torch
from tests.harness.train import free_port, launch, tensorboard_scalars, tiny_config, write_yaml

from moe_dist.checkpoint.training.layout import read_latest
from moe_dist.train.safety.exits import NONFINITE, RunStopped
from moe_dist.train.safety.nonfinite import GRAD, LM, NonFiniteWatch, refuse_nonfinite_save


def output(lm: float, aux: float = 0.0, layer_losses: dict | None = None):
    return SimpleNamespace(lm_loss=torch.tensor(lm), aux_loss=torch.tensor(aux),
                           moe_stats={layer: {"loss_switch": torch.tensor(v), "load_cv": torch.tensor(0.0)}
                                      for layer, v in (layer_losses or {}).items()})


def test_flags_name_the_rank_the_value_and_the_moe_layer():
    watch = NonFiniteWatch([1, 3], max_consecutive=3)
    watch.observe(output(2.0, layer_losses={1: 0.1, 3: float("nan")}))
    mask = watch.take_mask(grad_norm=float("inf"), step_applied=False)
    assert watch.describe(mask) == ["gradient norm", "aux loss of MoE layer 3"]
    assert watch.take_mask(grad_norm=1.0, step_applied=True) == 0  # reset after each step
    watch.observe(output(float("nan")))
    assert watch.take_mask(grad_norm=None, step_applied=True) == LM
    message = watch.after_step(7, [GRAD, GRAD | LM], step_applied=False)
    assert message.startswith("step 7: skipped the optimizer step")
    assert "rank 1: LM loss, gradient norm" in message and "rank 0: gradient norm" in message
    assert watch.after_step(8, [0, 0], step_applied=True) is None and watch.consecutive == 0
    assert watch.skipped == 1


def test_consecutive_skips_stop_and_an_applied_flagged_step_stops_at_once():
    watch = NonFiniteWatch([], max_consecutive=2)
    watch.after_step(1, [GRAD], step_applied=False)
    with pytest.raises(RunStopped, match="max_consecutive_skips is 2") as stop:
        watch.after_step(2, [GRAD], step_applied=False)
    assert stop.value.code == NONFINITE
    with pytest.raises(RunStopped, match="the optimizer applied the step"):
        NonFiniteWatch([], 5).after_step(3, [LM], step_applied=True)


def test_a_nonfinite_weight_refuses_the_save_naming_it():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    refuse_nonfinite_save(model, 5)  # finite: nothing happens
    with torch.no_grad():
        model[1].weight[0, 1] = float("inf")
    with pytest.raises(RunStopped, match=r"step 5: not saving .* 1\.weight") as stop:
        refuse_nonfinite_save(model, 5)
    assert stop.value.code == NONFINITE


def committed_tensors(tag_dir: str):
    for path in sorted(glob.glob(os.path.join(tag_dir, "*.pt"))):
        state = torch.load(path, map_location="cpu", weights_only=False)
        stack = [(path, state)]
        while stack:
            where, value = stack.pop()
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                yield where, value
            elif isinstance(value, dict):
                stack.extend((f"{where}:{k}", v) for k, v in value.items())
            elif isinstance(value, (list, tuple)):
                stack.extend((f"{where}[{i}]", v) for i, v in enumerate(value))


@pytest.mark.slow
def test_a_huge_lr_skips_counts_and_stops_with_only_finite_checkpoints(tmp_path):
    ckpt, tb = tmp_path / "ckpt", tmp_path / "tb"
    cfg = tiny_config(train=dict(steps=40, lr=1000.0, warmup_steps=0, log_interval=1, checkpoint_interval=1,
                                 max_consecutive_skips=3, checkpoint_dir=str(ckpt), tensorboard_dir=str(tb)))
    proc = launch(["--num_gpus", "2", "--master_port", str(free_port()), "launch/pretrain.py",
                   "--config", write_yaml(str(tmp_path / "run.yaml"), cfg)])
    out = proc.stdout + proc.stderr
    assert proc.returncode == NONFINITE, out[-5000:]
    assert "skipped the optimizer step, not finite: rank 0: gradient norm" in out, out[-5000:]
    assert "max_consecutive_skips is 3" in out
    assert "| skipped 2" in out  # the log line counts them
    scalars = tensorboard_scalars(str(tb))
    assert max(v for _, v in scalars["train/skipped_steps"]) >= 2
    for tag in ("train/step_time_min", "train/step_time_max", "train/step_time_slowest_rank"):
        assert tag in scalars, f"missing {tag}: {sorted(scalars)}"
    assert all(v in (0.0, 1.0) for _, v in scalars["train/step_time_slowest_rank"])
    print(next(line for line in out.splitlines() if "stopping: train.max_consecutive" in line))
    tags = sorted(os.path.basename(d) for d in glob.glob(str(ckpt / "step_*")))
    assert tags and read_latest(str(ckpt)) == tags[-1]
    checked = 0
    for tag in tags:
        for where, t in committed_tensors(str(ckpt / tag)):
            assert bool(torch.isfinite(t).all()), f"non-finite values in committed {where}"
            checked += 1
    assert checked > 0
    stopped = int(re.search(r"step (\d+): skipped the optimizer step[^\n]*stopping: train.max_consecutive", out)[1])
    assert int(tags[-1].split("_")[1]) < stopped, "a flagged step was committed"
    assert math.isfinite(float(out.split("| loss ")[1].split()[0]))


SKIP_AT = 2  # the optimizer step whose loss is made NaN on rank 1


def _skip_and_resume_worker(rank: int, world: int, tmp: str) -> None:
    import dataclasses
    import json

    from tests.harness.train import REPO

    from moe_dist.train.config import parse_run_config
    from moe_dist.train.preflight import preflight
    from moe_dist.train.trainer import Trainer

    original = Trainer.forward

    def forward(self, batch, *args):  # NaN loss on rank 1 for every micro batch of step SKIP_AT
        out = original(self, batch, *args)
        if self.rank == 1 and self.step + 1 == SKIP_AT and self.engine.training:
            nan = torch.tensor(float("nan"))
            out = dataclasses.replace(out, loss=out.loss * nan, lm_loss=out.lm_loss * nan)
        return out

    Trainer.forward = forward

    def run(name: str, **kw):
        cfg = parse_run_config(tiny_config(train=dict(
            deepspeed_config=os.path.join(REPO, "configs/deepspeed/zero1_cpu.json"), steps=6,
            checkpoint_dir=os.path.join(tmp, name))))
        trainer = Trainer(cfg, preflight(cfg, world, cfg.train.deepspeed_config, resume=kw.get("resume", False)))
        try:
            result = trainer.run(**kw)
        finally:
            trainer.safety.close()
        return trainer, result

    full, full_result = run("full")
    _, first = run("resumed", stop_at_step=3)
    second, second_result = run("resumed", resume=True)
    if rank == 0:
        with open(os.path.join(tmp, "out.json"), "w") as f:
            json.dump({"full": full_result.losses, "first": first.losses, "second": second_result.losses,
                       "full_sched": full.scheduler.last_epoch, "second_sched": second.scheduler.last_epoch,
                       "full_skipped": full.safety.skipped, "second_skipped": second.safety.skipped,
                       "full_lr": full.optimizer.param_groups[0]["lr"],
                       "second_lr": second.optimizer.param_groups[0]["lr"]}, f)


@pytest.mark.slow
def test_a_skipped_step_keeps_the_lr_schedule_and_resume_exact(tmp_path, capfd):
    import json

    from tests.harness.train import run_deepspeed_ranks

    run_deepspeed_ranks(_skip_and_resume_worker, 2, str(tmp_path))
    out = json.loads((tmp_path / "out.json").read_text())
    full = {int(k): v for k, v in out["full"].items()}
    second = {int(k): v for k, v in out["second"].items()}
    assert math.isnan(full[SKIP_AT]) and all(math.isfinite(v) for k, v in full.items() if k != SKIP_AT)
    assert out["full_skipped"] == out["second_skipped"] == 1  # the count survives the resume
    assert out["full_sched"] == out["second_sched"] == 6  # one scheduler step per step, skipped or not
    assert out["full_lr"] == out["second_lr"]
    for step in (4, 5, 6):
        assert second[step] == full[step], f"step {step} after resume: {second[step]} != {full[step]}"
    assert f"step {SKIP_AT}: skipped the optimizer step, not finite: rank 0: gradient norm; rank 1: LM loss, " \
           f"gradient norm" in capfd.readouterr().out
