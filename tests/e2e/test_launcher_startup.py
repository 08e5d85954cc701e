"""A run under the `deepspeed` launcher on CPU starts without DeepSpeed's shared-memory all-reduce
(moe_dist.parallel.runtime.skip_shared_memory_allreduce): no C++ build on a fresh machine, so no
lock file that a killed build leaves for every later start to wait on, and nothing left in
/dev/shm afterwards (DeepSpeed maps 66 MiB per rank there and never unlinks it)."""

from __future__ import annotations

import os

import yaml
from tests.harness.train import REPO, assert_launch_ok, free_port, launch, write_yaml

SHM = "/dev/shm"


def test_a_cpu_run_builds_no_shared_memory_op_and_leaves_no_segment(tmp_path):
    with open(os.path.join(REPO, "configs/tiny_cpu.yaml")) as f:
        cfg = yaml.safe_load(f)
    cfg["train"].update(steps=1, warmup_steps=1, eval_interval=0, checkpoint_dir=None, tensorboard_dir=None,
                        run_dir=None)
    cfg["cpu"] = {"threads": 1}
    config = write_yaml(str(tmp_path / "run.yaml"), cfg)
    port = free_port()
    extensions = tmp_path / "torch_extensions"  # empty: a DeepSpeed op build would start here
    proc = launch(["--num_gpus", "2", "--master_port", str(port), "launch/pretrain.py", "--config", config],
                  env={"TORCH_EXTENSIONS_DIR": str(extensions)})
    assert_launch_ok(proc)
    output = proc.stdout + proc.stderr
    assert "deepspeed_shm_comm" not in output, output[-3000:]
    assert not extensions.exists() or not any(extensions.iterdir()), sorted(extensions.rglob("*"))
    if os.path.isdir(SHM):
        left = [name for name in os.listdir(SHM) if name.startswith(f"deepspeed_allreduce_buffer_{os.getuid()}_")
                and f"_{port}_" in name]
        assert not left, left
