"""tools/bench/step_memory.py measures a step in a fresh child process, and a child that dies is an
error naming the step, not a wait for ever (multiprocessing.Pool.apply never returns then)."""

from __future__ import annotations

import os

import pytest
import torch

from tools.bench import step_memory


def allocating_step(mib: int):
    def step() -> None:
        x = torch.ones(mib * 2**18)  # mib MiB of fp32
        (x * 2).sum()

    return step


def dying_step(code: int):
    os._exit(code)  # as a kernel crash or the OOM killer ends a process: no exception to return


@pytest.mark.timeout(120)
def test_a_step_is_measured_in_a_child():
    tensor_mb, rss_mb = step_memory.measure_peak_mb(allocating_step, (4,))
    assert 8.0 <= tensor_mb <= 8.5  # x and x * 2 held at once
    assert rss_mb is None or rss_mb >= 0


@pytest.mark.timeout(120)
def test_a_child_that_dies_is_an_error_naming_the_step():
    with pytest.raises(RuntimeError, match=r"child process died running dying_step\(3,\)"):
        step_memory.measure_peak_mb(dying_step, (3,))
