"""The grid's curves: dev accuracy and training loss against forward passes, one PNG per task.

Each line is one variant in one dtype (float32 solid, bfloat16 dashed), the mean over the seeds
that reached that point (a diverged run stops contributing where it stopped). The forward axis is
logarithmic, so the 1,000-step first-order runs (3,000 forwards) and the 40,000-forward ones both
show; the zero-shot dev accuracy (forward 0) is the dotted line. Drawn on matplotlib's Agg canvas
without pyplot, like :mod:`zofast.plot`.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from zofast.grid.protocol import TASKS, Protocol


def _mean_curve(runs: list[dict], name: str) -> tuple[list[float], list[float]]:
    points: dict[float, list[float]] = {}
    for r in runs:
        for x, y in r["curves"][name]:
            if x > 0 and y is not None:
                points.setdefault(x, []).append(y)
    xs = sorted(points)
    return xs, [statistics.fmean(points[x]) for x in xs]


def task_curves(protocol: Protocol, final: list[dict], task: str, path: str | Path) -> Path:
    """Draw one task's curves from its final-stage records.

    Args:
        protocol: the grid (variant order and labels).
        final: final-stage records (any tasks; this task's are drawn).
        task: the task.
        path: the PNG to write.

    Returns:
        ``path``.

    Example:
        >>> task_curves(Protocol(), records, "rte", "docs/grid/curves-rte.png")  # doctest: +SKIP
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5))
    FigureCanvasAgg(fig)
    dev_ax, loss_ax = fig.subplots(1, 2)
    colors = iter(f"C{i}" for i in range(20))
    for v in protocol.variants:
        runs = [r for r in final if r["task"] == task and r["variant"] == v.name]
        if v.method == "zero-shot":
            if runs:
                level = statistics.fmean(r["dev_acc"] for r in runs)
                dev_ax.axhline(100 * level, color="gray", linestyle=":", label="zero-shot")
            continue
        color = next(colors)
        for dtype in v.dtypes:
            these = [r for r in runs if r["dtype"] == dtype and r.get("curves")]
            if not these:
                continue
            style = "-" if dtype == "float32" else "--"
            label = v.label + ("" if dtype == "float32" else " bf16")
            xs, ys = _mean_curve(these, "dev")
            dev_ax.plot(
                xs, [100 * y for y in ys], style, color=color, label=label, marker=".", ms=3
            )
            xs, ys = _mean_curve(these, "loss")
            loss_ax.plot(xs, ys, style, color=color, label=label, marker=".", ms=3)
    for ax, title in ((dev_ax, "dev accuracy (%)"), (loss_ax, "training loss")):
        ax.set_xscale("log")
        ax.set_xlabel("forward passes (a first-order step counts 3)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    loss_ax.set_yscale("log")
    dev_ax.legend(fontsize=7, ncol=2)
    fig.suptitle(f"{TASKS.get(task, task)} 16-shot, MiniLM: mean over seeds")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
