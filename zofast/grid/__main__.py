"""``python -m zofast.grid run|plan|report`` (also ``python -m zofast.experiments grid ...``)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

RECORDS = "bench/results/grid-h200"
"""Where the records of the GPU calls are committed (one ``*.jsonl`` per call)."""


def _commit(given: str | None) -> str:
    if given:
        return given
    if os.environ.get("ZOFAST_COMMIT"):
        return os.environ["ZOFAST_COMMIT"]
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        raise SystemExit(
            "every record names its commit: pass --commit HASH (or set ZOFAST_COMMIT); there is "
            "no git repository here"
        ) from None
    dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "zofast"],
                           capture_output=True, text=True).stdout.strip()  # fmt: skip
    return head + ("-dirty" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run it.

    Args:
        argv: arguments (default ``sys.argv[1:]``).

    Returns:
        Exit code.
    """
    from zofast.grid import records, report, runner
    from zofast.grid.protocol import DTYPES, STAGES, TASKS, Protocol, with_steps

    parser = argparse.ArgumentParser(prog="python -m zofast.grid")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "plan"):
        p = sub.add_parser(name, help="run the pending cells" if name == "run" else "list them")
        p.add_argument("--stage", choices=STAGES, required=True)
        p.add_argument("--out", default="runs/grid-gpu/runs.jsonl", help="records file to append")
        p.add_argument("--records", nargs="*", default=[RECORDS], help="earlier records (skipped)")
        p.add_argument("--data-root", default="../shared/data/k-shot")
        p.add_argument("--model", default=None, help="model folder (default: embedded MiniLM)")
        p.add_argument("--device", default="cuda")
        p.add_argument("--workers", type=int, default=16)
        p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
        p.add_argument(
            "--deadline", type=float, default=float("inf"), help="seconds: no cell starts after"
        )
        p.add_argument(
            "--end", type=float, default=None, help="seconds: cells estimated to end later wait"
        )
        p.add_argument("--tasks", nargs="+", choices=list(TASKS))
        p.add_argument("--seeds", nargs="+", type=int)
        p.add_argument("--variants", nargs="+", help=f"of: {', '.join(Protocol().names)}")
        p.add_argument("--dtypes", nargs="+", choices=DTYPES)
        p.add_argument("--scale", type=float, help="rehearsal: every variant's steps times this")
        p.add_argument("--rerun", action="store_true", help="run cells --records already has")
        p.add_argument(
            "--compile", action="store_true", help="torch.compile the float32 ZO cells' model"
        )
        p.add_argument("--commit", default=None, help="the code's commit (default: git HEAD)")
    p = sub.add_parser("report", help="docs/results.md, docs/results.json, docs/grid/*.png")
    p.add_argument("--records", nargs="+", default=[RECORDS])
    p.add_argument("--docs", default="docs")
    p.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    protocol = Protocol()
    if args.command == "report":
        print(
            report.write(protocol, records.read(args.records), args.docs, plots=not args.no_plots)
        )
        return 0
    if args.scale is not None:
        protocol = with_steps(protocol, args.scale)
    for name in args.variants or ():
        try:
            protocol.variant(name)
        except ValueError as error:
            parser.error(str(error))
    only = {
        "tasks": args.tasks,
        "seeds": args.seeds,
        "variants": args.variants,
        "dtypes": args.dtypes,
    }
    settings = runner.Settings(
        stage=args.stage,
        out=args.out,
        data_root=args.data_root,
        model=args.model,
        device=args.device,
        commit=_commit(args.commit) if args.command == "run" else "",
        workers=args.workers,
        threads=args.threads,
        deadline=args.deadline,
        end=args.end,
        records=tuple(args.records),
        protocol=protocol,
        only={k: tuple(v) for k, v in only.items() if v},
        rerun=args.rerun,
        compile=args.compile,
    )
    if args.command == "plan":
        cells, done = runner.pending(settings)
        paused = runner.partials(settings, cells)
        total = 0.0
        for cell in cells:
            guess = runner.estimate(cell, done)
            total += guess or 0.0
            seconds = "?" if guess is None else f"{guess:.0f} s"
            at = (
                f", resumes from step {paused[cell.key]['steps_run']}" if cell.key in paused else ""
            )
            print(f"{cell.describe()}: {cell.variant.forwards(cell.task)} forwards, {seconds}{at}")
        print(f"{len(cells)} cells; {total:.0f} s of the estimated ones (one worker's time)")
        return 0
    try:
        runner.run(settings)
    except FileNotFoundError as error:
        parser.error(str(error))
    return 0


if __name__ == "__main__":
    sys.exit(main())
