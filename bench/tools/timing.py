"""Wall-clock timing shared by the GPU probes."""

import time

import torch


def wall_s(fn, calls: int) -> float:
    """Median wall seconds of `calls` calls of fn, each between two device synchronisations
    (a CPU half of a split model is synchronous anyway), after one warm-up call."""
    fn()
    times = []
    for _ in range(calls):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]
