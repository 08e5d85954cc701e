"""What a CPU rank sets up before any work: its torch thread count and glibc's allocator (the
config's `cpu:` section). GPU ranks leave both alone: CUDA work needs no CPU thread pool sized to
the node, and PyTorch's caching allocator already keeps freed device memory.
"""

from __future__ import annotations

import torch

from moe_dist.common import malloc
from moe_dist.common.cpus import usable_cpus


def set_cpu_threads(requested: int | None, local_ranks: int) -> None:
    """Ranks sharing a node's cores must not each start one thread per core: oversubscription
    makes every rank wait on the slowest, and gloo collectives amplify it."""
    if torch.cuda.is_available():
        return
    torch.set_num_threads(requested or max(1, usable_cpus() // local_ranks))


def keep_freed_memory(wanted: bool) -> str | None:
    """CPU has no caching allocator; `malloc` says what glibc is asked to do instead. Returns a
    line for the log when the setting was wanted but could not be applied."""
    if not wanted or torch.cuda.is_available():
        return None
    if malloc.keep_freed_memory():
        return None
    return ("cpu.keep_freed_memory: not applied (the C library is not glibc, or it refused the setting); "
            "the allocator is left as it is")
