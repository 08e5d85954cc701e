"""glibc keeps freed memory when asked (no page faults for a reallocated large tensor), and the
trainer asks on CPU unless the config says not to."""

import subprocess
import sys
import textwrap

import pytest

from moe_dist.common.config import ConfigError
from moe_dist.common import malloc as cpu_malloc
from moe_dist.common import process
from moe_dist.train.config import CpuSection

# Page faults of allocating and filling a 64 MiB tensor, once the heap has settled: glibc's best
# fit lets small allocations land in a freed large block, so the first few steps may still grow
# the heap; the number of steps that takes is not the point, its ending is.
_PROBE = textwrap.dedent("""
    import resource, sys, torch
    from moe_dist.common import malloc as cpu_malloc
    applied = cpu_malloc.keep_freed_memory() if sys.argv[1] == "keep" else None
    def faults_of_one_step():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(16 * 2**20)  # 64 MiB, freed at once
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    faults = [faults_of_one_step() for _ in range(30)]
    print(applied, sum(faults[-5:]))
""")


def _settled_faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(cpu_malloc._libc_mallopt() is None, reason="not glibc")
def test_kept_memory_is_not_faulted_in_again():
    _, default_faults = _settled_faults("default")
    applied, kept_faults = _settled_faults("keep")
    assert applied == "True"
    assert default_faults > 5 * 10_000, default_faults  # 64 MiB / 4 KiB pages = 16384 per step
    assert kept_faults < 1_000, kept_faults


@pytest.mark.parametrize("keep", [True, False])
def test_trainer_asks_glibc_on_cpu_unless_configured_off(monkeypatch, keep):
    calls = []
    monkeypatch.setattr(cpu_malloc, "keep_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(process.torch.cuda, "is_available", lambda: False)
    process.keep_freed_memory(CpuSection(keep_freed_memory=keep).keep_freed_memory)
    assert calls == ([1] if keep else [])
    monkeypatch.setattr(process.torch.cuda, "is_available", lambda: True)
    process.keep_freed_memory(True)  # GPUs have PyTorch's caching allocator
    assert calls == ([1] if keep else [])


def test_config_rejects_a_non_boolean():
    with pytest.raises(ConfigError, match="cpu.keep_freed_memory must be true or false, got 'yes'"):
        CpuSection(keep_freed_memory="yes")


def test_trainer_says_when_the_setting_could_not_be_applied(monkeypatch):
    monkeypatch.setattr(cpu_malloc, "keep_freed_memory", lambda: False)
    monkeypatch.setattr(process.torch.cuda, "is_available", lambda: False)
    assert "cpu.keep_freed_memory: not applied" in process.keep_freed_memory(True)
