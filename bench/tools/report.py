"""Turns a pytest-benchmark JSON of bench/ into bench/results/<name>.md and latest.json.

Usage: python bench/tools/report.py [RUN.json ...] [--steps STEPS.json] [--out bench/results]
(RUN.json: pytest-benchmark JSON of the kernel / pass benchmarks; STEPS.json: the pytest-benchmark
JSON of bench/suites/test_steps.py, or a list of step records. With no RUN.json only the steps are
reported, in steps.md.)
latest.json: {"gpu", "commit", "date", "torch", "triton", "copy_gbps",
              "kernels": [{"op", "dtype", "shape", "rank", "pct_of_copy", ...}],
              "steps": [{"model", "method", "dtype", "mode", "rounding", "exact", "pipeline",
                         "paired", "batch", "step_over_two_forwards", "peak_over_forward", ...}],
              "multi_gpu": [...]: kept as found (bench/multi_gpu/merge.py writes it)}
Step rows: method is "lozo", "lozo-m", "mezo" or "mezo-pattern"; exact is true where the stored
weights are written by updates only (shadow; virtual where every trained tensor goes through the
layers); paired is true where a step was one forward over the batch stacked twice. Records from
before these fields existed (bf16, round-to-nearest, pipelined, not exact, not paired) are filled
in with those values.
"""

import argparse
import json
import subprocess
from pathlib import Path


def git_commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


STEP_KEYS = (
    "model",
    "method",
    "dtype",
    "mode",
    "rounding",
    "exact",
    "pipeline",
    "paired",
    "batch",
    "forward_ms",
    "step_ms",
    "step_over_two_forwards",
    "forward_run_ms",
    "step_run_ms",
    "step_over_two_forwards_run",
    "step_over_two_forwards_interleaved",
    "peak_over_forward",
)
LEGACY_METHODS = {"lozo_m": "lozo-m", "mezo_pattern": "mezo-pattern"}


