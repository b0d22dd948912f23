"""Eager calls of the low-level API against the copy ceiling and against the graphed pass (H200).

One bf16 tensor per row: `lowrank_` at ranks 1, 2, 4, 8 and `gaussian_`, on 8192² and on the odd
4099×4093, called eagerly with int seeds as a user would. Each row also times, on the same tensor,
a device copy of the same bytes (read + write of w), the same call captured in a CUDA graph with
device seed tensors (bench/suites/test_kernels.py's "graphed" rows) and a GraphedPass over the
tensor. Where the eager time goes: "host_us", one call until it returns (GPU idle before it);
"kernel_us", the eager call's own launches replayed from a CUDA graph (the one-launch path copies
nothing, so it can be captured; the two-launch path's staged copy cannot, and its kernels are the
device-seed graph's); "back_to_back_us", per call over 200 calls issued without a sync. Every
variant is checked bit for bit against the eager result before it is timed ("*_equal" in the
rows). Times: medians of triton.testing.do_bench (L2 flushed before each call), as in
bench/conftest.py.

Usage (GPU machine, repo root): python bench/probes/eager.py OUT [--label NAME] [--two-launch]
[--sweep]. --two-launch times the factor + apply launches from staged tables that eager calls
made before kernels/lowrank_seeded.py (zofast.perturb._ONE_LAUNCH off; rows "path"). Writes
OUT/eager.json ({"gpu", "commit", "torch", "triton", "copy_gbps", "kernels": rows}, rows shaped
like latest.json's kernel rows with "eager": true), OUT/profile.txt (cProfile of eager calls:
where the host time goes) and with --sweep OUT/tiles.jsonl (per tile and warp count, replayed from
CUDA graphs: the one-launch kernel from seeds, "kernel": "seeded", and the apply kernel alone on
pre-made factors, "apply": which suit each rank and the odd shape).
"""

import argparse
import cProfile
import functools
import io
import json
import pstats
import subprocess
import time
from pathlib import Path

import torch

SHAPES = [(8192, 8192), (4099, 4093)]
RANKS = [1, 2, 4, 8]
# (BLOCK_M, BLOCK_N, num_warps) of the sweep: today's 32×128, the flat tile of odd row lengths,
# and larger tiles with 8 warps (128×128 × 8 led an unmasked variant at rank 4, probe-6; larger
# tiles also draw fewer normals per element in the one-launch kernel).
CONFIGS = [
    (32, 128, 4),
    (64, 64, 4),
    (16, 256, 4),
    (8, 512, 4),
    (64, 128, 8),
    (128, 128, 8),
]


