"""The C++ path (backend="cpp") on the CPU against a CPU copy ceiling measured in the same rounds.

Recorded, not asserted: CI runs `pytest tests` and never collects bench/. Run with
`pytest bench/suites/test_cpu.py --benchmark-only --benchmark-json=RUN.json` (bench/conftest.py
skips every other bench/ file without a GPU, not this one), then
`python bench/suites/test_cpu.py RUN.json > cpu.md` for the table.

Per (dtype, shape): the copy (`dst.copy_(src)` of w's bytes) with all intra-op threads and with
one, `w.mul_(1.0)` (torch's own in-place pass), gaussian_ (1 and 3 terms) and lowrank_ (ranks 1,
4, 16; 1 and 3 terms, the three with distinct v_seeds, so 3·r fmas per element); at 4096² a few
ops once more on one thread (the extension's at::parallel_for runs on one thread unless it is
built with OpenMP: these rows show whether it is). Every op is checked against backend="torch" on
the first and last 16 rows before it is timed.

Timing, made for a shared, noisy machine: in every round, as the op's untimed setup, the caches
are evicted (a 64 MiB read-modify-write; L3 is 32 MiB on the machine measured, where 2048²
float32 would fit) before each of: one copy of w's bytes on all threads, one on one thread, and
then the timed call. Recorded: the median call, GB/s (bytes = one read + one write of w), and %
of the copy ceiling = GB/s over the GB/s of the median all-thread copy of the same rounds (also
% of the one-thread copy), so load that comes and goes hits ceiling and op alike; `contended`
marks rows whose all-thread copy was under 80 % of their one-thread copy (another process held
a core: every all-thread number of that row is suspect). A copy into a cold dst also pays for
reading dst's lines (write-allocate) and an in-place pass does not: an in-place op can exceed
100 % of this ceiling (w.mul_ shows by how much)."""

import functools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from zofast import perturb

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SHAPES = [(2048, 2048), (4096, 4096), (4099, 4093)]
RANKS = [1, 4, 16]
TERMS = [1, 3]
THREADS = ["all", 1]
ROUNDS = (7, 21)  # fewest and most timed rounds: as many as fit in ~2 s of op time
WARMUP = 2
CHECK_ROWS = 16  # ≥ the largest rank: lowrank_ needs rank ≤ min(m, n) on the slice too
SEEDS = {"u": [1, 2, 4], "v": [3, 5, 7], "g": [11, 12, 13]}
SCALES = [1e-3, -1e-3, 2e-3]
REPO = Path(__file__).resolve().parents[2]


def shape_id(shape):
    return f"{shape[0]}x{shape[1]}"


def cases():
    """(dtype, shape, op, rank, terms, threads) in measuring order."""
    out = []
    for dtype in DTYPES:
        for shape in SHAPES:
            group = [("copy", None, None, t) for t in THREADS]
            group.append(("inplace_mul", None, None, "all"))
            group += [("gaussian_", None, t, "all") for t in TERMS]
            group += [("lowrank_", r, t, "all") for r in RANKS for t in TERMS]
            if shape == (4096, 4096):
                group += [("gaussian_", None, 1, 1), ("lowrank_", 1, 1, 1), ("lowrank_", 16, 1, 1)]
            out += [(dtype, shape, *case) for case in group]
    return out


def case_id(case):
    dtype, shape, op, rank, terms, threads = case
    parts = [dtype, shape_id(shape), op]
    parts += [f"r{rank}"] if rank else []
    parts += [f"t{terms}"] if terms else []
    return "-".join(parts + ([] if threads == "all" else [f"threads{threads}"]))


@functools.cache
def machine() -> dict:
    """CPU model and core count, torch, the commit measured and whether the tracked files of the
    measured code differ from it (other work may be under way in the checkout)."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    fields = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())

    def git(*args):
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        return out.stdout.strip()

    dirty = git("status", "--porcelain", "-uno", "--", "csrc", "zofast", "setup.py")
    return {
        "cpu": fields.get("model name", "unknown"),
        "cpu_family_model": f"{fields.get('cpu family', '?')}/{fields.get('model', '?')}",
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "commit": git("rev-parse", "--short", "HEAD") or "unknown",
        "measured_code_dirty": bool(dirty),
    }


@pytest.fixture(scope="session")
def evict():
    """Evicts w from L1/L2/L3: a read-modify-write of 64 MiB (twice the L3 measured here)."""
    buffer = torch.zeros(2**24, dtype=torch.float32)
    return lambda: buffer.add_(1.0)


def weights(dtype, shape):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=gen).to(DTYPES[dtype])


def pass_bytes(w):
    return 2 * w.numel() * w.element_size()


def op_call(op, w, rank, terms, backend, row_offset=0):
    """The op on w (a full matrix or its rows from row_offset on), in place."""
    n = w.shape[1]
    if op == "gaussian_":
        return perturb.gaussian_(
            w, SEEDS["g"][:terms], SCALES[:terms], offset=row_offset * n, backend=backend
        )
    return perturb.lowrank_(
        w,
        SEEDS["u"][:terms],
        SEEDS["v"][:terms],
        rank,
        SCALES[:terms],
        row_offset=row_offset,
        backend=backend,
    )


def check_against_torch(w, op, rank, terms) -> float:
    """The cpp result on the first and last CHECK_ROWS rows against backend="torch" on those rows
    alone (rows are global indices in the contract). Normals may differ in their last bits
    between libms: one rounding step of w's dtype allowed. Returns the bit-identical fraction."""
    out = op_call(op, w.clone(), rank, terms, "cpp")
    m, k = w.shape[0], CHECK_ROWS
    same, total = 0, 0
    for start in (0, m - k):
        ref = op_call(op, w[start : start + k].clone(), rank, terms, "torch", row_offset=start)
        got = out[start : start + k]
        eps = torch.finfo(w.dtype).eps
        bound = 2 * eps * ref.double().abs() + 1e-6
        err = (got.double() - ref.double()).abs()
        assert torch.all(err <= bound), f"{op} rows {start}..: max err {err.max().item():.3g}"
        same += int((got == ref).sum())
        total += got.numel()
    return same / total


