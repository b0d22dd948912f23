"""Where the GPU waits for the host, from a torch.profiler chrome trace (with_stack=True).

GPU busy time is the union of kernel / memcpy / memset intervals; a gap is a stretch of at
least --min-us between them. Each gap is sampled every 10 µs and charged to the innermost
Python frame the main thread was running then (python_function events), so the table says which
functions keep the GPU idle.

    python bench/tools/trace_gaps.py TRACE.json[.gz] [--top 25] [--min-us 100]
"""

import argparse
import bisect
import collections
import gzip
import itertools
import json
import shutil
from pathlib import Path

GPU_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}


def export(prof, path: Path) -> Path:
    """Write a finished torch.profiler.profile as a gzipped chrome trace at path (….json.gz)."""
    raw = Path(str(path).removesuffix(".gz"))
    prof.export_chrome_trace(str(raw))
    with open(raw, "rb") as src, gzip.open(path, "wb") as dst:
        shutil.copyfileobj(src, dst)
    raw.unlink()
    return Path(path)


def load(path: Path) -> list[dict]:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        return [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]


def union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def innermost_frames(python: list[dict], times: list[float]) -> list[str | None]:
    """For each sample time (sorted), the name of the latest-starting python event covering it."""
    python = sorted(python, key=lambda e: e["ts"])
    starts = [e["ts"] for e in python]
    names, stack, added = [], [], 0
    for t in times:
        stop = bisect.bisect_right(starts, t)
        while added < stop:
            event = python[added]
            while stack and stack[-1]["ts"] + stack[-1]["dur"] < event["ts"]:
                stack.pop()
            stack.append(event)
            added += 1
        while stack and stack[-1]["ts"] + stack[-1]["dur"] < t:
            stack.pop()
        names.append(stack[-1]["name"] if stack else None)
    return names


def summarise(path: Path, title: str, top: int = 25, min_us: float = 100.0) -> str:
    events = load(path)
    gpu = [(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") in GPU_CATEGORIES]
    python = [e for e in events if e.get("cat") == "python_function"]
    if python:  # the main thread: the one with the most Python frames
        main = collections.Counter(e["tid"] for e in python).most_common(1)[0][0]
        python = [e for e in python if e["tid"] == main]
    span = [e["ts"] for e in events] + [e["ts"] + e["dur"] for e in events]
    wall_ms = (max(span) - min(span)) / 1e3 if span else 0.0
    busy = union(gpu)
    busy_ms = sum(b - a for a, b in busy) / 1e3
    kernels = sum(e.get("cat") == "kernel" for e in events)
    gaps = [(a[1], b[0]) for a, b in itertools.pairwise(busy) if b[0] - a[1] >= min_us]
    gap_ms = sum(b - a for a, b in gaps) / 1e3
    lines = [
        f"== {title} ({Path(path).name}): wall {wall_ms:.2f} ms, GPU busy {busy_ms:.2f} ms, "
        f"{kernels} kernels; {len(gaps)} gaps ≥ {min_us:.0f} µs: {gap_ms:.2f} ms"
    ]
    times = [t for a, b in gaps for t in range(int(a), int(b), 10)]
    charged = collections.Counter(innermost_frames(python, times))
    for name, samples in charged.most_common(top):
        lines.append(f"  {samples * 10 / 1e3:8.2f} ms  {name}")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("traces", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--min-us", type=float, default=100.0)
    args = parser.parse_args()
    for path in args.traces:
        print(summarise(path, path.stem, args.top, args.min_us))


if __name__ == "__main__":
    main()
