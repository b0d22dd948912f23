"""GPU benchmark fixtures: a measured copy ceiling and device-event timing with L2 flushed.

Run with `pytest bench/suites --benchmark-only --benchmark-json=...` on a CUDA machine; without
one every benchmark but test_cpu.py's (the CPU suite) is skipped with a message. Times are medians
of device-event timings after warm-up (triton.testing.do_bench, which clears the L2 cache before
each timed call). bench/tools is put on sys.path: the step suite builds its optimizers with
precision.py's helpers."""

import sys
from pathlib import Path

import pytest
import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent / "tools"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="bench/ measures GPU kernels: no CUDA device here")
    for item in items:
        if item.path.name != "test_cpu.py":  # the CPU suite runs anywhere
            item.add_marker(skip)


def device_median_ms(fn) -> float:
    """Median milliseconds of fn() on the GPU (L2 flushed before each call)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


@pytest.fixture(scope="session")
def copy_gbps() -> float:
    """Device-to-device copy bandwidth (bytes read + written per second / 1e9) on 1 GiB."""
    src = torch.empty(2**29, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = device_median_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / ms / 1e6


@pytest.fixture
def measure(benchmark, copy_gbps):
    """measure(fn, bytes_moved, **info): see record."""
    return lambda fn, bytes_moved, **info: record(benchmark, fn, bytes_moved, copy_gbps, **info)


def record(benchmark, fn, bytes_moved: int, copy_gbps: float, **info):
    """Time fn with pytest-benchmark (wall clock, synchronised) and with device events; store
    GB/s, % of the copy ceiling and the peak extra memory of one call in extra_info."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak_extra = torch.cuda.max_memory_allocated() - base
    ms = device_median_ms(fn)
    gbps = bytes_moved / ms / 1e6
    benchmark.extra_info.update(
        info,
        device_median_us=ms * 1e3,
        gbps=gbps,
        copy_gbps=copy_gbps,
        pct_of_copy=100 * gbps / copy_gbps,
        peak_extra_bytes=peak_extra,
        gpu=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
    )

    def synchronised():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(synchronised, rounds=10, iterations=3, warmup_rounds=1)
