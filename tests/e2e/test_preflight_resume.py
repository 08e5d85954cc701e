"""`--resume` and `train.init_from` are checked before any process group exists: the stored run
config against this run's (structure refused, ep_size with the reshard command, seeds / top_k /
capacity only with --allow_config_change), every checkpoint file whole, and no non-finite tensor
(init_from in preflight; a resumed checkpoint right after it is loaded, before the first step).
One real checkpoint (2 steps, 2 ranks, the `deepspeed` launcher) serves every case."""

from __future__ import annotations

import os
import re
import shutil

import pytest
import torch
from tests.harness.train import assert_launch_ok, free_port, launch, logged_losses, tiny_config, write_yaml

from moe_dist.checkpoint import save_consolidated
from moe_dist.checkpoint.training.layout import MODEL_STATES, read_latest
from moe_dist.checkpoint.training.tags import read_marker, write_marker
from moe_dist.common.config import ConfigError
from moe_dist.model.transformer import MoETransformer
from moe_dist.train.config import parse_run_config
from moe_dist.train.preflight import preflight

STEPS = 2


def run_cfg(ckpt: str, **sections) -> dict:
    cfg = tiny_config(train=dict(steps=STEPS, checkpoint_dir=ckpt))
    for name, values in sections.items():
        cfg[name].update(values)
    return cfg


def launch_run(cfg: dict, tmp, *extra: str):
    path = write_yaml(str(tmp / f"run_{free_port()}.yaml"), cfg)
    return launch(["--num_gpus", "2", "--master_port", str(free_port()), "launch/pretrain.py", "--config", path,
                   *extra], timeout=600)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume_ckpt")
    path = str(root / "ckpt")
    assert_launch_ok(launch_run(run_cfg(path), root))
    assert read_latest(path) == "step_00000002"
    return path


def copy_ckpt(ckpt: str, tmp) -> str:
    out = str(tmp / "ckpt")
    shutil.copytree(ckpt, out)
    return out


def resume_preflight(cfg: dict, allow: bool = False, world: int = 2):
    # Steps left to train: a resume with none is refused first (tests/unit/train/test_newcomer_preflight.py).
    cfg = {**cfg, "train": {**cfg["train"], "steps": max(cfg["train"]["steps"], STEPS + 1)}}
    return preflight(parse_run_config(cfg), world, cfg["train"]["deepspeed_config"], resume=True,
                     allow_config_change=allow)


def raises(*parts: str):
    return pytest.raises(ConfigError, match="(?s)" + ".*".join(re.escape(p) for p in parts))


def test_same_config_and_free_changes_pass(ckpt):
    assert resume_preflight(run_cfg(ckpt)).config_changes == []
    changed = run_cfg(ckpt, train=dict(steps=STEPS + 4, lr=1e-3, log_interval=2, tensorboard_dir="/tmp/x"),
                      cpu=dict(threads=2))
    assert resume_preflight(changed).config_changes == []
    # The same global batch split otherwise (as after a reshard to another world size).
    assert resume_preflight(run_cfg(ckpt, train=dict(micro_batch=1, grad_accum=4))).config_changes == []


@pytest.mark.parametrize("sections,difference", [
    (dict(model=dict(d_model=64)), "model.d_model: 32 -> 64"),
    (dict(moe=dict(num_experts=8)), "moe.num_experts: 4 -> 8"),
    (dict(model=dict(n_layers=4)), "model.n_layers: 2 -> 4"),
    (dict(moe=dict(router={"type": "inhibition"})), "moe.router.type: 'topk' -> 'inhibition'"),
])
def test_structural_change_is_refused(ckpt, sections, difference):
    with raises("--resume: the model in", "differs from this run's config in structure", difference):
        resume_preflight(run_cfg(ckpt, **sections), allow=True)


def test_ep_size_change_names_the_reshard_command(ckpt):
    with raises("written with moe.ep_size 2 and world size 2, this run has moe.ep_size 1 and world size 2",
                f"python tools/convert_checkpoint.py reshard {ckpt} {ckpt}_ep1_w2 --ep-size 1 --world-size 2",
                f"set train.checkpoint_dir to '{ckpt}_ep1_w2'"):
        resume_preflight(run_cfg(ckpt, moe=dict(ep_size=1)), allow=True)


