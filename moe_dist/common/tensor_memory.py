"""Peak memory held by tensors allocated during one call.

CPU torch has no `max_memory_allocated`; the profiler's allocation events are exact and do not
depend on the allocator or on timing. The benchmarks (tools/bench/step_memory.py), the memory
estimate's `--measure` (tools/estimate_memory.py) and the tests measure with this one function, so
their numbers compare.
"""

from __future__ import annotations

from typing import Callable


def peak_tensor_mb(step: Callable[[], None]) -> float:
    """Peak of the bytes held by tensors allocated during one `step()` (what max_memory_allocated
    minus the starting allocation is on a GPU): the running sum of the profiler's allocation
    (+) and free (-) events, in time order."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    held = peak = 0
    for e in events:
        held += e.nbytes()
        peak = max(peak, held)
    return peak / 2**20
