"""Latency measurement shared by the CLI report, the demo and the benchmarks."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Optional, Tuple


def measure(fn: Callable[[], object], repeat: int, warmup: int = 3,
            sync: Optional[Callable[[], None]] = None) -> Tuple[float, float]:
    """Median and p90 wall-clock latency of ``fn`` in milliseconds.

    Parameters
    ----------
    fn : callable
        The call to time.
    repeat : int
        Timed calls.
    warmup : int
        Untimed calls first.
    sync : callable, optional
        Called after each call before the clock stops (``torch.cuda.synchronize`` for GPUs).
    """
    for _ in range(warmup):
        fn()
    if sync is not None:
        sync()
    times = []
    for _ in range(max(1, repeat)):
        start = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return statistics.median(times), times[int(0.9 * (len(times) - 1))]
