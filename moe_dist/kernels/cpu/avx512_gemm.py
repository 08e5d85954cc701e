"""The experts' grouped fp32 GEMMs as AVX-512 kernels of our own (avx512_gemm.c), on CPUs that
have AVX-512 and a C compiler.

Operands: `x` [rows, in_width] grouped by expert (`counts[j]` rows from `starts[j]`; a count of
-1 skips the expert), outputs and gradients [rows, out_width], weights as `mkl_grouped` passes
them.

Why: MKL packs each expert's weight before computing with it, and with few rows per expert that
packing is a memory-bound phase nothing overlaps: the experts' GEMMs then cost what streaming E
weight matrices costs, on top of the arithmetic (tools/bench/expert_gemms.py measures both, its
numbers are in BENCHMARKS.md). The kernels here read each weight in place and prefetch the rows
ahead, and write weight gradients with streaming stores.

The source is compiled once per machine with the system's C compiler (`$CC`, else `cc`) into
`$MOE_DIST_CACHE_DIR` (default `~/.cache/moe_dist`), written under a temporary name and renamed,
so concurrent ranks never load a half-written library. It is used only after a numerical check
against `torch.mm`, and only where it is faster than MKL's batch GEMM on this machine (timed once
per machine and cached, `kernel_choice`; `MOE_DIST_AVX512_GEMM=0/1` forces MKL / the kernels).
Otherwise `available()` is False and `mkl_grouped` keeps MKL's batch GEMM.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from torch import Tensor

from moe_dist.common.atomic import staged_file
from moe_dist.common.config import ConfigError
from moe_dist.kernels.cpu import kernel_choice

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("avx512_gemm.c")
FLAGS = ("-O3", "-mavx512f", "-mfma", "-shared", "-fPIC", "-pthread")
KIND_NN, KIND_NT, KIND_OUTER = 0, 1, 2
PANEL = 64  # output columns per tile of nn and outer: their out_width must be a multiple
VECTOR = 16  # fp32 lanes: nt's in_width must be a multiple


def cache_dir() -> Path:
    return Path(os.environ.get("MOE_DIST_CACHE_DIR") or Path.home() / ".cache" / "moe_dist")


def _cpu_has_avx512() -> bool:
    return (sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64")
            and torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX"))


def _compiler(compiler: str | None = None) -> str:
    return compiler or os.environ.get("CC") or "cc"


def library_name(compiler: str | None = None) -> str:
    """The compiled library's file name: one per source, compiler and flags."""
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join((_compiler(compiler), *FLAGS)).encode()).hexdigest()[:16]
    return f"avx512_gemm-{key}.so"


def build(compiler: str | None = None) -> Path:
    """Compile the kernels (or find them already compiled) and return the library's path.
    Raises RuntimeError with the compiler's message when it fails."""
    cc = _compiler(compiler)
    if shutil.which(cc) is None:
        raise RuntimeError(f"no C compiler {cc!r} on PATH (set CC)")
    target = cache_dir() / library_name(cc)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Concurrent ranks may build at once: each compiles to a name of its own, and a rename only
    # ever publishes a complete library.
    with staged_file(str(target), fsync=False) as tmp:
        proc = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed on {SOURCE.name}: {proc.stderr.strip()[-2000:]}")
    return target


@functools.cache
def _library():
    """The loaded kernels, or None (with the reason logged once)."""
    if kernel_choice.forced() is False:
        return None
    if not _cpu_has_avx512():
        return None
    try:
        lib = ctypes.CDLL(str(build()))
    except (OSError, RuntimeError, ConfigError) as e:  # ConfigError: the cached name is a directory
        log.info("moe_dist AVX-512 expert GEMMs unavailable, using MKL: %s", e)
        return None
    fn = lib.grouped_gemm
    p, i32, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    fn.argtypes = [i32, i32, i32, p, p, i32, i32, p, p, p, i64, p]
    fn.restype = i32
    return fn


def _launch(fn, kind: int, counts: Tensor, starts: Tensor, in_width: int, out_width: int, x: Tensor,
            w: Tensor | None, grad: Tensor | None, w_stride: int, out: Tensor) -> None:
    counts, starts = counts.to(torch.int64).contiguous(), starts.to(torch.int64).contiguous()
    fn(kind, torch.get_num_threads(), counts.numel(), counts.data_ptr(), starts.data_ptr(), in_width,
       out_width, x.data_ptr(), 0 if w is None else w.data_ptr(), 0 if grad is None else grad.data_ptr(),
       w_stride, out.data_ptr())


def _run(kind: int, counts: Tensor, starts: Tensor, in_width: int, out_width: int, x: Tensor,
         w: Tensor | None, grad: Tensor | None, w_stride: int, out: Tensor) -> None:
    _launch(_library(), kind, counts, starts, in_width, out_width, x, w, grad, w_stride, out)


