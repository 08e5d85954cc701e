"""The pure arithmetic behind reading and writing ZeRO-1/2 partitions, against hand-computed
layouts: flat offsets with alignment padding, partition sizes and tails (`group_paddings`),
DeepSpeed's fragment addresses, expert-group chunking at another EP size, per-group scheduler
lists; pyproject's DeepSpeed pin equals the versions the reader accepts. (That it agrees with
what DeepSpeed itself writes is proven in tests/distributed/test_checkpoint_roundtrip.py by resharding to the same layout
and comparing every file bit for bit.)"""

from __future__ import annotations

import os
from collections import namedtuple

import pytest
import torch
from packaging.requirements import Requirement
from tests.harness.train import REPO

from moe_dist.checkpoint.training.reshard import _chunks, max_moe_group_size, plan_groups, remap_per_group
from moe_dist.checkpoint.training.zero import (DEEPSPEED_VERSIONS, FlatGroupLayout, ZeroGroup, param_alignment_for,
                                               parameter_alignment_paddings)

Address = namedtuple("Address", ["start", "numel"])


def layout(shapes, paddings, count) -> FlatGroupLayout:
    names = tuple(f"p{i}" for i in range(len(shapes)))
    return FlatGroupLayout(names=names, shapes=tuple(shapes), paddings=tuple(paddings), partition_count=count)


def test_parameter_alignment_paddings():
    assert parameter_alignment_paddings([3, 5, 2], 1) == [0, 0, 0]
    # fp32 with parameter_alignment: 16 bytes = 4 elements; no padding after the last parameter
    assert param_alignment_for(True, 4) == 4 and param_alignment_for(True, 2) == 8 and param_alignment_for(False, 2) == 1
    assert parameter_alignment_paddings([3, 5, 2], 4) == [1, 3, 0]


def test_flat_layout_offsets_partitions_and_tails():
    # p0: 3 (+1 pad), p1: 2x3 = 6 (+2 pad), p2: 2 -> data 14; alignment 2*3 = 6 -> flat 18, partitions of 6
    lay = layout([(3,), (2, 3), (2,)], [1, 2, 0], 3)
    assert lay.offsets == [0, 4, 12] and lay.data_numel == 14 and lay.flat_numel == 18 and lay.partition_size == 6
    assert [lay.group_padding(q) for q in range(3)] == [0, 0, 4]
    tensors = {"p0": torch.tensor([1., 2, 3]), "p1": torch.arange(6.).view(2, 3) + 10, "p2": torch.tensor([7., 8])}
    flat = lay.flatten(tensors)
    assert flat.tolist() == [1, 2, 3, 0, 10, 11, 12, 13, 14, 15, 0, 0, 7, 8, 0, 0, 0, 0]
    assert lay.partition(flat, 2, lean=True).tolist() == [7, 8]
    assert lay.partition(flat, 2, lean=False).tolist() == [7, 8, 0, 0, 0, 0]
    lean = torch.cat([lay.partition(flat, q, lean=True) for q in range(3)])
    back = lay.unflatten(lean)
    assert all(torch.equal(back[n], tensors[n]) for n in tensors)
    with pytest.raises(ValueError, match=r"hold 13 elements, the parameters \['p0', 'p1', 'p2'\] and their "
                                         r"paddings need 14"):
        lay.unflatten(lean[:-1])


def test_tail_longer_than_a_partition():
    # 3 elements over 4 partitions: alignment 8, partitions of 2; the last two are all tail
    lay = layout([(3,)], [0], 4)
    assert (lay.flat_numel, lay.partition_size) == (8, 2)
    assert [lay.group_padding(q) for q in range(4)] == [0, 1, 2, 2]


def test_slice_mappings_are_deepspeeds_fragment_addresses():
    lay = layout([(3,), (2, 3), (2,)], [1, 2, 0], 3)
    assert dict(lay.slice_mappings(0, Address)) == {"p0": Address(0, 3), "p1": Address(4, 2)}
    assert dict(lay.slice_mappings(1, Address)) == {"p1": Address(0, 4)}
    assert dict(lay.slice_mappings(2, Address)) == {"p2": Address(0, 2)}


def _group(name: str, names: list[str], moe: bool, wd: float = 0.1) -> ZeroGroup:
    hyper = {"name": name, "weight_decay": wd, "lr": 1.0, **({"moe": True} if moe else {})}
    return ZeroGroup(hyper=hyper, names=names, scalars={}, paddings=[0] * len(names))


def test_deepspeed_greedy_chunking():
    sizes = {"a": 4, "b": 4, "c": 3, "big": 20}
    assert _chunks(["a", "b", "c"], sizes.get, 8) == [["a", "b"], ["c"]]
    assert _chunks(["big", "a"], sizes.get, 8) == [["big"], ["a"]]  # DeepSpeed's empty first chunk dropped
    assert max_moe_group_size() == 178956971


def test_expert_groups_are_rechunked_for_the_new_local_sizes():
    groups = [_group("decay", ["d"], False), _group("no_decay", ["n"], False, 0.0),
              _group("ep_size_1", ["x", "y"], True), _group("ep_size_1", ["z"], True)]
    # at ep_size 1 each expert tensor holds 6 elements (chunks of <= 12); at ep_size 2, 3
    plan = plan_groups(groups, {"d": 5, "n": 1, "x": 3, "y": 3, "z": 3}.get, 2, max_group_size=12)
    assert [(g.hyper["name"], g.names, g.source, g.is_moe) for g in plan] == [
        ("decay", ["d"], 0, False), ("no_decay", ["n"], 1, False), ("ep_size_2", ["x", "y", "z"], 2, True)]
    assert plan[2].hyper["weight_decay"] == 0.1 and groups[2].hyper["name"] == "ep_size_1"


def test_scheduler_lists_follow_the_groups():
    state = {"base_lrs": [1.0, 2.0, 3.0, 3.0], "last_epoch": 7, "lr_lambdas": [None] * 4, "_last_lr": [1, 2, 3, 3]}
    assert remap_per_group(state, 4, [0, 1, 2]) == {"base_lrs": [1.0, 2.0, 3.0], "last_epoch": 7,
                                                     "lr_lambdas": [None] * 3, "_last_lr": [1, 2, 3]}


def test_pyproject_pins_deepspeed_to_the_versions_the_reader_accepts():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        dependencies = tomllib.load(f)["project"]["dependencies"]
    (pin,) = [d for d in dependencies if Requirement(d).name == "deepspeed"]
    specifier = Requirement(pin).specifier
    candidates = [f"0.19.{i}" for i in range(10)] + ["0.20.0"]
    assert [v for v in candidates if v in specifier] == list(DEEPSPEED_VERSIONS)
