"""Helpers of the fault-injection tests: the ENOSPC shim (tests/fault_inject/enospc.c) built on
demand, and the environment that makes launched processes see a full disk for chosen paths."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

SHIM_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fault_inject", "enospc.c")


def enospc_shim(tmp_dir: str) -> str:
    """Path of the compiled shim (skips the test where no C compiler exists)."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the ENOSPC shim")
    out = os.path.join(tmp_dir, "enospc.so")
    subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", out, SHIM_SOURCE, "-ldl"], check=True,
                   capture_output=True, text=True)
    return out


def full_disk_env(shim: str, *path_parts: str) -> dict[str, str]:
    """Environment under which writes to any path containing one of `path_parts` fail with ENOSPC."""
    return {"LD_PRELOAD": shim, "MOE_DIST_FAULT_ENOSPC": ":".join(path_parts)}
