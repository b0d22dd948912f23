"""The experiment runner: 16-shot grids of tasks × data seeds × methods, and their reports.

Two families of methods run here, on the same tasks (:data:`TASKS`), seeds (:data:`SEEDS`) and
report conventions (mean ± sample standard deviation over seeds, ddof = 1; one table per grid,
tasks as rows, methods as columns, an average row; :func:`mean_std`, :func:`accuracy_table`):

* the gradient and zeroth-order optimizers (zero-shot, MeZO, LOZO, LOZO-M, Adam), this module's
  ``run`` / ``report`` commands, below;
* the derivative-free DFO-LoRA variants, the ``dfo`` command (:mod:`zofast.dfo.experiments`;
  ``python -m zofast.dfo.experiments`` is the same command).

The optimizer grid: zero-shot, MeZO, LOZO, LOZO-M and Adam on SST-2, RTE and TREC.

Every method fine-tunes the embedded all-MiniLM-L6-v2 (encoder scoring: cosine similarity to the
task's label descriptions, see :mod:`zofast.scoring`) on the LM-BFF 16-shot splits, seeds 13, 21,
42, 87 and 100, at the same forward-pass budget (:data:`zofast.train.FORWARDS_PER_STEP`: a ZO step
is 2 forwards, an Adam step 3), keeps the best dev checkpoint and reports its test accuracy.

Run it (resumable: finished runs are skipped; results survive an interruption)::

    nohup python -m zofast.experiments run --data-root ../shared/data/k-shot --workers 2 \\
        > runs/grid/progress.log 2>&1 &
    python -m zofast.experiments report   # docs/results-cpu-100-steps.md and .json
    python -m zofast.experiments dfo --out runs/dfo-exp   # the DFO-LoRA grid (its --help)

``run`` starts ``--workers`` processes with ``--threads`` torch threads each; they take
(task, seed) pairs from a shared queue (claim files), load the model once, reset it to the base
weights before every run and append one JSON line per finished run to ``runs/grid/runs.jsonl``.
Single-threaded workers hold up better than one two-threaded process on a shared 2-core
machine: a thread that waits for a descheduled sibling stalls a whole matrix multiply.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "GridConfig",
    "HYPERPARAMETERS",
    "TASKS",
    "SEEDS",
    "METHODS",
    "STD_NOTE",
    "mean_std",
    "accuracy_table",
    "run_grid",
    "report",
]

TASKS = {"sst-2": "SST-2", "rte": "RTE", "trec": "trec"}
"""Task name → its folder of LM-BFF 16-shot splits (``<folder>/16-<seed>``)."""

SEEDS = (13, 21, 42, 87, 100)
"""The LM-BFF data seeds."""

METHODS = ("mezo", "lozo", "lozo-m", "adam")
"""The optimizer grid's trained methods."""

STD_NOTE = "sample std over seeds, ddof = 1"
"""How every report states its ± (:func:`mean_std`)."""
REPORT = "results-cpu-100-steps"  # docs/results.md is the GPU grid's (zofast.grid)
LABELS = {
    "zero-shot": "zero-shot",
    "mezo": "MeZO",
    "lozo": "LOZO",
    "lozo-m": "LOZO-M",
    "adam": "Adam (FO)",
}

#: Per-method settings (lr tuned on the bundled demo set's dev split, never on these tasks).
HYPERPARAMETERS: dict[str, dict[str, Any]] = {
    "mezo": {"lr": 6e-5, "eps": 1e-3},
    "lozo": {"lr": 5e-5, "eps": 1e-3, "rank": 2, "nu": 50},
    "lozo-m": {"lr": 3e-5, "eps": 1e-3, "rank": 2, "nu": 50, "momentum": 0.7},
    "adam": {"lr": 3e-5},
}


