"""Helpers for trainer tests: DeepSpeed ranks in spawned gloo processes, tiny run configs, the
real `deepspeed` launcher, and TensorBoard scalars read back with TensorBoard's own reader."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

from tests.harness import REPO
from tests.harness.dist import run_distributed


# The smallest model and run that still routes, accumulates and checkpoints; callers override.
TINY = {
    "model": dict(vocab_size=257, d_model=32, n_layers=2, n_heads=2, d_ff=48, max_seq_len=32,
                  moe_every=2, moe_offset=1, num_labels=4),
    "moe": dict(num_experts=4, ep_size=2, top_k=2, d_ff=16, capacity_factor=1.25),
    "data": dict(kind="synthetic", tokenizer={"kind": "byte"}, synthetic={"num_domains": 4}),
    "train": dict(deepspeed_config=os.path.join(REPO, "configs/deepspeed/zero1_cpu.json"), steps=8,
                  seq_len=32, micro_batch=2, grad_accum=2, lr=3e-3, warmup_steps=2, log_interval=1,
                  eval_interval=0, eval_iters=1),
    "cpu": dict(threads=1),
}


def tiny_config(**sections) -> dict:
    """TINY with `section={key: value}` merged in."""
    cfg = copy.deepcopy(TINY)
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


def _deepspeed_entry(rank: int, world: int, fn, args: tuple) -> None:
    # What the deepspeed launcher would export; DeepSpeed's engine insists on LOCAL_RANK.
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_SIZE=str(world))
    from moe_dist.parallel import runtime

    runtime.init_distributed()  # DeepSpeed's comm layer adopts the harness's gloo group
    fn(rank, world, *args)


def run_deepspeed_ranks(fn, world: int, *args) -> None:
    """`fn(rank, world, *args)` on `world` gloo processes set up as the deepspeed launcher would."""
    run_distributed(_deepspeed_entry, world, fn, args)


def write_yaml(path: str, cfg: dict) -> str:
    import yaml

    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path


def launch(args: list[str], timeout: int = 600, env: dict | None = None,
           cwd: str | None = None) -> subprocess.CompletedProcess:
    """Run the `deepspeed` launcher (from this virtualenv) in the repository root (or `cwd`)."""
    exe = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    return subprocess.run([exe, *args], cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def tensorboard_scalars(log_dir: str) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0, "histograms": 0, "images": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def tensorboard_tags(log_dir: str) -> dict[str, list[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0, "histograms": 0, "images": 0})
    acc.Reload()
    return acc.Tags()


def dump_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f)


def free_port() -> int:
    """A TCP port nobody listens on now: the launcher's default 29500 collides with other jobs."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_launch_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"


def logged_losses(stdout: str) -> list[float]:
    """Losses of the trainer's console lines `step i/N | loss x | ...`."""
    return [float(line.split("| loss ")[1].split()[0]) for line in stdout.splitlines()
            if line.startswith("step ") and "| loss " in line]
