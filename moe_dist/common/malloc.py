"""On CPU, make glibc keep freed memory for reuse, as PyTorch's CUDA caching allocator does on GPUs.

Why: CPU PyTorch allocates every tensor with malloc. glibc serves blocks over 32 MiB with a fresh
mmap and unmaps them on free, so every large tensor of every step is page-faulted in again. For
an MoE layer the largest are the stacked expert weight gradients (512 MiB per projection at 256
experts of 512 x 1024), and faulting them in again is a large part of a many-expert step
(BENCHMARKS.md, `--cpu-malloc default`). The dense activations of a step pay the same toll at a
smaller scale.

With mmap off and heap trimming off, freed blocks stay in glibc's heap and the next step reuses
the same, already mapped pages. The price is that memory freed by the process is not returned to
the OS before it exits; the resident size settles at the peak of a step plus fragmentation. This
is what PyTorch's own CPU launcher gets by preloading jemalloc or tcmalloc, without needing those
libraries installed.
"""

from __future__ import annotations

import ctypes
import functools
import sys

# From glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


@functools.cache
def _libc_mallopt():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)  # the C library this process already runs on
        libc.gnu_get_libc_version  # glibc only: musl's mallopt is a no-op
        fn = libc.mallopt
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return fn


def keep_freed_memory() -> bool:
    """Serve every allocation from glibc's heap and never trim it. Process-wide and for the rest
    of the process; takes effect for allocations made after the call. False where it could not
    be applied: the C library is not glibc, or glibc refused a setting."""
    mallopt = _libc_mallopt()
    if mallopt is None:
        return False
    # mallopt returns 1 on success. -1 for the trim threshold means "never trim" (mallopt(3)).
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, -1))