def step_record(info: dict) -> dict:
    """One step row with every STEP_KEYS field that the record has, old records completed."""
    row = {k: info[k] for k in STEP_KEYS if k in info}
    row["method"] = LEGACY_METHODS.get(row["method"], row["method"])
    row.setdefault("dtype", "bfloat16")
    row.setdefault("rounding", "nearest")
    row.setdefault("exact", row.get("mode") == "shadow")
    row.setdefault("pipeline", row.get("mode") != "shadow")
    row.setdefault("paired", False)
    row.setdefault("batch", "16x256")
    return {k: row[k] for k in STEP_KEYS if k in row}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("run", nargs="*", help="pytest-benchmark JSON file(s) of one run")
    parser.add_argument(
        "--steps", help="JSON list of ZO step measurements (bench/suites/test_steps.py)"
    )
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--commit", help="commit measured (default: git HEAD)")
    args = parser.parse_args()
    runs = [json.loads(Path(path).read_text()) for path in args.run]
    steps = json.loads(Path(args.steps).read_text()) if args.steps else []
    if not runs and not isinstance(steps, dict):
        parser.error("give a RUN.json, or --steps with a pytest-benchmark JSON")
    runs = runs or [steps]  # steps alone: their run gives the date, GPU and versions
    run = {
        "datetime": runs[0]["datetime"],
        "benchmarks": [b for r in runs for b in r["benchmarks"]],
    }
    kernels, tiles = [], []
    for bench in run["benchmarks"]:
        info = bench["extra_info"]
        if "pct_of_copy_by_tile" in info:
            tiles.append(info)
        elif "op" in info:
            kernels.append(
                {
                    k: info[k]
                    for k in (
                        *(("model",) if "model" in info else ()),
                        "op",
                        "backend",
                        "dtype",
                        "shape",
                        "rank",
                        "terms",
                        "device_median_us",
                        "gbps",
                        "pct_of_copy",
                        "peak_extra_bytes",
                    )
                }
            )
    first = run["benchmarks"][0]["extra_info"]
    meta = {
        "commit": args.commit or git_commit(),
        "torch": first["torch"],
        "triton": first.get("triton"),
    }
    gpu, copy = first["gpu"], first.get("copy_gbps")
    if isinstance(steps, dict):  # pytest-benchmark JSON of bench/suites/test_steps.py
        steps = [b["extra_info"] for b in steps["benchmarks"]]
    steps = [step_record(info) for info in steps]
    latest = {
        "gpu": gpu,
        "commit": meta["commit"],
        "date": run["datetime"][:10],
        "torch": meta["torch"],
        "triton": meta["triton"],
        "copy_gbps": copy,
        "kernels": kernels,
        "steps": steps,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "latest.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    if "multi_gpu" in previous:  # bench/multi_gpu/merge.py's rows: not this report's to drop
        latest["multi_gpu"] = previous["multi_gpu"]
    path.write_text(json.dumps(latest, indent=1) + "\n")
    lines = [
        f"# {'Kernel' if args.run else 'ZO step'} benchmarks on {gpu}",
        "",
        f"commit {meta['commit']}, {latest['date']}, torch {meta['torch']}, triton "
        f"{meta['triton']}"
        + (
            f"; copy ceiling {copy:.0f} GB/s (read + write). Medians of device-event timings "
            "after warm-up, L2 flushed before each call; bytes = one read + one write of w."
            if copy
            else "."
        ),
    ]
    if kernels:
        lines += [
            "",
            "| op | backend | dtype | shape | rank | terms | µs | GB/s | % of copy | extra MiB |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
    for k in kernels:
        shape = (
            f"{k['model']}: {k['shape'][0]} tensors"
            if "model" in k
            else f"{k['shape'][0]}×{k['shape'][1]}"
        )
        lines.append(
            f"| {k['op']} | {k['backend']} | {k['dtype']} | {shape} | "
            f"{k['rank'] or ''} | {k['terms']} | {k['device_median_us']:.1f} | {k['gbps']:.0f} | "
            f"{k['pct_of_copy']:.1f} | {k['peak_extra_bytes'] / 2**20:.2f} |"
        )
    for t in tiles:
        ranked = sorted(t["pct_of_copy_by_tile"].items(), key=lambda kv: -kv[1])
        lines += ["", f"Tile sweep, {t['op']}, {t['model']}, rank {t['rank']} (% of copy): "]
        lines[-1] += ", ".join(f"{tile} {pct}" for tile, pct in ranked)
    if steps:
        nan = float("nan")
        lines += [
            "",
            "Each call timed alone (synced), in runs of 10 back-to-back calls (run), and in "
            "interleaved rounds of 4 forwards then 4 steps (median of the rounds' ratios).",
            "",
            "| model | method | dtype | mode | rounding | exact | paired | batch | forward ms "
            "| step ms | step ÷ two forwards | run: forward ms | run: step ms "
            "| run: step ÷ two forwards | interleaved | peak ÷ forward peak |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for st in steps:
            lines.append(
                f"| {st['model']} | {st['method']} | {st['dtype']} | {st['mode']} | "
                f"{st['rounding']} | {'yes' if st['exact'] else 'no'} | "
                f"{'yes' if st['paired'] else 'no'} | {st['batch']} | "
                f"{st.get('forward_ms', nan):.2f} | {st.get('step_ms', nan):.2f} | "
                f"{st['step_over_two_forwards']:.3f} | {st.get('forward_run_ms', nan):.2f} | "
                f"{st.get('step_run_ms', nan):.2f} | "
                f"{st.get('step_over_two_forwards_run', nan):.3f} | "
                f"{st.get('step_over_two_forwards_interleaved') or nan:.3f} | "
                f"{st['peak_over_forward']:.5f} |"
            )
    (out / ("kernels.md" if args.run else "steps.md")).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
