"""Memory of a training step per rank: activation recomputation and the distributed optimizer.

(The benchmark itself is added with the distributed optimizer; this holds the measurement helper.)
"""

from __future__ import annotations

from collections.abc import Callable

from torch.profiler import ProfilerActivity, profile


def kept_bytes(fn: Callable[[], object]) -> int:
    """CPU bytes that `fn()` allocates and that are still allocated when it returns (its result
    and whatever the result's autograd graph saved), counted exactly by the profiler's allocator
    records, independent of how malloc returns memory to the system."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    kept = sum(event.self_cpu_memory_usage for event in prof.events())
    del result
    return kept
