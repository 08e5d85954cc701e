"""usable_cpus: the affinity mask capped by the cgroup's CPU quota (v2 cpu.max or v1 CFS files),
so ranks in a CPU-limited container do not each start one thread per CPU of the node."""

from __future__ import annotations

import os

import pytest

from moe_dist.common.cpus import cgroup_cpu_quota, usable_cpus

AFFINITY = len(os.sched_getaffinity(0))


def write(root, name: str, text: str) -> None:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.mark.parametrize("cpu_max,quota", [("150000 100000\n", 1.5), ("max 100000\n", None),
                                           ("garbage\n", None)])
def test_cgroup_v2_quota(tmp_path, cpu_max, quota):
    write(tmp_path, "cpu.max", cpu_max)
    assert cgroup_cpu_quota(str(tmp_path)) == quota


def test_cgroup_v1_quota_and_unlimited(tmp_path):
    write(tmp_path, "cpu/cpu.cfs_quota_us", "250000\n")
    write(tmp_path, "cpu/cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_quota(str(tmp_path)) == 2.5
    write(tmp_path, "cpu/cpu.cfs_quota_us", "-1\n")
    assert cgroup_cpu_quota(str(tmp_path)) is None
    assert cgroup_cpu_quota(str(tmp_path / "absent")) is None


def test_quota_caps_the_affinity_mask_and_rounds_up(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    write(tmp_path, "cpu.max", "150000 100000\n")  # 1.5 CPUs of a 64-CPU node
    assert usable_cpus(str(tmp_path)) == 2
    write(tmp_path, "cpu.max", "10000 100000\n")  # a tenth of one: still one thread
    assert usable_cpus(str(tmp_path)) == 1
    write(tmp_path, "cpu.max", "max 100000\n")
    assert usable_cpus(str(tmp_path)) == 64
    assert usable_cpus(str(tmp_path / "absent")) == 64


def test_this_machine():
    assert 1 <= usable_cpus() <= AFFINITY
