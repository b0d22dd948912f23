"""Choosing each variant's learning rate on dev (the select stage's records).

For a variant, every lr of its grid is scored by the mean best-dev accuracy of its float32 runs
on every task and every select seed (3 tasks × 2 seeds: 6 runs, each weighing the same). The lr
with the highest mean wins; means within 1e-9 of each other are a tie, won by the smaller lr (the
more conservative step; dev sets of 32 examples tie often). A variant is chosen only when every
one of its select runs is there; the test split is never looked at.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from zofast.grid.protocol import Protocol
from zofast.grid.records import key

TIE = 1e-9
"""Mean best-dev accuracies closer than this are equal."""


@dataclass
class Choice:
    """The selection of one variant.

    Args:
        lr: the chosen lr; None while select runs are missing.
        scores: lr → mean best-dev accuracy over the runs found (fraction).
        runs: lr → number of runs found.
        needed: runs per lr for a choice.
        edge: whether the chosen lr is the smallest or largest of the grid (the best may lie
            outside it).
    """

    lr: float | None
    scores: dict[float, float] = field(default_factory=dict)
    runs: dict[float, int] = field(default_factory=dict)
    needed: int = 0
    edge: bool = False


def choose(protocol: Protocol, records: list[dict]) -> dict[str, Choice]:
    """Each lr-grid variant's :class:`Choice` from the select-stage records.

    Args:
        protocol: the grid.
        records: run records (any stage; only the select cells' keys are looked up).

    Returns:
        variant name → Choice.

    Example:
        >>> choose(Protocol(), [])["mezo-20000"].lr is None
        True
    """
    by_key = {key(r): r for r in records}
    out = {}
    for v in protocol.variants:
        if not v.lrs:
            continue
        scores, runs = {}, {}
        for lr in v.lrs:
            accs = [
                by_key[k]["dev_acc"]
                for t in protocol.tasks
                for s in protocol.select_seeds
                if (k := (t, s, v.method, v.rank, "float32", v.steps, lr)) in by_key
                and by_key[k].get("dev_acc") is not None
            ]
            runs[lr] = len(accs)
            if accs:
                scores[lr] = statistics.fmean(accs)
        needed = len(protocol.tasks) * len(protocol.select_seeds)
        lr = None
        if all(runs[x] == needed for x in v.lrs):
            best = max(scores.values())
            lr = min(x for x in v.lrs if scores[x] >= best - TIE)
        edge = lr is not None and lr in (min(v.lrs), max(v.lrs))
        out[v.name] = Choice(lr, scores, runs, needed, edge)
    return out


def chosen_lrs(choices: dict[str, Choice]) -> dict[str, float]:
    """variant name → chosen lr, for the variants that have one."""
    return {name: c.lr for name, c in choices.items() if c.lr is not None}