@functools.cache
def _self_check() -> bool:
    """Every kernel against torch.mm on odd sizes (row tails, an empty and a skipped expert)."""
    g = torch.Generator().manual_seed(0)
    counts = torch.tensor([7, 0, 13, -1, 1])
    rows = counts.clamp(min=0)
    starts = rows.cumsum(0) - rows
    n, in_width, out_width = int(rows.sum()), 32, 128
    x, dy = torch.randn(n, in_width, generator=g), torch.randn(n, out_width, generator=g)
    w_nn = torch.randn(5, in_width, out_width, generator=g)
    w_nt = torch.randn(5, out_width, in_width, generator=g)
    y_nn, y_nt = torch.zeros(n, out_width), torch.zeros(n, out_width)
    dw = torch.full((5, in_width, out_width), 7.0)
    size = in_width * out_width
    _run(KIND_NN, counts, starts, in_width, out_width, x, w_nn, None, size, y_nn)
    _run(KIND_NT, counts, starts, in_width, out_width, x, w_nt, None, size, y_nt)
    _run(KIND_OUTER, counts, starts, in_width, out_width, x, None, dy, size, dw)
    ok = True
    for j, (s, c) in enumerate(zip(starts.tolist(), counts.tolist())):
        if c < 0:
            ok &= bool((dw[j] == 7.0).all())  # skipped: untouched
            continue
        seg = slice(s, s + c)
        ok &= torch.allclose(y_nn[seg], x[seg] @ w_nn[j], atol=1e-4)
        ok &= torch.allclose(y_nt[seg], x[seg] @ w_nt[j].t(), atol=1e-4)
        ok &= torch.allclose(dw[j], x[seg].t() @ dy[seg], atol=1e-4)
    if not ok:
        log.warning("moe_dist AVX-512 expert GEMMs disagree with torch.mm; using MKL")
    return ok


def available(x: Tensor, w: Tensor, kind: int) -> bool:
    """Whether the kernel `kind` takes these operands: fp32 CPU tensors, out_width a multiple of 64
    (nn, outer) or in_width a multiple of 16 (nt), on a machine where the kernels built, passed
    the check and are chosen over MKL (`_chosen`). `w` is [experts, in_width, out_width] for nn
    and outer (for outer: the gradient buffer), [experts, out_width, in_width] for nt."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or w.dtype != torch.float32:
        return False
    out_width = w.shape[1] if kind == KIND_NT else w.shape[2]
    in_width = w.shape[2] if kind == KIND_NT else w.shape[1]
    if kind == KIND_NT and in_width % VECTOR or kind != KIND_NT and out_width % PANEL:
        return False
    return _library() is not None and _self_check() and _chosen()


def _chosen() -> bool:
    """Whether the kernels, not MKL's batch GEMM, take the small segments: forced by the
    environment, else the machine's measured choice."""
    force = kernel_choice.forced()
    return _measured(torch.get_num_threads()) if force is None else force


@functools.cache
def _measured(threads: int) -> bool:
    """The trial's decision for this machine and thread count (cached on disk, logged once)."""
    key = kernel_choice.machine_key(library_name(), threads)
    fn = _library()
    record = kernel_choice.decide(cache_dir(), key, lambda: kernel_choice.time_both(
        functools.partial(_launch, fn), threads))
    how = "cached" if record["cached"] else "measured" if record["settled"] else "unsettled, not cached"
    log.info("moe_dist CPU expert GEMMs: %s (trial %s: AVX-512 kernels %.1f ms, MKL batch GEMM %.1f ms; "
             "%s, %d threads; set MOE_DIST_AVX512_GEMM=0/1 to force)",
             "AVX-512 kernels" if record["use_avx512"] else "MKL's batch GEMM", how, 1e3 * record["avx512_s"],
             1e3 * record["mkl_s"], key["cpu"] or "unknown CPU", threads)
    return record["use_avx512"]


def segment_mm(x: Tensor, w_stack: Tensor, counts: Tensor, starts: Tensor, transpose_w: bool,
               out: Tensor) -> None:
    """out[segment j] = x[segment j] @ w_stack[j] (@ w_stack[j].T with w_stack stored
    [experts, out_width, in_width] when `transpose_w`) for every expert whose count is not -1.
    Operands as `mkl_grouped.segment_mm` passes them: contiguous rows, each expert's matrix dense."""
    _run(KIND_NT if transpose_w else KIND_NN, counts, starts, x.shape[1], out.shape[1], x, w_stack,
         None, w_stack.stride(0), out)


def segment_outer(x: Tensor, grad: Tensor, counts: Tensor, starts: Tensor, out: Tensor) -> None:
    """out[j] = x[segment j].T @ grad[segment j] (zero for no rows) for every expert whose count
    is not -1."""
    _run(KIND_OUTER, counts, starts, x.shape[1], grad.shape[1], x, None, grad, out.stride(0), out)