def seconds_of(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@pytest.mark.parametrize("case", cases(), ids=case_id)
def test_cpu(benchmark, evict, case):
    dtype, shape, op, rank, terms, threads = case
    w = weights(dtype, shape)
    dst = torch.empty_like(w)
    copy = functools.partial(dst.copy_, w)
    all_threads = torch.get_num_threads()
    row_threads = all_threads if threads == "all" else threads
    info = {"op": op, "backend": "torch" if op in ("copy", "inplace_mul") else "cpp"}
    info.update(dtype=dtype, shape=list(shape), rank=rank, terms=terms)
    if op == "copy":
        fn = copy
    elif op == "inplace_mul":
        fn = functools.partial(w.mul_, 1.0)
    else:
        info["bit_identical_to_torch"] = check_against_torch(w, op, rank, terms)
        fn = functools.partial(op_call, op, w, rank, terms, "cpp")
    copies = {all_threads: [], 1: []}

    def setup():  # untimed: the round's two copies, caches evicted before each and the call
        for n_threads, seconds in copies.items():
            torch.set_num_threads(n_threads)
            evict()
            seconds.append(seconds_of(copy))
        torch.set_num_threads(row_threads)
        evict()

    load_before = os.getloadavg()
    try:
        torch.set_num_threads(row_threads)
        info["threads"] = torch.get_num_threads()
        one_call = seconds_of(fn)
        rounds = int(min(max(2.0 / max(one_call, 1e-6), ROUNDS[0]), ROUNDS[1]))
        benchmark.pedantic(fn, setup=setup, rounds=rounds, iterations=1, warmup_rounds=WARMUP)
    finally:
        torch.set_num_threads(all_threads)
    if benchmark.stats is None:  # --benchmark-disable
        return
    seconds = benchmark.stats.stats.median
    copy_all, copy_one = (statistics.median(copies[t][WARMUP:]) for t in (all_threads, 1))
    gbps = pass_bytes(w) / seconds / 1e9
    copy_gbps, copy_1t_gbps = (pass_bytes(w) / c / 1e9 for c in (copy_all, copy_one))
    benchmark.extra_info.update(
        info,
        rounds=rounds,
        median_ms=seconds * 1e3,
        gbps=gbps,
        copy_threads=all_threads,
        copy_median_ms=copy_all * 1e3,
        copy_gbps=copy_gbps,
        pct_of_copy=100 * gbps / copy_gbps,
        copy_1t_median_ms=copy_one * 1e3,
        copy_1t_gbps=copy_1t_gbps,
        pct_of_copy_1t=100 * gbps / copy_1t_gbps,
        contended=copy_gbps < 0.8 * copy_1t_gbps,
        load_before=list(load_before),
        load_after=list(os.getloadavg()),
        **machine(),
    )


def report(run_json: str) -> str:
    """A kernels.md-style table of a pytest-benchmark JSON written by this file."""
    run = json.loads(Path(run_json).read_text())
    rows = [b["extra_info"] for b in run["benchmarks"] if "pct_of_copy" in b["extra_info"]]
    first = rows[0]
    dirty = " (tracked measured code differed from it)" if first["measured_code_dirty"] else ""
    loads = [x for r in rows for x in (r["load_before"][0], r["load_after"][0])]
    lines = [
        f"# CPU benchmarks of the C++ path on {first['cpu']} ({first['cores']} cores)",
        "",
        f"commit {first['commit']}{dirty}, {run['datetime'][:10]}, torch {first['torch']}, "
        f"CPU family/model {first['cpu_family_model']}. Medians of {ROUNDS[0]}–{ROUNDS[1]} "
        f"wall-clock calls after {WARMUP} warm-up calls, caches evicted (64 MiB "
        "read-modify-write) before each; bytes = one read + one write of w. copy GB/s: the "
        f"median `dst.copy_(src)` of the same bytes on {first['copy_threads']} threads (1t: on "
        "one), timed in the same rounds as the row's op; % of copy = GB/s ÷ copy GB/s. † = "
        "contended: the all-thread copy under 80 % of the one-thread copy in those rounds. "
        "load = 1-minute load average when the row began (shared machine; "
        f"{min(loads):.2f} to {max(loads):.2f} over the run). = torch: fraction of the checked "
        'rows (first and last 16) bit-identical to backend="torch"; all within one rounding of '
        "w's dtype.",
        "",
        "| op | backend | dtype | shape | rank | terms | threads | ms | GB/s | copy GB/s | "
        "% of copy | copy 1t GB/s | % of copy 1t | = torch | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        same = r.get("bit_identical_to_torch")
        same = "" if same is None else f"{100 * same:.1f} %"
        mark = " †" if r["contended"] else ""
        lines.append(
            f"| {r['op']} | {r['backend']} | {r['dtype']} | {r['shape'][0]}×{r['shape'][1]} | "
            f"{r['rank'] or ''} | {r['terms'] or ''} | {r['threads']} | {r['median_ms']:.2f} | "
            f"{r['gbps']:.1f} | {r['copy_gbps']:.1f}{mark} | {r['pct_of_copy']:.1f} | "
            f"{r['copy_1t_gbps']:.1f} | {r['pct_of_copy_1t']:.1f} | {same} | "
            f"{r['load_before'][0]:.1f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(report(sys.argv[1]))