@pytest.mark.parametrize("sections,difference", [
    (dict(train=dict(seed=99)), "train.seed: 1234 -> 99"),
    (dict(data=dict(seed=5)), "data.seed: 1234 -> 5"),
    # K = 1's default renormalize is false (docs/routers/topk.md): the resolved value changes too.
    (dict(moe=dict(top_k=1)), ["moe.router.renormalize: True -> False", "moe.top_k: 2 -> 1"]),
    (dict(moe=dict(capacity_factor=2.0)), "moe.capacity_factor: 1.25 -> 2.0"),
    (dict(train=dict(grad_accum=4)),
     "global batch (train.micro_batch x train.grad_accum x world size): 8 -> 2 x 4 x 2 = 16"),
])
def test_order_or_routing_change_needs_the_flag(ckpt, sections, difference):
    cfg = run_cfg(ckpt, **sections)
    differences = difference if isinstance(difference, list) else [difference]
    with raises("settings that change the data order, routing or model math differ", *differences,
                "pass --allow_config_change"):
        resume_preflight(cfg)
    assert resume_preflight(cfg, allow=True).config_changes == differences


def test_truncated_zero_file_is_named(ckpt, tmp_path):
    copy = copy_ckpt(ckpt, tmp_path)
    zero = os.path.join(copy, "step_00000002", "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    size = os.path.getsize(zero)
    with open(zero, "r+b") as f:
        f.truncate(size - 100)
    # The tag's completion marker records every file's size: the run-directory check names it first.
    with raises(f"{zero}: {size - 100} bytes, moe_dist_complete.json recorded {size}"):
        resume_preflight(run_cfg(copy))
    os.remove(zero)
    with raises(f"{zero}: missing (listed in moe_dist_complete.json)"):
        resume_preflight(run_cfg(copy))


def test_nan_in_init_from_is_refused_naming_the_tensor(tmp_path):
    cfg = tiny_config(moe=dict(ep_size=1), train=dict(init_from=str(tmp_path / "init")))
    model = MoETransformer(parse_run_config(cfg).model, seed=1)
    name = next(n for n, p in model.named_parameters() if "experts" in n)
    with torch.no_grad():
        dict(model.named_parameters())[name].view(-1)[3] = float("inf")
    save_consolidated(model, str(tmp_path / "init"))
    with raises("train.init_from:", "holds non-finite tensors:", f"{name} (1 of"):
        preflight(parse_run_config(cfg), 2, cfg["train"]["deepspeed_config"])
    with torch.no_grad():
        dict(model.named_parameters())[name].view(-1)[3] = 0.0
    save_consolidated(model, str(tmp_path / "init"), overwrite=True)
    preflight(parse_run_config(cfg), 2, cfg["train"]["deepspeed_config"])


@pytest.mark.slow
def test_resume_through_the_launcher_refuses_nan_and_accepts_a_flagged_seed_change(ckpt, tmp_path):
    copy = copy_ckpt(ckpt, tmp_path)
    # A changed seed proceeds with the flag and logs what differs.
    proc = launch_run(run_cfg(copy, train=dict(steps=STEPS + 1, seed=99)), tmp_path, "--resume",
                      "--allow_config_change")
    assert_launch_ok(proc)
    assert "--allow_config_change: train.seed: 1234 -> 99" in proc.stdout
    assert len(logged_losses(proc.stdout)) == 1
    # A NaN in the resumed module weights: exit 2 naming the tensor, before any step.
    main_path = os.path.join(copy, read_latest(copy), MODEL_STATES)
    state = torch.load(main_path, map_location="cpu", weights_only=False)
    state["module"]["model.embed.weight"][5, 3] = float("nan")
    torch.save(state, main_path)
    # The rewrite may change the file's size by the zip's alignment (pickle memo indices); the tag
    # is committed again so that only the NaN check can refuse it.
    marker = read_marker(os.path.dirname(main_path))
    write_marker(os.path.dirname(main_path), marker["run_id"], marker["step"])
    proc = launch_run(run_cfg(copy, train=dict(steps=STEPS + 2, seed=99)), tmp_path, "--resume")
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "holds non-finite tensors (rank 0: embed.weight" in proc.stdout + proc.stderr
    assert not logged_losses(proc.stdout)
