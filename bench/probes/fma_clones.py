"""The two clones of csrc/zofast_cpu.cpp's fma_row (the lowrank_apply_ inner loop) timed directly.

fma_row is compiled with target_clones("fma", "default"); the loader picks the "fma" clone on CPUs
with FMA units. Neither csrc nor the build is changed here: this script finds both clones in the
installed zofast._C (local symbols, via nm), calls each through a function pointer from a tiny C
timing loop (compiled into a temporary folder with cc), checks that they give bit-identical rows,
and prints the median ns per element of each and their ratio. One thread, rows hot in L1/L2
(as in lowrank_apply_, where acc is one row and each v row is reused for every row of w).

Usage: python bench/probes/fma_clones.py   (needs nm and a C compiler; its output is
bench/results/cpu-2026-11-22/fma_clones.txt)
"""

import ctypes
import statistics
import subprocess
import tempfile
from pathlib import Path

import torch

import zofast._C

HARNESS = r"""
#include <time.h>
typedef void (*row_fn)(float*, float, const float*, long);
double run(void* f, float* acc, float a, const float* b, long n, long reps) {
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  for (long r = 0; r < reps; ++r) ((row_fn)f)(acc, a, b, n);
  clock_gettime(CLOCK_MONOTONIC, &t1);
  return (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
}
"""


def clone_addresses(lib: str) -> dict:
    """Run-time addresses of fma_row.fma and fma_row.default in the loaded library."""
    symbols = subprocess.run(["nm", lib], capture_output=True, text=True, check=True).stdout
    offsets = {}
    for line in symbols.splitlines():
        value, _, name = line.split()[-3:] if len(line.split()) == 3 else ("", "", "")
        for clone in ("fma", "default"):
            if name.endswith(f"fma_rowEPffPKfl.{clone}"):
                offsets[clone] = int(value, 16)
    real = str(Path(lib).resolve())
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 6 and parts[5] == real and int(parts[2], 16) == 0:
            base = int(parts[0].split("-")[0], 16)
            return {clone: base + off for clone, off in offsets.items()}
    raise RuntimeError(f"{lib} is not mapped")


def main():
    lib = zofast._C.__file__
    address = clone_addresses(lib)
    with tempfile.TemporaryDirectory() as tmp:
        so = Path(tmp) / "harness.so"
        (Path(tmp) / "harness.c").write_text(HARNESS)
        subprocess.run(
            ["cc", "-O2", "-shared", "-fPIC", "-o", so, Path(tmp) / "harness.c"], check=True
        )
        harness = ctypes.CDLL(str(so))
    harness.run.restype = ctypes.c_double
    harness.run.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_float, ctypes.c_void_p]
    harness.run.argtypes += [ctypes.c_long, ctypes.c_long]
    gen = torch.Generator().manual_seed(0)
    print(f"library: {lib}\nclones: {', '.join(f'{k} at {v:#x}' for k, v in address.items())}")
    print("| n | default ns/element | fma ns/element | speed-up |\n|---|---|---|---|")
    for n in (4093, 4096, 16384):
        b = torch.randn(n, generator=gen)
        start = torch.randn(n, generator=gen)
        rows = {}
        for clone, f in address.items():  # one call each from the same acc: bit-identical?
            acc = start.clone()
            harness.run(f, acc.data_ptr(), 1e-3, b.data_ptr(), n, 1)
            rows[clone] = acc
        assert torch.equal(rows["fma"], rows["default"]), "the clones round differently"
        ns = {}
        for clone, f in address.items():
            acc = start.clone()
            reps = max(1, 2 * 10**8 // n) if clone == "fma" else max(1, 2 * 10**7 // n)
            harness.run(f, acc.data_ptr(), 1e-3, b.data_ptr(), n, reps)  # warm-up
            times = [harness.run(f, acc.data_ptr(), 1e-3, b.data_ptr(), n, reps) for _ in range(9)]
            ns[clone] = statistics.median(times) / (reps * n) * 1e9
        speedup = ns["default"] / ns["fma"]
        print(f"| {n} | {ns['default']:.3f} | {ns['fma']:.3f} | {speedup:.1f}× |")


if __name__ == "__main__":
    main()
