"""Plots of a run's JSONL log: training loss and dev accuracy against steps.

Figures are drawn on matplotlib's Agg canvas directly (``matplotlib.figure.Figure``), without
pyplot, so importing or calling this module never changes the backend or global state of a
program that uses matplotlib itself, and works on machines without a display.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["read_log", "plot_run"]


def read_log(path: str | Path) -> list[dict]:
    """Read a JSONL log written by :func:`zofast.train.train`.

    Args:
        path: the ``log.jsonl`` file.

    Returns:
        The events, one dict per line, in order (blank lines skipped).

    Example:
        >>> events = read_log("runs/demo/log.jsonl")
        >>> events[0]["event"]
        'config'
    """
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_run(log: str | Path | list[dict], out: str | Path, *, title: str | None = None) -> Path:
    """Draw training loss (left) and dev accuracy (right) of one run into a PNG.

    The loss panel shows the mean loss of each logged window; the accuracy panel shows every dev
    evaluation, the zero-shot level (dashed) and the best checkpoint (star).

    Args:
        log: a ``log.jsonl`` path or the events from :func:`read_log`.
        out: PNG path to write.
        title: figure title; default ``"<method> on <task>"`` from the log's config.

    Returns:
        ``out`` as a Path.

    Example:
        >>> plot_run("runs/demo/log.jsonl", "runs/demo/curves.png")
        PosixPath('runs/demo/curves.png')
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    events = read_log(log) if isinstance(log, (str, Path)) else list(log)
    config = next((e for e in events if e.get("event") == "config"), {})
    train = [e for e in events if e.get("event") == "train"]
    evals = [e for e in events if e.get("event") == "eval"]
    zero = next((e for e in events if e.get("event") == "zero_shot"), {})
    final = next((e for e in events if e.get("event") == "final"), {})

    fig = Figure(figsize=(10, 3.8), dpi=100)
    FigureCanvasAgg(fig)
    ax_loss, ax_acc = fig.subplots(1, 2)
    if train:
        ax_loss.plot([e["step"] for e in train], [e["loss"] for e in train], lw=1.2)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss (window mean)")
    ax_loss.grid(alpha=0.3)

    points = []
    if zero.get("dev_acc") is not None:
        points.append((0, zero["dev_acc"]))
    points += [(e["step"], e["dev_acc"]) for e in evals]
    if points:
        ax_acc.plot([s for s, _ in points], [a for _, a in points], marker="o", ms=3, lw=1.2)
    if zero.get("dev_acc") is not None:
        ax_acc.axhline(zero["dev_acc"], ls="--", color="gray", lw=1, label="zero-shot dev")
    if final.get("best_dev") is not None:
        ax_acc.plot(
            [final["best_step"]],
            [final["best_dev"]],
            marker="*",
            ms=12,
            color="C3",
            ls="",
            label=f"best dev (step {final['best_step']})",
        )
    if final.get("test_acc") is not None:
        ax_acc.set_title(f"test accuracy of best: {final['test_acc']:.3f}", fontsize=9)
    ax_acc.set_xlabel("step")
    ax_acc.set_ylabel("dev accuracy")
    ax_acc.grid(alpha=0.3)
    if ax_acc.get_legend_handles_labels()[0]:
        ax_acc.legend(fontsize=8, loc="lower right")
    if title is None and config:
        title = f"{config.get('method')} on {config.get('task')}"
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out