def median_ms(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


def back_to_back_us(fn, calls: int = 200) -> float:
    """Microseconds per call over `calls` calls issued without a sync (the host's pace shows
    where it is slower than the kernels)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e6 / calls


def host_us(fn, calls: int = 50) -> float:
    """Median microseconds until one call returns, each started on an idle GPU."""
    times = []
    for _ in range(calls):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    return sorted(times)[calls // 2]


def peak_extra_bytes(fn) -> int:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def captured(fn):
    """fn captured once in a CUDA graph: its replay."""
    fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def variants(w, rank):
    """(eager call, graph-replayed call, GraphedPass call) of one pass over w: seed 11 (u), 13
    (v), scale 1e-3; rank None: full rank."""
    from zofast import perturb
    from zofast.graphed import GraphedPass

    device = w.device
    seeds = torch.tensor([11], device=device)
    scales = torch.tensor([1e-3], device=device)
    if rank is None:
        eager = lambda: perturb.gaussian_(w, 11, 1e-3)  # noqa: E731
        graph = captured(lambda: perturb.gaussian_(w, seeds, scales))
    else:
        v_seeds = torch.tensor([13], device=device)
        eager = lambda: perturb.lowrank_(w, 11, 13, rank, 1e-3)  # noqa: E731
        graph = captured(lambda: perturb.lowrank_(w, seeds, v_seeds, rank, scales))
    graphed = GraphedPass([w], ranks=[rank or 0], n_terms=1)
    return eager, graph, lambda: graphed([[11]], [13], [[1e-3]])


def same_bits(w, calls) -> list[bool]:
    """Whether each call after the first, from the same start, gives the first call's bits."""
    start = w.clone()
    results = []
    for call in calls:
        w.copy_(start)
        call()
        results.append(w.clone())
    w.copy_(start)
    return [torch.equal(result, results[0]) for result in results[1:]]


def row(shape, rank, label, one_launch: bool) -> dict:
    w = torch.randn(shape, device="cuda").to(torch.bfloat16)
    eager, graph, graphed = variants(w, rank)
    # The eager call's own kernels: captured (one launch, nothing copied), else the graph's.
    kernels = captured(eager) if one_launch else graph
    graph_equal, graphed_equal, kernels_equal = same_bits(w, [eager, graph, graphed, kernels])
    moved = 2 * w.numel() * w.element_size()
    src = torch.empty(w.numel(), dtype=w.dtype, device="cuda")
    dst = torch.empty_like(src)
    copy_us = median_ms(lambda: dst.copy_(src)) * 1e3
    us = median_ms(eager) * 1e3
    graph_us = median_ms(graph) * 1e3
    graphed_us = median_ms(graphed) * 1e3
    return {
        "op": "gaussian_" if rank is None else "lowrank_",
        "backend": "triton",
        "dtype": "bf16",
        "shape": list(shape),
        "rank": rank,
        "terms": 1,
        "eager": True,
        "label": label,
        "path": "one-launch" if one_launch else "two-launch",
        "device_median_us": us,
        "gbps": moved / us / 1e3,
        "pct_of_copy": None,  # filled in with the 1 GiB ceiling in main
        "pct_of_same_copy": 100 * copy_us / us,
        "same_copy_us": copy_us,
        "graph_replay_equal": graph_equal,
        "graph_replay_us": graph_us,
        "graph_replay_pct_of_same_copy": 100 * copy_us / graph_us,
        "graphed_pass_equal": graphed_equal,
        "graphed_pass_us": graphed_us,
        "graphed_pass_pct_of_same_copy": 100 * copy_us / graphed_us,
        "host_us": host_us(eager),
        "kernel_us": median_ms(kernels) * 1e3,
        "kernel_equal": kernels_equal,
        "back_to_back_us": back_to_back_us(eager),
        "peak_extra_bytes": peak_extra_bytes(eager),
    }


def ceiling_gbps() -> float:
    """Device copy bandwidth on 1 GiB (bytes read + written per second / 1e9): bench/conftest's."""
    src = torch.empty(2**29, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    return 2 * src.numel() * 2 / median_ms(lambda: dst.copy_(src)) / 1e6


def profile(out: Path) -> None:
    """cProfile of 200 eager calls per op on 8192² (rank 2): the host's time by function."""
    from zofast import perturb

    w = torch.randn(8192, 8192, device="cuda").to(torch.bfloat16)
    text = io.StringIO()
    for name, call in (
        ("lowrank_ rank 2", lambda: perturb.lowrank_(w, 11, 13, 2, 1e-3)),
        ("gaussian_", lambda: perturb.gaussian_(w, 11, 1e-3)),
    ):
        call()
        torch.cuda.synchronize()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(200):
            call()
            torch.cuda.synchronize()  # each call starts on an idle GPU, as host_us
        prof.disable()
        text.write(f"== {name}: 200 calls\n")
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
    (out / "profile.txt").write_text(text.getvalue())


def sweep(out: Path, copy_gbps: float) -> None:
    """Per tile and warps, bf16, replayed from CUDA graphs: the one-launch kernel from seeds and
    the apply kernel alone on pre-made factors; OUT/tiles.jsonl."""
    from zofast.kernels import lowrank, lowrank_seeded

    with (out / "tiles.jsonl").open("w") as lines:
        for shape in SHAPES:
            w = torch.randn(shape, device="cuda").to(torch.bfloat16)
            for rank in RANKS:
                u = torch.randn(1, rank, shape[0], device="cuda")
                v = torch.randn(1, rank, shape[1], device="cuda")
                for bm, bn, warps in CONFIGS:
                    launches = {
                        "seeded": functools.partial(
                            lowrank_seeded.lowrank_seeded_triton,
                            w,
                            [11, 13],
                            [1e-3],
                            rank,
                            0,
                            bm,
                            bn,
                            num_warps=warps,
                        ),
                        "apply": functools.partial(
                            lowrank.lowrank_triton, w, u, v, bm, bn, num_warps=warps
                        ),
                    }
                    for kernel, launch in launches.items():
                        ms = median_ms(captured(launch))
                        pct = 100 * 2 * w.numel() * 2 / ms / 1e6 / copy_gbps
                        record = {"kernel": kernel, "shape": list(shape), "rank": rank}
                        record.update(tile=[bm, bn], warps=warps, us=ms * 1e3, pct_of_copy=pct)
                        print(json.dumps(record), flush=True)
                        lines.write(json.dumps(record) + "\n")
                        lines.flush()  # a run cut short keeps what it measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder for eager.json, profile.txt, tiles.jsonl")
    parser.add_argument("--label", default="after", help="tag of the rows (e.g. before)")
    parser.add_argument("--sweep", action="store_true", help="also both kernels per tile")
    parser.add_argument(
        "--two-launch", action="store_true", help="the factor + apply launches of before"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("eager.py measures GPU kernels: no CUDA device here")
    import triton

    from zofast import perturb

    perturb._ONE_LAUNCH = not args.two_launch
    args.out.mkdir(parents=True, exist_ok=True)
    copy_gbps = ceiling_gbps()
    rows = []
    for shape in SHAPES:
        for rank in [*RANKS, None]:
            record = row(shape, rank, args.label, not args.two_launch)
            record["pct_of_copy"] = 100 * record["gbps"] / copy_gbps
            rows.append(record)
            print(json.dumps(record), flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    result = {
        "gpu": torch.cuda.get_device_name(),
        "commit": commit.stdout.strip() or "unknown",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "copy_gbps": copy_gbps,
        "kernels": rows,
    }
    (args.out / "eager.json").write_text(json.dumps(result, indent=1) + "\n")
    profile(args.out)
    if args.sweep:
        sweep(args.out, copy_gbps)


if __name__ == "__main__":
    main()
