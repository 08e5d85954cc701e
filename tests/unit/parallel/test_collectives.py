"""The collective seam (moe_dist/parallel/collectives.py) on groups registered the way NCCL's are:
for one device type that is not the CPU. A gloo group registered as "cuda:gloo" has no CPU entry,
so a CPU tensor handed to it fails exactly as under NCCL; the seam resolves the device from the
group, refuses a misplaced tensor with the caller's line, and moves a reduction's tensor to the
group's device (shown on a "meta:gloo" group, a device type that exists on every machine)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from tests.harness.collective_guard import CollectiveGuard

from moe_dist.parallel import collectives, runtime


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    init = tmp_path_factory.mktemp("pg") / "rendezvous"
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=0, world_size=1)
    groups = {"cuda": dist.new_group([0], backend="cuda:gloo"), "meta": dist.new_group([0], backend="meta:gloo")}
    yield groups
    dist.destroy_process_group()


def test_the_device_comes_from_the_group(world, monkeypatch):
    assert "cpu" in collectives.served_device_types()  # gloo registers itself for CPU and CUDA
    assert collectives.collective_device() == torch.device("cpu")
    assert collectives.served_device_types(world["cuda"]) == ["cuda"]
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)  # the rank's GPU, as set at start-up
    assert collectives.collective_device(world["cuda"]) == torch.device("cuda", 3)
    assert collectives.collective_device(world["cuda"], prefer=torch.device("cpu")) == torch.device("cuda", 3)
    assert collectives.collective_device(world["meta"]) == torch.device("meta")


def test_a_cpu_tensor_on_a_group_without_a_cpu_entry_fails_as_under_nccl(world):
    # What today's trainer did with its CPU tensors: torch itself refuses.
    with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
        dist.all_reduce(torch.ones(2), group=world["cuda"])
    # The seam's own check names the caller, the device and what the group serves.
    with pytest.raises(ValueError, match=r"all_to_all_single from .*tests/unit/parallel/test_collectives.py:\d+ .*"
                                         r"cpu.*'cuda:gloo' serves only \['cuda'\]"):
        collectives.all_to_all_single(torch.empty(2), torch.ones(2), group=world["cuda"])
    with pytest.raises(ValueError, match="all_reduce_ from .*test_collectives.py"):
        collectives.all_reduce_(torch.ones(2), "sum", world["cuda"])


class Seen(Exception):
    pass


def test_a_reduction_runs_on_the_groups_device_not_where_the_tensor_lies(world, monkeypatch):
    seen = []

    def spy(t, op=None, group=None, async_op=False):
        seen.append(t.device)
        raise Seen  # a meta result cannot be copied back; where it was reduced is the point

    monkeypatch.setattr(dist, "all_reduce", spy)
    t = torch.ones(3)
    with pytest.raises(Seen):
        collectives.all_reduce(t, "sum", world["meta"])
    assert seen == [torch.device("meta")]
    assert torch.equal(t, torch.ones(3))  # the input is untouched


def test_reductions_return_on_the_callers_device(world):
    t = torch.tensor([1.0, 5.0])
    out = collectives.all_reduce(t, "max")
    assert out.device == t.device and torch.equal(out, t) and out is not t
    assert torch.equal(runtime.all_reduce_mean(t), t)
    table = runtime.all_gather_row(torch.tensor([2.0, 3.0]))
    assert table.dtype == torch.float64 and table.tolist() == [[2.0, 3.0]]
    with pytest.raises(ValueError, match="op 'mean' is not one of"):
        collectives.all_reduce(t, "mean")
    assert runtime.broadcast_object({"a": 1}) == {"a": 1}


def test_the_guard_records_a_collective_that_bypasses_the_seam(world, tmp_path):
    guard = CollectiveGuard().install()
    try:
        # A moe_dist module that calls torch.distributed itself (as runtime.py did before the seam).
        path = os.path.join(os.sep, "x", "moe_dist", "train", "rogue.py")
        code = compile("def reduce(t):\n    dist.all_reduce(t)\n    return t\n", path, "exec")
        namespace = {"dist": dist}
        exec(code, namespace)
        namespace["reduce"](torch.ones(1))
        collectives.all_reduce(torch.ones(1))
    finally:
        guard.uninstall()
    assert guard.bypasses == ["all_reduce at moe_dist/train/rogue.py:2 (reduce) for moe_dist/train/rogue.py:2 (reduce)"]
    assert len(guard.sites) == 1 and guard.sites[0].startswith("all_reduce for ")
    assert guard.misplaced == []


def test_the_guard_records_a_seam_call_on_a_device_its_group_did_not_register(world):
    guard = CollectiveGuard().install()
    try:
        # A seam that forgot to place the tensor: a CPU tensor for a group registered for CUDA only.
        path = os.path.join(os.sep, "x", "moe_dist", "parallel", "collectives.py")
        namespace = {"dist": dist}
        exec(compile("def reduce(t, group):\n    dist.all_reduce(t, group=group)\n", path, "exec"), namespace)
        with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
            namespace["reduce"](torch.ones(1), world["cuda"])
    finally:
        guard.uninstall()
    assert guard.bypasses == []
    assert len(guard.misplaced) == 1 and "tensor on cpu, group serves ['cuda']" in guard.misplaced[0]
