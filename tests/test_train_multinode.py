"""A simulated two-node launch on localhost: the `deepspeed` launcher started twice, once per
"node", with a two-host hostfile, `--no_ssh --node_rank K` and an explicit `--master_addr` (the
way docs/launch.md and launch/multinode.sh start nodes without pdsh). One process per node:
world 2, ep_size 2, so the expert all-to-all crosses the "node" boundary."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from train_harness import REPO, free_port, logged_losses, tiny_config, write_yaml


@pytest.mark.slow
def test_two_node_launch_on_localhost(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")  # labels only under --no_ssh
    config = write_yaml(str(tmp_path / "run.yaml"),
                        tiny_config(train=dict(steps=6, log_interval=3, checkpoint_dir=str(tmp_path / "ckpt"))))
    port = str(free_port())
    exe = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    nodes = [subprocess.Popen([exe, "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(k),
                               "--master_addr", "127.0.0.1", "--master_port", port,
                               "launch/pretrain.py", "--config", config],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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
