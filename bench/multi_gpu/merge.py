"""Merges the JSON of dp.py, directions.py and fsdp.py runs: scaling efficiency against the
1-GPU run, a table (OUT/multi_gpu.md), every run's checks (OUT/multi_gpu.json), and the rows
into bench/results/latest.json's "multi_gpu" list (rows of the same kind, gpus, model and mode
replaced, every other key of latest.json kept).

efficiency: dp, examples/s ÷ (gpus × the 1-GPU run's examples/s); directions, the 1-GPU run's
step_s ÷ (gpus × step_s), the speed-up ÷ gpus; fsdp, the script's own (two forwards ÷ step).
A run without its 1-GPU row keeps efficiency null.

Usage: python bench/multi_gpu/merge.py OUT/*.json --out OUT [--latest bench/results/latest.json]
Exits non-zero when a run's checks failed (after writing).
"""

import argparse
import json
import sys
from pathlib import Path

from common import ROW_KEYS, passed

KEY = ("kind", "gpus", "model", "mode")


def with_efficiency(rows: list[dict]) -> list[dict]:
    """The rows with dp's and directions' efficiency against the 1-GPU row of the same kind,
    model and mode."""
    one = {(r["kind"], r["model"], r["mode"]): r for r in rows if r["gpus"] == 1}
    out = []
    for r in rows:
        base = one.get((r["kind"], r["model"], r["mode"]))
        r = dict(r)
        if r["kind"] == "dp" and base:
            r["efficiency"] = r["examples_per_s"] / (r["gpus"] * base["examples_per_s"])
        elif r["kind"] == "directions" and base:
            r["efficiency"] = base["step_s"] / (r["gpus"] * r["step_s"])
        out.append(r)
    return out


def merged(previous: list[dict], rows: list[dict]) -> list[dict]:
    """`previous` with the rows of the same KEY replaced by `rows`, sorted by KEY."""
    fresh = {tuple(r[k] for k in KEY) for r in rows}
    kept = [r for r in previous if tuple(r[k] for k in KEY) not in fresh]
    return sorted(kept + rows, key=lambda r: tuple(r[k] for k in KEY))


def table(rows: list[dict]) -> list[str]:
    def fmt(value, spec):
        return "–" if value is None else format(value, spec)

    lines = [
        "| kind | GPUs | model | mode | step s | examples/s | efficiency | peak ÷ forward "
        "| bytes / step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['kind']} | {r['gpus']} | {r['model']} | {r['mode']} | {r['step_s']:.4f} | "
            f"{r['examples_per_s']:.1f} | {fmt(r['efficiency'], '.3f')} | "
            f"{fmt(r['peak_over_forward'], '.3f')} | {r['bytes_per_step']:.4g} |"
        )
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("runs", nargs="+", help="the scripts' JSON files")
    p.add_argument("--out", required=True, help="folder for multi_gpu.json and multi_gpu.md")
    p.add_argument("--latest", help="bench/results/latest.json to merge the rows into")
    args = p.parse_args(argv)
    runs = {Path(path).name: json.loads(Path(path).read_text()) for path in args.runs}
    bad = [name for name, run in runs.items() if set(ROW_KEYS) - set(run["rows"][0])]
    if bad:
        p.error(f"not rows of bench/multi_gpu scripts: {', '.join(bad)}")
    rows = with_efficiency([r for run in runs.values() for r in run["rows"]])
    checks = {name: run["checks"] for name, run in runs.items()}
    failed = [f"{name}: {label}" for name, c in checks.items() for label, ok in passed(c) if not ok]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "multi_gpu.json").write_text(json.dumps({"rows": rows, "checks": checks}, indent=1))
    meta = rows[0]
    head = f"commit {meta['commit']}, {meta['gpu']}, torch {meta['torch']}, triton {meta['triton']}"
    lines = [
        head,
        "",
        *table(rows),
        "",
        "Checks: " + ("failed: " + "; ".join(failed) if failed else "all passed"),
    ]
    (out / "multi_gpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if args.latest:
        path = Path(args.latest)
        latest = json.loads(path.read_text()) if path.exists() else {}
        latest["multi_gpu"] = merged(latest.get("multi_gpu", []), rows)
        path.write_text(json.dumps(latest, indent=1) + "\n")
        print(f"merged {len(rows)} rows into {path}")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
