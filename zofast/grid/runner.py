"""A resumable, time-boxed runner of grid cells on one machine (one GPU, many processes).

:func:`run` plans the cells of a stage that no given record holds (:func:`pending`), longest
first, and starts ``workers`` processes. Each loads the model once per dtype, takes the next cell
from a shared counter, resets the model to its base weights, trains (:func:`zofast.train.train`:
no plot, no checkpoint files, the best dev weights kept in memory, its log in a temporary folder
read back for the curves) and appends one record (:mod:`zofast.grid.records`). A worker takes no
cell after ``deadline``, and none whose estimated time (:func:`estimate`, plus 10 %) would run
past ``end``; a shorter cell further down the queue may still fit. Zeroth-order cells are not
held back by their estimate: at ``end`` they pause and append a partial record, and the next
call resumes them first, by replay (:mod:`zofast.grid.resume`). A cell that raises is reported
and not recorded; the worker reloads its model and goes on.
"""

from __future__ import annotations

import multiprocessing
import platform
import statistics
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from zofast.grid import records as rec
from zofast.grid import resume
from zofast.grid.protocol import TASKS, Cell, Protocol
from zofast.grid.selection import choose, chosen_lrs


@dataclass
class Settings:
    """What one call of the runner does.

    Args:
        stage: ``"select"`` or ``"final"``.
        out: the records file this call appends to (one JSON line per finished run).
        data_root: folder of ``SST-2/16-<seed>``, ``RTE/16-<seed>``, ``trec/16-<seed>``.
        model: model folder; None = the embedded MiniLM.
        device: ``"cuda"``, ``"cpu"``, ...
        commit: the commit the code is at (every record names it).
        workers: worker processes; 0 = run the cells in this process (tests, debugging).
        threads: torch intra-op threads per worker.
        deadline: seconds from the start after which no cell starts.
        end: seconds from the start by which a started cell should be done (skips cells whose
            estimate does not fit); None = no estimate check.
        records: record files or folders of earlier calls: their cells are not run again (and,
            for the final stage, their select runs give the chosen lrs).
        protocol: the grid.
        only: filters: ``tasks``, ``seeds``, ``variants``, ``dtypes`` → allowed values.
        rerun: run cells that ``records`` already hold (they still give the chosen lrs); only
            ``out``'s own records are skipped.
        compile: ``torch.compile`` the transformer of the float32 zeroth-order cells
            (:class:`~zofast.train.TrainConfig`'s ``compile``; records say ``"compiled"``).
    """

    stage: str
    out: str
    data_root: str
    model: str | None = None
    device: str = "cuda"
    commit: str = "unknown"
    workers: int = 1
    threads: int = 1
    deadline: float = float("inf")
    end: float | None = None
    records: tuple[str, ...] = ()
    protocol: Protocol = field(default_factory=Protocol)
    only: dict[str, tuple] = field(default_factory=dict)
    rerun: bool = False
    compile: bool = False


def _wanted(cell: Cell, only: dict[str, tuple]) -> bool:
    values = {
        "tasks": cell.task,
        "seeds": cell.seed,
        "variants": cell.variant.name,
        "dtypes": cell.dtype,
    }
    return all(values[k] in allowed for k, allowed in only.items() if allowed)


def _sources(settings: Settings) -> list[str]:
    """The record files whose cells are not run again (and whose partial records resume)."""
    return [settings.out] if settings.rerun else [*settings.records, settings.out]


def pending(settings: Settings) -> tuple[list[Cell], list[dict]]:
    """The cells still to run (in order: those with a partial record first) and the records
    read (given ones and ``out``'s)."""
    done = rec.read([*settings.records, settings.out])
    chosen = chosen_lrs(choose(settings.protocol, done)) if settings.stage == "final" else None
    skip = rec.read([settings.out]) if settings.rerun else done
    finished = {rec.key(r) for r in skip}
    cells = [
        c
        for c in settings.protocol.cells(settings.stage, chosen)
        if c.key not in finished and _wanted(c, settings.only)
    ]
    paused = partials(settings, cells)
    return sorted(cells, key=lambda c: c.key not in paused), done


def partials(settings: Settings, cells: list[Cell]) -> dict[tuple, dict]:
    """Cell key → the partial record it resumes from (:func:`zofast.grid.resume.latest`)."""
    return resume.latest(_sources(settings), cells)


