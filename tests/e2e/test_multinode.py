"""A simulated two-node launch on localhost: launch/multinode.sh started twice, once per "node",
as a scheduler would on each node (HOSTFILE, NODE_RANK, MASTER_ADDR); it runs the `deepspeed`
launcher with a two-host hostfile and `--no_ssh --node_rank K`. One process per node: world 2,
ep_size 2, so the expert all-to-all crosses the "node" boundary."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from tests.harness.train import REPO, free_port, logged_losses, tiny_config, write_yaml


@pytest.mark.slow
def test_two_node_launch_on_localhost(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")  # labels only under --no_ssh
    config = write_yaml(str(tmp_path / "run.yaml"),
                        tiny_config(train=dict(steps=6, log_interval=3, checkpoint_dir=str(tmp_path / "ckpt"))))
    env = dict(os.environ, HOSTFILE=str(hostfile), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])  # this venv's deepspeed
    env.pop("SLURM_JOB_NODELIST", None)
    nodes = [subprocess.Popen(["bash", "launch/multinode.sh", "--config", config], cwd=REPO,
                              env=dict(env, NODE_RANK=str(k)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
             for k in range(2)]
    outputs = []
    try:
        for node in nodes:
            outputs.append(node.communicate(timeout=600))
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    for k, (node, (out, err)) in enumerate(zip(nodes, outputs)):
        assert node.returncode == 0, f"node {k} exit {node.returncode}\n{out[-3000:]}\n{err[-3000:]}"
    stdout0 = outputs[0][0]
    assert "world 2, ep_size 2" in stdout0  # rank 0 (node 0) prints the console lines
    losses = logged_losses(stdout0)
    assert len(losses) == 2 and losses[-1] < losses[0]
    assert (tmp_path / "ckpt" / "latest").read_text() == "step_00000006"