@dataclass
class GridConfig:
    """What the grid runs and where it writes.

    Args:
        data_root: folder holding ``SST-2/16-<seed>``, ``RTE/16-<seed>``, ``trec/16-<seed>``.
        runs_dir: run folders, ``runs.jsonl`` and the progress log.
        docs_dir: where ``report`` writes ``results-cpu-100-steps.md`` and ``.json``.
        zo_steps: steps of the zeroth-order methods; the budget is ``2 * zo_steps`` forwards,
            which Adam spends in ``2 * zo_steps // 3`` steps.
        batch_size: examples per step (all methods).
        eval_every: steps between dev evaluations (Adam: scaled by 2/3, same forward spacing).
        freeze: parameters kept frozen by every method (regex on names).
        max_length: longest prompt in tokens.
        tasks: task names (keys of :data:`TASKS`).
        seeds: data split seeds (also the run seeds).
        methods: trained methods (keys of :data:`HYPERPARAMETERS`).

    Example:
        >>> GridConfig(zo_steps=100).forward_budget
        200
    """

    data_root: str = "../shared/data/k-shot"
    runs_dir: str = "runs/grid"
    docs_dir: str = "docs"
    zo_steps: int = 100
    batch_size: int = 16
    eval_every: int = 25
    freeze: str | None = "word_embeddings"
    max_length: int = 128
    tasks: tuple[str, ...] = tuple(TASKS)
    seeds: tuple[int, ...] = SEEDS
    methods: tuple[str, ...] = METHODS
    hyperparameters: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {k: dict(v) for k, v in HYPERPARAMETERS.items()}
    )

    @property
    def forward_budget(self) -> int:
        """Forward passes per run: two per zeroth-order step."""
        return 2 * self.zo_steps

    def train_config(self, task: str, seed: int, method: str, zero_shot_test: bool):
        """The :class:`~zofast.train.TrainConfig` of one run of the grid.

        Args:
            task: key of :data:`TASKS`.
            seed: split seed.
            method: trained method.
            zero_shot_test: whether this run measures the zero-shot test accuracy.

        Returns:
            A validated TrainConfig.

        Example:
            >>> GridConfig().train_config("rte", 13, "lozo", False).data
            '../shared/data/k-shot/RTE/16-13'
        """
        from zofast.train import FORWARDS_PER_STEP, TrainConfig

        eval_forwards = 2 * self.eval_every
        return TrainConfig(
            task=task,
            data=str(Path(self.data_root) / TASKS[task] / f"16-{seed}"),
            method=method,
            forward_budget=self.forward_budget,
            batch_size=self.batch_size,
            eval_every=max(1, eval_forwards // FORWARDS_PER_STEP[method]),
            seed=seed,
            output_dir=str(Path(self.runs_dir) / task / f"seed{seed}" / method),
            max_length=self.max_length,
            freeze=self.freeze,
            progress=False,
            plot=True,
            zero_shot_test=zero_shot_test,
            checkpoint_every=0,  # a grid of short runs: 90–180 MB per MiniLM checkpoint
            **self.hyperparameters[method],
        ).validate()

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        out = asdict(self)
        out["tasks"], out["seeds"], out["methods"] = (
            list(self.tasks),
            list(self.seeds),
            list(self.methods),
        )
        return out


def _records_path(grid: GridConfig) -> Path:
    return Path(grid.runs_dir) / "runs.jsonl"


def read_records(grid: GridConfig) -> list[dict]:
    """The finished runs (one dict per line of ``runs.jsonl``; the last record of a run wins).

    Args:
        grid: the grid.

    Returns:
        Records with keys task, seed, method, test, ...

    Example:
        >>> len(read_records(GridConfig()))  # doctest: +SKIP
        75
    """
    path = _records_path(grid)
    if not path.is_file():
        return []
    latest: dict[tuple, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            latest[(rec["task"], rec["seed"], rec["method"])] = rec
    return list(latest.values())


def _append(grid: GridConfig, record: dict) -> None:
    path = _records_path(grid)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _claim(grid: GridConfig, task: str, seed: int) -> bool:
    claims = Path(grid.runs_dir) / "claims"
    try:
        fd = os.open(claims / f"{task}-{seed}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return True


def _say(worker: int, message: str) -> None:
    print(f"[w{worker} {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run_worker(grid: GridConfig, worker: int = 0, threads: int = 1) -> None:
    """Take (task, seed) pairs from the queue and run every missing method on each.

    Args:
        grid: the grid.
        worker: worker index (for the progress log).
        threads: torch intra-op threads of this process.
    """
    import torch

    from zofast.models import load_model
    from zofast.train import train

    torch.set_num_threads(threads)
    loaded = load_model()
    base = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    done = {(r["task"], r["seed"], r["method"]) for r in read_records(grid)}
    for seed in grid.seeds:
        for task in grid.tasks:
            todo = [m for m in grid.methods if (task, seed, m) not in done]
            need_zero_shot = (task, seed, "zero-shot") not in done
            if not todo and not need_zero_shot:
                continue
            if not _claim(grid, task, seed):
                continue
            for method in todo or grid.methods[:1]:
                config = grid.train_config(task, seed, method, need_zero_shot)
                with torch.no_grad():
                    for n, p in loaded.model.named_parameters():
                        p.copy_(base[n])
                started = time.perf_counter()
                result = train(config, loaded=loaded)
                record = {
                    "task": task,
                    "seed": seed,
                    "method": method,
                    "test": result.test,
                    "best_dev": result.best_dev,
                    "best_step": result.best_step,
                    "zero_shot_dev": result.zero_shot_dev,
                    "steps": result.steps,
                    "forwards": result.forwards,
                    "seconds": time.perf_counter() - started,
                    "train_seconds": result.train_seconds,
                    "threads": threads,
                    "config": config.to_dict(),
                }
                if (task, seed, method) not in done:
                    _append(grid, record)
                    done.add((task, seed, method))
                if need_zero_shot:
                    _append(
                        grid,
                        {
                            "task": task,
                            "seed": seed,
                            "method": "zero-shot",
                            "test": result.zero_shot_test,
                            "best_dev": result.zero_shot_dev,
                        },
                    )
                    done.add((task, seed, "zero-shot"))
                    need_zero_shot = False
                    _say(worker, f"{task} seed {seed} zero-shot: test {result.zero_shot_test:.4f}")
                _say(
                    worker,
                    f"{task} seed {seed} {method}: test {result.test:.4f} (best dev "
                    f"{result.best_dev:.4f} at step {result.best_step}/{result.steps}), "
                    f"{record['seconds']:.0f} s, {result.steps / result.train_seconds:.2f} steps/s",
                )


def run_grid(grid: GridConfig, workers: int = 2, threads: int = 1) -> None:
    """Run the whole grid with ``workers`` processes (resumable).

    Args:
        grid: the grid.
        workers: worker processes.
        threads: torch threads per worker.

    Example:
        >>> run_grid(GridConfig(zo_steps=100), workers=2)  # doctest: +SKIP
    """
    runs = Path(grid.runs_dir)
    (runs / "claims").mkdir(parents=True, exist_ok=True)
    for claim in (runs / "claims").iterdir():
        claim.unlink()
    (runs / "grid.json").write_text(json.dumps(grid.to_dict(), indent=2) + "\n")
    started = time.perf_counter()
    print(
        f"grid: {len(grid.tasks)} tasks x {len(grid.seeds)} seeds x {list(grid.methods)}, "
        f"{grid.zo_steps} ZO steps ({grid.forward_budget} forwards), {workers} workers x "
        f"{threads} threads; records in {_records_path(grid)}",
        flush=True,
    )
    if workers == 1:
        run_worker(grid, 0, threads)
    else:
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "zofast.experiments",
                    "worker",
                    "--grid",
                    str(runs / "grid.json"),
                    "--worker",
                    str(k),
                    "--threads",
                    str(threads),
                ]
            )
            for k in range(workers)
        ]
        codes = [p.wait() for p in procs]
        if any(codes):
            raise SystemExit(f"worker exit codes {codes}")
    print(f"grid done in {(time.perf_counter() - started) / 60:.1f} min", flush=True)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1) of one cell's values; the std is 0 for one.

    The one convention of every experiment report (:data:`STD_NOTE`).

    Args:
        values: accuracies (or differences) over seeds.

    Returns:
        ``(mean, std)``.

    Example:
        >>> mean_std([70.0, 72.0])
        (71.0, 1.4142135623730951)
    """
    mean = sum(values) / len(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


def _cell(cell: dict | None, n_seeds: int) -> str:
    if cell is None:
        return "–"
    text = f"{cell['mean']:.1f} ± {cell['std']:.1f}"
    return text if cell["n"] == n_seeds else f"{text} (n={cell['n']})"


def accuracy_table(
    table: dict[str, dict[str, dict]],
    tasks: Sequence[str],
    methods: Sequence[str],
    n_seeds: int,
    labels: dict[str, str] | None = None,
) -> list[str]:
    """The one results table: tasks as rows, methods as columns, ``mean ± std``, an average row.

    A cell with fewer than ``n_seeds`` runs says ``(n=k)``; the average (of the task means) is
    given for a method that has every task.

    Args:
        table: ``{task: {method: {"mean", "std", "n"}}}`` in %.
        tasks: row order (keys of :data:`TASKS`).
        methods: column order.
        n_seeds: seeds of a complete cell.
        labels: column titles (default: the method names).

    Returns:
        Markdown lines.

    Example:
        >>> accuracy_table({"rte": {"lozo": {"mean": 50.0, "std": 1.0, "n": 5}}},
        ...                ["rte"], ["lozo"], 5)[2]
        '| RTE | 50.0 ± 1.0 |'
    """
    labels = labels or {}
    lines = [
        "| task | " + " | ".join(labels.get(m, m) for m in methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    for task in tasks:
        row = [_cell(table.get(task, {}).get(m), n_seeds) for m in methods]
        lines.append(f"| {TASKS[task]} | " + " | ".join(row) + " |")
    average = []
    for m in methods:
        cells = [table.get(t, {}).get(m) for t in tasks]
        ok = all(c is not None for c in cells)
        average.append(f"{statistics.fmean(c['mean'] for c in cells):.1f}" if ok else "–")
    lines.append("| **average** | " + " | ".join(average) + " |")
    return lines


def summarize(grid: GridConfig, records: list[dict]) -> dict[str, Any]:
    """Means and standard deviations of test accuracy over seeds (:func:`mean_std`, ddof = 1).

    Args:
        grid: the grid.
        records: from :func:`read_records`.

    Returns:
        ``{"table": {task: {method: {...}}}, "average": {...}, "paired": {...}, "timing": {...}}``.
    """
    by = {(r["task"], r["seed"], r["method"]): r for r in records if r.get("test") is not None}
    methods = ["zero-shot", *grid.methods]
    table: dict[str, dict[str, dict]] = {}
    for task in grid.tasks:
        table[task] = {}
        for method in methods:
            accs = [
                100 * by[(task, s, method)]["test"] for s in grid.seeds if (task, s, method) in by
            ]
            if accs:
                mean, std = mean_std(accs)
                table[task][method] = {"mean": mean, "std": std, "n": len(accs), "per_seed": accs}
    average = {}
    for method in methods:
        cells = [table[t][method] for t in grid.tasks if method in table[t]]
        if len(cells) == len(grid.tasks):
            average[method] = {
                "mean": sum(c["mean"] for c in cells) / len(cells),
                "complete": all(c["n"] == len(grid.seeds) for c in cells),
            }
    paired = {}
    for a, b in (("lozo", "mezo"), ("lozo-m", "mezo"), ("lozo-m", "lozo"), ("adam", "lozo")):
        diffs = [
            100 * (by[(t, s, a)]["test"] - by[(t, s, b)]["test"])
            for t in grid.tasks
            for s in grid.seeds
            if (t, s, a) in by and (t, s, b) in by
        ]
        if diffs:
            mean, std = mean_std(diffs)
            paired[f"{a} - {b}"] = {
                "mean": mean,
                "std": std,
                "n": len(diffs),
                "wins": sum(d > 0 for d in diffs),
                "ties": sum(d == 0 for d in diffs),
            }
    timing: dict[str, dict[str, dict]] = {}
    for task in grid.tasks:
        timing[task] = {}
        for method in grid.methods:
            runs = [by[(task, s, method)] for s in grid.seeds if (task, s, method) in by]
            if runs:
                timing[task][method] = {
                    "seconds": sum(r["seconds"] for r in runs) / len(runs),
                    "steps_per_s": sum(r["steps"] / r["train_seconds"] for r in runs) / len(runs),
                    "steps": runs[0]["steps"],
                    "best_step_mean": sum(r["best_step"] for r in runs) / len(runs),
                    "best_at_step0": sum(r["best_step"] == 0 for r in runs),
                }
    return {"table": table, "average": average, "paired": paired, "timing": timing}


_DISCUSSION = "<!-- discussion: text below this line is kept when the report is regenerated -->"


def report(grid: GridConfig, command: str | None = None) -> Path:
    """Write ``results-cpu-100-steps.md`` and ``.json`` (:data:`REPORT`) from the finished runs.

    Text after the discussion marker of an existing report is kept.

    Args:
        grid: the grid.
        command: the command line that ran the grid (shown in the report).

    Returns:
        The path of the ``.md``.
    """
    import torch

    records = read_records(grid)
    summary = summarize(grid, records)
    docs = Path(grid.docs_dir)
    docs.mkdir(parents=True, exist_ok=True)
    machine = {
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    payload = {"grid": grid.to_dict(), "machine": machine, "summary": summary, "runs": records}
    (docs / f"{REPORT}.json").write_text(json.dumps(payload, indent=1) + "\n")

    methods = ["zero-shot", *grid.methods]
    n = len(grid.seeds)
    lines = [
        "# Results: 16-shot SST-2, RTE, TREC with the embedded MiniLM",
        "",
        f"Test accuracy (%) of the best dev checkpoint, mean ± std over seeds "
        f"{', '.join(map(str, grid.seeds))} ({STD_NOTE}). Every trained "
        f"method spends the same forward-pass budget, {grid.forward_budget} forward passes per "
        f"run: {grid.zo_steps} steps of the zeroth-order methods (2 forwards each), "
        f"{grid.forward_budget // 3} Adam steps (1 forward + 1 backward = 3). Batch "
        f"{grid.batch_size}; dev evaluated every {2 * grid.eval_every} forwards; "
        f"frozen: `{grid.freeze}`. Model: all-MiniLM-L6-v2 (encoder scoring: 20 · cosine "
        "to the label descriptions).",
        "",
        *accuracy_table(summary["table"], grid.tasks, methods, n, LABELS),
    ]
    lines += [
        "",
        "Paired differences over (task, seed) pairs, in accuracy points (mean ± sample std "
        "over pairs, ddof = 1):",
        "",
    ]
    lines += ["| comparison | mean ± std | wins / ties / pairs |", "|---|---|---|"]
    for name, p in summary["paired"].items():
        label = " − ".join(LABELS[x] for x in name.split(" - "))
        lines.append(
            f"| {label} | {p['mean']:+.1f} ± {p['std']:.1f} | {p['wins']} / {p['ties']} / "
            f"{p['n']} |"
        )
    lines += [
        "",
        "Wall time per run (mean over seeds; evaluation included) and training speed:",
        "",
        "| task | " + " | ".join(LABELS[m] for m in grid.methods) + " |",
        "|---|" + "---|" * len(grid.methods),
    ]
    for task in grid.tasks:
        cells = []
        for m in grid.methods:
            t = summary["timing"][task].get(m)
            cells.append(
                "–" if t is None else f"{t['seconds']:.0f} s, {t['steps_per_s']:.2f} steps/s"
            )
        lines.append(f"| {TASKS[task]} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Best dev checkpoint at step 0 (the untrained model kept), runs out of {n} per cell:",
        "",
        "| task | " + " | ".join(LABELS[m] for m in grid.methods) + " |",
        "|---|" + "---|" * len(grid.methods),
    ]
    for task in grid.tasks:
        cells = [
            str(summary["timing"][task][m]["best_at_step0"])
            if m in summary["timing"][task]
            else "–"
            for m in grid.methods
        ]
        lines.append(f"| {TASKS[task]} | " + " | ".join(cells) + " |")
    hp = "; ".join(
        f"{LABELS[m]}: " + ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
                                     for k, v in grid.hyperparameters[m].items())
        for m in grid.methods
    )  # fmt: skip
    lines += [
        "",
        f"Hyperparameters: {hp}.",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, Python {machine['python']}, "
        f"torch {machine['torch']}. Runs finished: {len(records)}.",
        "",
        "Commands:",
        "",
        "```bash",
        command
        or (
            f"python -m zofast.experiments run --data-root {grid.data_root} "
            f"--zo-steps {grid.zo_steps} --workers 2 --threads 1"
        ),
        "python -m zofast.experiments report",
        "```",
        "",
        "Per-run logs, plots and trajectories: `runs/grid/<task>/seed<seed>/<method>/`; every "
        f"run as one JSON line: `runs/grid/runs.jsonl`; all numbers: `docs/{REPORT}.json`.",
        "",
        _DISCUSSION,
    ]
    path = docs / f"{REPORT}.md"
    old = path.read_text() if path.is_file() else ""
    kept = old.split(_DISCUSSION, 1)[1] if _DISCUSSION in old else ""
    path.write_text("\n".join(lines) + (kept if kept else "\n"))
    return path


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _grid_from_args(args) -> GridConfig:
    if getattr(args, "grid", None):
        data = json.loads(Path(args.grid).read_text())
        data["tasks"], data["seeds"], data["methods"] = (
            tuple(data["tasks"]),
            tuple(data["seeds"]),
            tuple(data["methods"]),
        )
        return GridConfig(**data)
    grid = GridConfig(
        data_root=args.data_root,
        runs_dir=args.runs_dir,
        docs_dir=args.docs_dir,
        zo_steps=args.zo_steps,
        tasks=tuple(args.tasks),
        seeds=tuple(args.seeds),
        methods=tuple(args.methods),
    )
    saved = Path(args.runs_dir) / "grid.json"
    if args.command == "report" and saved.is_file():
        recorded = _grid_from_args(argparse.Namespace(grid=str(saved)))
        recorded.runs_dir, recorded.docs_dir = args.runs_dir, args.docs_dir
        return recorded
    return grid


def main(argv: list[str] | None = None) -> int:
    """``python -m zofast.experiments run|report|worker|dfo``.

    ``dfo ...`` hands the rest of the arguments to :func:`zofast.dfo.experiments.main`.

    Args:
        argv: arguments (default ``sys.argv[1:]``).

    Returns:
        Exit code.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["dfo"], ["grid"]):  # the DFO-LoRA grid; the GPU grid (zofast.grid)
        from importlib import import_module

        name = "zofast.dfo.experiments" if argv[0] == "dfo" else "zofast.grid.__main__"
        return import_module(name).main(argv[1:]) or 0
    parser = argparse.ArgumentParser(prog="python -m zofast.experiments")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("dfo", add_help=False, help="the DFO-LoRA grid (dfo --help for its options)")
    sub.add_parser("grid", add_help=False, help="the GPU accuracy grid (grid --help)")
    for name in ("run", "report"):
        p = sub.add_parser(name)
        p.add_argument("--data-root", default="../shared/data/k-shot")
        p.add_argument("--runs-dir", default="runs/grid")
        p.add_argument("--docs-dir", default="docs")
        p.add_argument("--zo-steps", type=int, default=GridConfig.zo_steps)
        p.add_argument("--tasks", nargs="+", default=list(TASKS))
        p.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
        p.add_argument("--methods", nargs="+", default=list(METHODS))
        if name == "run":
            p.add_argument("--workers", type=int, default=2)
            p.add_argument("--threads", type=int, default=1)
    p = sub.add_parser("worker")
    p.add_argument("--grid", required=True)
    p.add_argument("--worker", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    grid = _grid_from_args(args)
    if args.command == "worker":
        run_worker(grid, args.worker, args.threads)
    elif args.command == "run":
        for task in grid.tasks:
            if task not in TASKS:
                parser.error(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
            folder = Path(grid.data_root) / TASKS[task]
            if not folder.is_dir():
                parser.error(f"data folder not found: {folder}")
        run_grid(grid, args.workers, args.threads)
    else:
        print(report(grid))
    return 0


if __name__ == "__main__":
    sys.exit(main())
