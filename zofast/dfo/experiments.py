"""DFO-LoRA few-shot experiments: zero-shot vs DFO-LoRA variants on LM-BFF 16-shot splits.

Methods (:data:`METHODS`):

* ``zero-shot``: the model as it is;
* ``dfo-lora``: CMA-ES and FWA alternating by round, ``init="hidden"`` (the default);
* ``cma``: CMA-ES only; ``fwa``: FWA only (both ``init="hidden"``);
* ``dfo-lora-random``: alternating, ``init="random"`` (projection-init ablation).

Every run searches on the 16-shot ``train`` split, picks the snapshot with the best ``dev``
accuracy and reports accuracy on ``test``. The model is loaded once; each run attaches a fresh
:class:`~zofast.dfo.lora.DFOLoRA` and removes it afterwards. Results are written after every run
to ``results.json`` (every run, with timings) and ``results.md`` (the experiment runner's one
table, :func:`zofast.experiments.accuracy_table`: mean ± sample std over seeds, ddof = 1, in %);
runs already in ``results.json`` are skipped, so an interrupted grid can be continued. Each run's
JSONL search log goes to ``logs/``. Tasks and seeds are the runner's
(:data:`zofast.experiments.TASKS`, :data:`zofast.experiments.SEEDS`).

Command line (defaults: the embedded MiniLM, the three tasks, the five seeds, every method,
budget 8000); ``python -m zofast.experiments dfo`` is the same command::

    python -m zofast.dfo.experiments --out runs/dfo-exp --tasks sst-2 --seeds 13 21 42 87 100 \
        --methods zero-shot dfo-lora

Example:
    >>> rows = run_grid(["sst-2"], [42], ["zero-shot", "dfo-lora"], out="runs/x", budget=2000)
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from zofast.data import load_kshot
from zofast.dfo.lora import DFOLoRA
from zofast.experiments import SEEDS, STD_NOTE, TASKS, accuracy_table, mean_std
from zofast.models import LoadedModel, default_model_path, load_model
from zofast.scoring import Scorer

__all__ = ["METHODS", "TASK_FOLDERS", "SEEDS", "run_grid", "summarise", "main"]

METHODS = {
    "zero-shot": None,
    "dfo-lora": {"optimizers": ("cma", "fwa"), "init": "hidden"},
    "cma": {"optimizers": ("cma",), "init": "hidden"},
    "fwa": {"optimizers": ("fwa",), "init": "hidden"},
    "dfo-lora-random": {"optimizers": ("cma", "fwa"), "init": "random"},
}
"""Method name → DFOLoRA arguments (``None``: no search)."""

TASK_FOLDERS = TASKS
"""Task name → folder under ``<data>/k-shot`` (the runner's :data:`zofast.experiments.TASKS`)."""

DEFAULT_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
"""``../shared/data`` beside the repository (where the project keeps the k-shot data)."""

TEST_BATCH = 64
"""Examples per forward when measuring test accuracy."""


def _load_results(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return json.loads(path.read_text())["runs"]


def summarise(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Mean and std (over seeds) of test accuracy per method and task.

    Args:
        runs: records as written to ``results.json``.

    Returns:
        ``{method: {task: {"mean": %, "std": %, "n": seeds, "dev": mean dev %}}}`` (sample std,
        ddof = 1, :func:`zofast.experiments.mean_std`; 0 with one seed).

    Example:
        >>> summarise([{"method": "zero-shot", "task": "sst-2", "test_acc": 0.7, "dev_acc": 0.6}])
        {'zero-shot': {'sst-2': {'mean': 70.0, 'std': 0.0, 'n': 1, 'dev': 60.0}}}
    """
    groups: dict[str, dict[str, list[dict]]] = {}
    for r in runs:
        groups.setdefault(r["method"], {}).setdefault(r["task"], []).append(r)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for method, tasks in groups.items():
        for task, rs in tasks.items():
            accs = [100 * r["test_acc"] for r in rs]
            devs = [100 * r["dev_acc"] for r in rs if r.get("dev_acc") is not None]
            mean, std = mean_std(accs)
            out.setdefault(method, {})[task] = {
                "mean": mean,
                "std": std,
                "n": len(accs),
                "dev": statistics.fmean(devs) if devs else math.nan,
            }
    return out


def _markdown(runs: Sequence[dict[str, Any]], meta: dict[str, Any]) -> str:
    summary = summarise(runs)
    tasks = [t for t in TASK_FOLDERS if any(t in v for v in summary.values())]
    methods = [m for m in METHODS if m in summary]
    table = {t: {m: summary[m][t] for m in methods if t in summary[m]} for t in tasks}
    n_seeds = max((c["n"] for row in table.values() for c in row.values()), default=0)
    lines = [
        "# DFO-LoRA few-shot results",
        "",
        f"Model: {meta['model']} ({meta['dtype']}, {meta['device']}). Budget {meta['budget']} "
        f"calls, popsize {meta['popsize']}, rank {meta['rank']}, intrinsic dim "
        f"{meta['intrinsic_dim']}, sigma {meta['sigma']}, alpha {meta['alpha']}. Test accuracy "
        f"(%) of the best-dev snapshot, mean ± std over data seeds ({STD_NOTE}; a cell with "
        "fewer seeds than the others says n).",
        "",
        *accuracy_table(table, tasks, methods, n_seeds),
    ]
    secs = [r["seconds"] for r in runs if r["method"] != "zero-shot"]
    if secs:
        lines += [
            "",
            f"Search runs: {len(secs)}, {statistics.fmean(secs):.1f} s per run on average "
            f"(search + dev/test evaluation).",
        ]
    return "\n".join(lines) + "\n"


def run_grid(
    tasks: Sequence[str],
    seeds: Sequence[int],
    methods: Sequence[str],
    *,
    out: str | Path,
    budget: int = 8000,
    data: str | Path = DEFAULT_DATA,
    model: str | Path | LoadedModel | None = None,
    device: str | None = None,
    dtype: str | None = None,
    popsize: int = 20,
    rank: int = 4,
    intrinsic_dim: int = 500,
    sigma: float = 1.0,
    alpha: float | None = None,
    search_seed: int = 0,
    length_buckets: int = 1,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Run (or continue) a grid of tasks × data seeds × methods and write the results.

    Args:
        tasks: names in :data:`TASK_FOLDERS`.
        seeds: data seeds (folders ``16-<seed>``).
        methods: names in :data:`METHODS`.
        out: output folder (``results.json``, ``results.md``, ``logs/``).
        budget: calls per search.
        data: folder holding ``k-shot/<TASK>/16-<seed>``.
        model: a LoadedModel, a path, or ``None`` for the embedded MiniLM.
        device: where to run (default: the model's device, or CUDA when available).
        dtype: model dtype for a path (``None``: as saved).
        popsize, rank, intrinsic_dim, sigma: DFOLoRA settings.
        alpha: DFOLoRA ``alpha`` (``None``: its default).
        search_seed: DFOLoRA ``seed`` (the same for every run; data seeds vary).
        length_buckets: DFOLoRA ``length_buckets``.
        progress: tqdm bars.

    Returns:
        Every run record (earlier ones included).

    Example:
        >>> run_grid(["rte"], [13], ["zero-shot"], out="runs/rte")[0]["test_acc"]
        0.527...
    """
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {list(METHODS)}")
    for t in tasks:
        if t not in TASK_FOLDERS:
            raise ValueError(f"unknown task {t!r}; choose from {list(TASK_FOLDERS)}")
    out = Path(out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    if isinstance(model, LoadedModel):
        loaded = model
    else:
        if device is None:
            device = "cuda" if torch.cuda.is_available() else None
        loaded = load_model(model or default_model_path(), device=device, dtype=dtype)
    extra = {} if alpha is None else {"alpha": alpha}
    probe = DFOLoRA(loaded, rank=rank, intrinsic_dim=intrinsic_dim, popsize=popsize, **extra)
    meta = {
        "model": "all-MiniLM-L6-v2 (embedded default)"
        if model is None
        else (Path(loaded.name).name or loaded.name),
        "dtype": str(loaded.dtype).replace("torch.", ""),
        "device": str(loaded.device),
        "budget": budget,
        "popsize": popsize,
        "rank": rank,
        "intrinsic_dim": intrinsic_dim,
        "sigma": sigma,
        "alpha": probe.alpha,
        "search_seed": search_seed,
        "length_buckets": length_buckets,
        "torch": torch.__version__,
    }
    probe.remove()
    results_path = out / "results.json"
    runs = _load_results(results_path)
    done = {(r["task"], r["seed"], r["method"]) for r in runs}
    for task in tasks:
        for seed in seeds:
            split = load_kshot(Path(data) / "k-shot" / TASK_FOLDERS[task] / f"16-{seed}", task)
            scorer = Scorer(loaded, task)
            for method in methods:
                if (task, seed, method) in done:
                    continue
                start = time.perf_counter()
                record: dict[str, Any] = {"task": task, "seed": seed, "method": method}
                args = METHODS[method]
                if args is None:
                    record["dev_acc"] = scorer.accuracy(split["dev"], TEST_BATCH)
                    record["test_acc"] = scorer.accuracy(split["test"], TEST_BATCH)
                else:
                    dfo = DFOLoRA(
                        loaded,
                        rank=rank,
                        intrinsic_dim=intrinsic_dim,
                        popsize=popsize,
                        sigma=sigma,
                        seed=search_seed,
                        length_buckets=length_buckets,
                        **args,
                        **extra,
                    )
                    try:
                        res = dfo.fit(
                            split["train"],
                            split["dev"],
                            budget=budget,
                            scorer=scorer,
                            log=out / "logs" / f"{task}-{seed}-{method}.jsonl",
                            progress=progress,
                        )
                        record["test_acc"] = scorer.accuracy(split["test"], TEST_BATCH)
                    finally:
                        dfo.remove()
                    record.update(
                        dev_acc=res.best_dev_acc,
                        best_calls=res.best_calls,
                        train_loss=res.train_loss,
                        start_loss=res.history[0]["loss"] if res.history else None,
                        calls=res.calls,
                        search_seconds=res.elapsed,
                        mode=res.mode,
                    )
                record["seconds"] = time.perf_counter() - start
                runs.append(record)
                results_path.write_text(json.dumps({"meta": meta, "runs": runs}, indent=1))
                (out / "results.md").write_text(_markdown(runs, meta))
                print(json.dumps(record), flush=True)
    return runs


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point (see the module docstring).

    Args:
        argv: arguments (default: ``sys.argv[1:]``).

    Example:
        >>> main(["--out", "runs/x", "--tasks", "sst-2", "--seeds", "42", "--budget", "401"])
    """
    p = argparse.ArgumentParser(prog="python -m zofast.experiments dfo", description=__doc__)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--tasks", nargs="+", default=list(TASK_FOLDERS), choices=list(TASK_FOLDERS))
    p.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--budget", type=int, default=8000)
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--model", default=None, help="model folder (default: embedded MiniLM)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--popsize", type=int, default=20)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--intrinsic-dim", type=int, default=500)
    p.add_argument("--sigma", type=float, default=1.0)
    p.add_argument("--alpha", type=float, default=None)
    p.add_argument("--search-seed", type=int, default=0)
    p.add_argument("--length-buckets", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU")
    p.add_argument("--progress", action="store_true")
    a = p.parse_args(argv)
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    run_grid(
        a.tasks,
        a.seeds,
        a.methods,
        out=a.out,
        budget=a.budget,
        data=a.data,
        model=a.model,
        device=a.device,
        dtype=a.dtype,
        popsize=a.popsize,
        rank=a.rank,
        intrinsic_dim=a.intrinsic_dim,
        sigma=a.sigma,
        alpha=a.alpha,
        search_seed=a.search_seed,
        length_buckets=a.length_buckets,
        progress=a.progress,
    )
    print((Path(a.out) / "results.md").read_text())


if __name__ == "__main__":
    main()
