"""The torch floor of pyproject.toml: the installed torch (and the CPU constraints pin) satisfy it,
and on it `torch._grouped_mm` takes experts with no tokens (offsets with a repeated value) in the
forward and the backward, the case early releases hung on (pyproject.toml says where)."""

from __future__ import annotations

import os

import pytest
import torch
from packaging.requirements import Requirement
from packaging.version import Version
from tests.harness import REPO


def _torch_requirement() -> Requirement:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        dependencies = tomllib.load(f)["project"]["dependencies"]
    (pin,) = [d for d in dependencies if Requirement(d).name == "torch"]
    return Requirement(pin)


def test_the_floor_is_the_first_release_with_empty_experts_and_the_installed_torch_meets_it():
    specifier = _torch_requirement().specifier
    assert "2.8.0" not in specifier and "2.9.0" in specifier
    installed = Version(torch.__version__).base_version  # "2.13.0+cpu" is 2.13.0
    assert installed in specifier, f"torch {torch.__version__} is installed; pyproject.toml asks for {specifier}"


def test_the_cpu_constraints_pin_meets_the_floor():
    specifier = _torch_requirement().specifier
    with open(os.path.join(REPO, "constraints-cpu.txt")) as f:
        pins = [Requirement(line.strip()) for line in f if line.strip() and not line.startswith("#")]
    (pin,) = [p for p in pins if p.name == "torch"]
    (version,) = [s.version for s in pin.specifier if s.operator == "=="]
    assert version in specifier, f"constraints-cpu.txt pins torch {version}; pyproject.toml asks for {specifier}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("counts", [[4, 0, 4, 0], [0, 8, 0, 0], [0, 0, 0, 8]], ids=["second_and_last", "all_but_second", "all_but_last"])
def test_grouped_mm_with_empty_experts_forward_and_backward(counts, dtype):
    g = torch.Generator().manual_seed(0)
    D, F = 16, 32  # 16-byte aligned rows, as torch._grouped_mm requires
    x = torch.randn(sum(counts), D, generator=g).to(dtype).requires_grad_()
    w = torch.randn(len(counts), D, F, generator=g).to(dtype).requires_grad_()
    offs = torch.cumsum(torch.tensor(counts), 0).to(torch.int32)  # a repeated value: an empty expert
    grad_out = torch.randn(sum(counts), F, generator=g).to(dtype)

    y = torch._grouped_mm(x, w, offs=offs)
    y.backward(grad_out)

    xr, wr = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    yr = torch.cat([xr[s:s + n] @ wr[e] for e, (s, n) in enumerate(zip([0, *offs[:-1].tolist()], counts))])
    yr.backward(grad_out.float())
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y.float(), yr, **tol)
    torch.testing.assert_close(x.grad.float(), xr.grad, **tol)
    torch.testing.assert_close(w.grad.float(), wr.grad, **tol)
    for e, n in enumerate(counts):
        if n == 0:
            assert torch.count_nonzero(w.grad[e]) == 0, f"expert {e} had no tokens but got a weight gradient"