def estimate(cell: Cell, done: list[dict]) -> float | None:
    """Wall seconds the cell should take, from earlier runs of the same task, method, rank and
    dtype at any step count (a ``--scale`` rehearsal times the real grid): the median training
    seconds per step times its steps, plus the median of the rest (evaluations, setup: the same
    number of evaluations at any scale, since the period scales with the steps).

    Example:
        >>> cell = Protocol().cells("select")[0]
        >>> estimate(cell, [{"task": "rte", "method": "lozo-m", "rank": 2, "dtype": "float32",
        ...                  "steps_run": 100, "train_seconds": 2.0, "seconds": 5.0}])
        403.0
    """
    v = cell.variant
    same = [
        r
        for r in done
        if (r["task"], r["method"], r["rank"], r["dtype"])
        == (cell.task, v.method, v.rank, cell.dtype)
        and "seconds" in r
    ]
    if not same:
        return None
    rest = statistics.median(r["seconds"] - r.get("train_seconds", 0.0) for r in same)
    rates = [r["train_seconds"] / r["steps_run"] for r in same if r.get("steps_run")]
    return rest + (statistics.median(rates) * v.steps if rates and v.steps else 0.0)


def run(settings: Settings) -> int:
    """Run the pending cells of ``settings.stage`` until done or out of time.

    Returns:
        The number of records this call appended.

    Example:
        >>> run(Settings("select", "out/runs.jsonl", ".carry/k-shot", workers=16))  # doctest: +SKIP
    """
    for task in settings.protocol.tasks:
        folder = Path(settings.data_root) / TASKS[task]
        if not folder.is_dir():
            raise FileNotFoundError(f"data folder not found: {folder}")
    cells, done = pending(settings)
    estimates = [estimate(c, done) for c in cells]
    paused = partials(settings, cells)
    Path(settings.out).parent.mkdir(parents=True, exist_ok=True)
    before = len(rec.read([settings.out]))
    started = time.time()
    _say(
        "main",
        f"{settings.stage}: {len(cells)} cells to run ({len(paused)} resumed) with "
        f"{settings.workers} workers; "
        f"deadline {settings.deadline:.0f} s, end {settings.end} s; records in {settings.out}",
    )
    if not cells:
        return 0
    counter = multiprocessing.get_context("spawn").Value("i", 0)
    job = (settings, cells, estimates, paused, counter, started)
    if settings.workers == 0:
        _work(0, *job)
    else:
        context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
        procs = [context.Process(target=_work, args=(k, *job)) for k in range(settings.workers)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        codes = [p.exitcode for p in procs]
        if any(codes):
            _say("main", f"worker exit codes {codes}")
    added = len(rec.read([settings.out])) - before
    _say("main", f"{added} runs recorded in {time.time() - started:.0f} s")
    return added


def _say(who, message: str) -> None:
    print(f"[{who} {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _work(index, settings: Settings, cells, estimates, paused, counter, started) -> None:
    import torch

    from zofast.train import ZO_METHODS

    torch.set_num_threads(settings.threads)
    models = _Models(settings)
    while True:
        with counter.get_lock():
            i = counter.value
            counter.value += 1
        if i >= len(cells) or time.time() - started >= settings.deadline:
            return
        cell, guess, partial = cells[i], estimates[i], paused.get(cells[i].key)
        stop = None
        if settings.end is not None and cell.variant.method in ZO_METHODS:
            stop = lambda: time.time() - started >= settings.end  # noqa: E731
        late = settings.end is not None and guess is not None and stop is None
        if late and time.time() - started + 1.1 * guess > settings.end:
            _say(index, f"skip {cell.describe()}: about {guess:.0f} s, past the end")
            continue
        at = f" from step {partial['steps_run']}" if partial else ""
        _say(index, f"start {cell.describe()}{at}")
        try:
            record = run_cell(cell, settings, models, partial, stop, say=lambda m: _say(index, m))
        except Exception:  # noqa: BLE001 - one bad cell must not stop the others
            _say(index, f"FAILED {cell.describe()}:\n{traceback.format_exc()}")
            models.drop(cell.dtype)
            continue
        rec.append(settings.out, record)
        if record.get("partial"):
            _say(index, f"paused {cell.describe()} at step {record['steps_run']}")
            continue
        _say(
            index,
            f"done {cell.describe()}: dev {record['dev_acc']:.4f} test {record['test_acc']:.4f}"
            f", {record['seconds']:.0f} s, {record['steps_per_s'] or 0:.1f} steps/s",
        )


class _Models:
    """A worker's models, one per dtype, each with a copy of its base weights."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.cache: dict[str, tuple] = {}

    def get(self, dtype: str):
        """The model of ``dtype`` holding its base weights."""
        import torch

        from zofast.models import load_model

        if dtype not in self.cache:
            s = self.settings
            loaded = load_model(s.model, dtype=dtype, device=s.device)
            base = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
            self.cache[dtype] = (loaded, base)
        loaded, base = self.cache[dtype]
        with torch.no_grad():
            for n, p in loaded.model.named_parameters():
                p.copy_(base[n])
        return loaded

    def drop(self, dtype: str) -> None:
        """Forget a model (it is loaded again when next asked for)."""
        self.cache.pop(dtype, None)

    def check(self, dtype: str) -> None:
        """Drop a model a run left hooks on (DFO-LoRA's adapters are forward hooks)."""
        model = self.cache[dtype][0].model
        if any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()):
            self.drop(dtype)


def run_cell(
    cell: Cell, settings: Settings, models: _Models, partial=None, stop=None, say=print
) -> dict:
    """Train one cell (from its ``partial`` record if given; ``stop``: when to pause it) and
    return its record (:mod:`zofast.grid.report` reads these fields), or its partial record."""
    import torch

    from zofast.train.loop import _finite
    from zofast.train.pause import Paused

    loaded = models.get(cell.dtype)
    v = cell.variant
    with tempfile.TemporaryDirectory(prefix="zofast-grid-") as folder:
        config = cell.train_config(
            settings.protocol, settings.data_root, settings.model, folder, settings.compile
        )
        began = time.perf_counter()
        result = resume.train_cell(config, loaded, partial, stop, say)
        call = {"commit": settings.commit, "steps_run": result.steps}
        calls = [
            *(partial or {}).get("calls", []),
            {**call, "seconds": time.perf_counter() - began},
        ]
        if isinstance(result, Paused):
            return resume.record(cell, settings.stage, result, calls)
        cost = result.forwards / result.steps if result.steps else 0
        curves = _curves(Path(folder) / "log.jsonl", cost)
    models.check(cell.dtype)
    seconds = sum(c["seconds"] for c in calls)
    zero_shot = v.method == "zero-shot"
    record = {
        **rec.cell_fields(cell),
        "forwards": result.forwards,
        "lr": cell.lr,
        "dev_acc": result.best_dev,
        "test_acc": result.zero_shot_test if zero_shot else result.test,
        "seconds": seconds,
        "device": _device_name(settings.device),
        "commit": settings.commit,
        "stage": settings.stage,
        "variant": v.name,
        "steps_run": result.steps,
        "train_seconds": result.train_seconds,
        "steps_per_s": result.steps / result.train_seconds if result.train_seconds else None,
        "best_step": result.best_step,
        "zero_shot_dev": result.zero_shot_dev,
        "diverged": result.diverged,
        "eval_every": v.eval_every,
        "batch_size": settings.protocol.batch_size,
        "eps": config.eps if v.method in ("mezo", "lozo", "lozo-m") else None,
        "mode": config.resolved_mode if v.method in ("mezo", "lozo", "lozo-m") else None,
        "compiled": config.compile,
        "workers": settings.workers,
        "torch": torch.__version__,
        "calls": calls,
        "curves": curves,
    }
    return _finite(record)


def _curves(log: Path, cost: float) -> dict[str, list]:
    """Dev accuracy per evaluation (step 0 included) and the logged training losses, against
    forwards (``cost`` forwards per step)."""
    import json

    dev, loss = [], []
    for line in log.read_text(encoding="utf-8").splitlines():
        event = json.loads(line)
        kind = event["event"]
        if kind == "zero_shot" and event.get("dev_acc") is not None:
            dev.append([0, round(event["dev_acc"], 5)])
        elif kind == "eval":
            dev.append([round(event["step"] * cost), round(event["dev_acc"], 5)])
        elif kind == "train" and event["loss"] is not None:
            loss.append([round(event["step"] * cost), round(event["loss"], 5)])
    return {"dev": dev, "loss": loss}


def _device_name(device: str) -> str:
    import torch

    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    from zofast.experiments import _cpu_name

    return f"{_cpu_name()} ({platform.machine()})"
