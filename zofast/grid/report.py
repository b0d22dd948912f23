"""docs/results.md and docs/results.json from the grid's records (:func:`write`).

What is reported (issue 15): the lr grid and the choice per variant; test accuracy of the best dev
checkpoint, mean ± sample std over seeds (ddof = 1, :data:`zofast.experiments.STD_NOTE`) per task
and variant, float32 and bfloat16; paired differences over (task, seed) with 95 % t intervals
(LOZO − MeZO, LOZO − first order, bf16 − fp32); steps/s; the goals, met or not; the curves; the
commands and commits. Only final-stage cells count in the tables (select runs at other lrs feed
the selection only). A partial grid reports what it has and lists what is missing. Text below the
discussion marker of an existing results.md is kept.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from zofast.experiments import STD_NOTE, accuracy_table, mean_std
from zofast.grid.plots import task_curves
from zofast.grid.protocol import TASKS, Protocol
from zofast.grid.records import key
from zofast.grid.selection import choose, chosen_lrs
from zofast.grid.stats import paired

DISCUSSION = "<!-- discussion: text below this line is kept when the report is regenerated -->"

#: (a, b, dtype of a, dtype of b): the paired comparisons reported, by variant name.
COMPARISONS = (
    ("lozo-r2-20000", "mezo-20000", "float32", "float32"),
    ("lozo-r2-20000", "mezo-20000", "bfloat16", "bfloat16"),
    ("lozo-r4-20000", "mezo-20000", "float32", "float32"),
    ("lozo-r4-20000", "mezo-20000", "bfloat16", "bfloat16"),
    ("lozo-m-r2-20000", "mezo-20000", "float32", "float32"),
    ("lozo-m-r2-20000", "mezo-20000", "bfloat16", "bfloat16"),
    ("lozo-r2-20000", "adam-13333", "float32", "float32"),
    ("lozo-r2-20000", "adam-13333", "bfloat16", "float32"),
    ("lozo-r2-20000", "adam-1000", "float32", "float32"),
    ("lozo-r2-20000", "lora-r8-13333", "float32", "float32"),
)
LOZO, MEZO, ADAM = "lozo-r2-20000", "mezo-20000", "adam-13333"


def summarize(protocol: Protocol, records: list[dict]) -> dict:
    """Every number of the report (accuracies in %).

    Args:
        protocol: the grid.
        records: every record read (both stages).

    Returns:
        ``{"selection", "table", "comparisons", "precision", "speed", "goals", "missing",
        "final"}``; ``final`` holds the final-stage records found.
    """
    choices = choose(protocol, records)
    chosen = chosen_lrs(choices)
    by_key = {key(r): r for r in records}
    cells = protocol.cells("final", chosen)
    final = [by_key[c.key] for c in cells if c.key in by_key]
    acc = {(r["task"], r["seed"], r["variant"], r["dtype"]): 100 * r["test_acc"] for r in final}
    table: dict[str, dict] = {}
    for dtype in ("float32", "bfloat16"):
        table[dtype] = {}
        for task in protocol.tasks:
            row = table[dtype][task] = {}
            for v in protocol.variants:
                values = [acc[k] for s in protocol.seeds if (k := (task, s, v.name, dtype)) in acc]
                if values:
                    mean, std = mean_std(values)
                    row[v.name] = {"mean": mean, "std": std, "n": len(values), "per_seed": values}

    def diffs(a, b, da, db):
        pairs = [(t, s) for t in protocol.tasks for s in protocol.seeds]
        return [
            acc[(t, s, a, da)] - acc[(t, s, b, db)]
            for t, s in pairs
            if (t, s, a, da) in acc and (t, s, b, db) in acc
        ]

    comparisons = []
    for a, b, da, db in COMPARISONS:
        values = diffs(a, b, da, db)
        if values:
            comparisons.append({"a": a, "b": b, "dtype_a": da, "dtype_b": db, **paired(values)})
    precision = {}
    for v in protocol.variants:
        if "bfloat16" in v.dtypes and (values := diffs(v.name, v.name, "bfloat16", "float32")):
            precision[v.name] = paired(values)
    speed = {}
    for v in protocol.variants:
        for dtype in v.dtypes if v.steps else ():
            runs = [r for r in final if r["variant"] == v.name and r["dtype"] == dtype]
            rates = [r["steps_per_s"] for r in runs if r.get("steps_per_s")]
            if rates:
                speed[f"{v.name} {dtype}"] = {
                    "steps_per_s": statistics.median(rates),
                    "seconds": statistics.median(r["seconds"] for r in runs),
                    "n": len(rates),
                    "workers": sorted({r.get("workers") for r in runs}, key=str),
                    "devices": sorted({r["device"] for r in runs}),
                }
    select_cells = protocol.cells("select")
    missing = {
        "select": [_missing(c) for c in select_cells if c.key not in by_key],
        "unchosen": [v.name for v in protocol.variants if v.lrs and v.name not in chosen],
        "final": [_missing(c) for c in cells if c.key not in by_key],
    }
    return {
        "selection": {
            name: {
                "lr": c.lr,
                "scores": {str(lr): s for lr, s in c.scores.items()},
                "runs": {str(lr): n for lr, n in c.runs.items()},
                "needed": c.needed,
                "edge": c.edge,
            }
            for name, c in choices.items()
        },
        "table": table,
        "comparisons": comparisons,
        "precision": precision,
        "speed": speed,
        "goals": goals(table, comparisons, precision, protocol),
        "missing": missing,
        "final": final,
    }


def _missing(cell) -> dict:
    return {"task": cell.task, "seed": cell.seed, "variant": cell.variant.name,
            "dtype": cell.dtype, "lr": cell.lr}  # fmt: skip


def goals(table: dict, comparisons: list[dict], precision: dict, protocol: Protocol) -> list:
    """The issue's goals, each ``{"goal", "value", "met"}``; ``met`` None while its runs are
    incomplete (fewer pairs than tasks × seeds)."""
    full = len(protocol.tasks) * len(protocol.seeds)

    def find(a, b, da, db):
        for c in comparisons:
            if (c["a"], c["b"], c["dtype_a"], c["dtype_b"]) == (a, b, da, db):
                return c
        return None

    out = []
    for dtype in ("bfloat16", "float32"):
        c = find(LOZO, MEZO, dtype, dtype)
        out.append(_goal(f"LOZO ≥ MeZO + 1 point ({dtype})", c, full, lambda m: m >= 1.0))
    for dtype in ("bfloat16", "float32"):
        c = find(LOZO, ADAM, dtype, "float32")
        text = f"LOZO within 2 points of Adam at the same budget (LOZO {dtype})"
        out.append(_goal(text, c, full, lambda m: m >= -2.0))
    for v in protocol.variants:
        if "bfloat16" in v.dtypes:
            text = f"bf16 within 0.5 points of float32: {v.label}"
            out.append(_goal(text, precision.get(v.name), full, lambda m: abs(m) <= 0.5))
    return out


def _goal(text: str, c: dict | None, full: int, test) -> dict:
    if c is None:
        return {"goal": text, "value": None, "n": 0, "met": None}
    return {
        "goal": text,
        "value": c["mean"],
        "n": c["n"],
        "met": test(c["mean"]) if c["n"] == full else None,
    }


def _lr(x: float | None) -> str:
    return "–" if x is None else f"{x:g}"


def _ci(c: dict) -> str:
    return "–" if c["ci"] is None else f"[{c['ci'][0]:+.1f}, {c['ci'][1]:+.1f}]"


def markdown(protocol: Protocol, summary: dict, commands: list[str], commits: list[str]) -> str:
    """The report's text (above the discussion marker)."""
    n_seeds = len(protocol.seeds)
    labels = {v.name: v.label for v in protocol.variants}
    final = summary["final"]
    missing = summary["missing"]
    expected_select = len(protocol.cells("select"))
    lines = [
        "# Results: 16-shot SST-2, RTE, TREC with the embedded MiniLM, 20,000 ZO steps (GPU grid)",
        "",
        "The protocol of issue 15 (`zofast/grid/protocol.py`): ZO methods 20,000 steps (40,000 "
        "forwards), dev every 500 steps; first-order methods at the same forward budget (a step "
        "counts 3: 13,333 steps) and at 1,000 steps; DFO-LoRA 8,000 calls; batch 16, ε 1e-3, "
        "every weight trained; the best dev checkpoint tested. ZO methods in float32 and in "
        'bfloat16 with the default settings (mode and rounding "auto": the exact modes); '
        "first-order methods and DFO-LoRA in float32. The 100-step CPU grid this replaces: "
        "[results-cpu-100-steps.md](results-cpu-100-steps.md).",
        "",
        "## Status",
        "",
        f"Select stage: {expected_select - len(missing['select'])} of {expected_select} runs. "
        f"Final stage: {len(final)} of {len(final) + len(missing['final'])} runs of the variants "
        "chosen so far"
        + (
            f"; no lr chosen yet for {', '.join(labels[n] for n in missing['unchosen'])} "
            "(their final runs are not counted above)."
            if missing["unchosen"]
            else "."
        ),
    ]
    if missing["select"] or missing["final"] or missing["unchosen"]:
        lines += ["", "**The grid is incomplete: the tables below hold only the runs it has.**"]
        for stage in ("select", "final"):
            by_variant: dict[str, int] = {}
            for m in missing[stage]:
                name = f"{labels[m['variant']]} {m['dtype']}"
                by_variant[name] = by_variant.get(name, 0) + 1
            if by_variant:
                text = ", ".join(f"{n}: {c}" for n, c in sorted(by_variant.items()))
                lines.append(f"Missing {stage} runs (variant dtype: count): {text}.")
    lines += [
        "",
        "## Learning rate, chosen on dev",
        "",
        "Three values per variant, run on the three tasks with seeds 13 and 21 only, float32; the "
        "lr with the best mean best-dev accuracy over those 6 runs is chosen (a tie within 1e-9 "
        "goes to the smaller lr); the test split is not looked at. bfloat16 runs use the float32 "
        "choice, so that bf16 − fp32 measures precision alone. The select run at the chosen lr is "
        "the final run of seeds 13 and 21. ZO grid 3e-6, 1e-5, 3e-5; Adam 1e-5, 3e-5, 1e-4; "
        "LoRA 1e-4, 3e-4, 1e-3 (reasons: `zofast/grid/protocol.py`).",
        "",
        "| variant | mean best dev (%) per lr (runs) | chosen |",
        "|---|---|---|",
    ]
    for name, s in summary["selection"].items():
        cells = []
        for lr in protocol.variant(name).lrs:
            score = s["scores"].get(str(lr))
            value = "–" if score is None else f"{100 * score:.1f}"
            cells.append(f"{lr:g}: {value} ({s['runs'][str(lr)]}/{s['needed']})")
        choice = _lr(s["lr"]) + (" (edge of the grid)" if s["edge"] else "")
        lines.append(f"| {labels[name]} | {'; '.join(cells)} | {choice} |")
    zo = [v.name for v in protocol.variants if "bfloat16" in v.dtypes]
    for dtype, names in (("float32", protocol.names), ("bfloat16", zo)):
        lines += [
            "",
            f"## Test accuracy (%), {dtype}",
            "",
            f"Best dev checkpoint, mean ± std over seeds {', '.join(map(str, protocol.seeds))} "
            f"({STD_NOTE}); `(n=k)`: a cell with k of {n_seeds} seeds.",
            "",
            *accuracy_table(summary["table"][dtype], protocol.tasks, names, n_seeds, labels),
        ]
    lines += [
        "",
        "## Paired differences (accuracy points)",
        "",
        "Over the (task, seed) pairs where both runs exist (15 when complete): mean, sample std "
        "(ddof = 1), 95 % Student-t interval of the mean (mean ± t₀.₉₇₅,ₙ₋₁ · std / √n), wins / "
        "ties / pairs.",
        "",
        "| comparison | mean | std | 95 % CI | wins / ties / pairs |",
        "|---|---|---|---|---|",
    ]
    if not summary["comparisons"]:
        lines.append("| none yet | | | | |")
    for c in summary["comparisons"]:
        text = f"{labels[c['a']]} {_short(c['dtype_a'])} − {labels[c['b']]} {_short(c['dtype_b'])}"
        lines.append(
            f"| {text} | {c['mean']:+.2f} | {c['std']:.2f} | {_ci(c)} | "
            f"{c['wins']} / {c['ties']} / {c['n']} |"
        )
    lines += [
        "",
        "bf16 − fp32 per method, same seeds and lr:",
        "",
        "| method | mean | std | 95 % CI | wins / ties / pairs |",
        "|---|---|---|---|---|",
    ]
    if not summary["precision"]:
        lines.append("| none yet | | | | |")
    for name, p in summary["precision"].items():
        lines.append(
            f"| {labels[name]} | {p['mean']:+.2f} | {p['std']:.2f} | {_ci(p)} | "
            f"{p['wins']} / {p['ties']} / {p['n']} |"
        )
    lines += [
        "",
        "## Goals (reported, not tuned to)",
        "",
        "| goal | value (points) | pairs | met |",
        "|---|---|---|---|",
    ]
    for g in summary["goals"]:
        value = "–" if g["value"] is None else f"{g['value']:+.2f}"
        met = {True: "met", False: "**not met**", None: "not yet measured"}[g["met"]]
        lines.append(f"| {g['goal']} | {value} | {g['n']} | {met} |")
    lines += [
        "",
        "## Speed",
        "",
        "Training steps per second of one run (median over its runs; evaluation excluded) and wall "
        "seconds per run (evaluation and test included), measured while `workers` runs shared "
        "the GPU: the rates the grid ran at, not those of a run alone "
        "(`bench/probes/grid_throughput.py` measures both).",
        "",
        "| variant | dtype | steps/s | s per run | runs | workers | device |",
        "|---|---|---|---|---|---|---|",
    ]
    if not summary["speed"]:
        lines.append("| none yet | | | | | | |")
    for name_dtype, s in summary["speed"].items():
        name, dtype = name_dtype.split(" ")
        lines.append(
            f"| {labels[name]} | {dtype} | {s['steps_per_s']:.1f} | {s['seconds']:.0f} | "
            f"{s['n']} | {', '.join(map(str, s['workers']))} | {', '.join(s['devices'])} |"
        )
    lines += ["", "## Curves", ""]
    drawn = [t for t in protocol.tasks if any(r["task"] == t for r in final)]
    lines += [f"![{TASKS[t]}](grid/curves-{t}.png)" for t in drawn] or ["No final runs yet."]
    lines += [
        "",
        "## Reproduce",
        "",
        f"Commits of the runs: {', '.join(f'`{c}`' for c in commits) or '–'}. Every run is one "
        "line of `bench/results/grid-h200/*.jsonl` (with its curves) and one entry of "
        "`docs/results.json` (without). The two stages, in 10-minute calls on one H200 (each "
        "call's `runs.jsonl` committed to `bench/results/grid-h200/`); one cell again (LOZO "
        "rank 2, RTE, seed 42, bf16); this report:",
        "",
        "```bash",
        *commands,
        "```",
        "",
        DISCUSSION,
    ]
    return "\n".join(lines)


def _short(dtype: str) -> str:
    return {"float32": "fp32", "bfloat16": "bf16"}.get(dtype, dtype)


COMMANDS = [
    "python -m zofast.grid run --stage select --data-root ../shared/data/k-shot --device cuda "
    "--workers 16 --deadline 480 --end 590 --records bench/results/grid-h200 --out OUT/runs.jsonl",
    "python -m zofast.grid run --stage final --data-root ../shared/data/k-shot --device cuda "
    "--workers 16 --deadline 480 --end 590 --records bench/results/grid-h200 --out OUT/runs.jsonl",
    "python -m zofast.grid run --stage final --records bench/results/grid-h200 "
    "--tasks rte --seeds 42 --variants lozo-r2-20000 --dtypes bfloat16 --workers 0 "
    "--out /tmp/one.jsonl --rerun",
    "python -m zofast.grid report --records bench/results/grid-h200",
]


def write(
    protocol: Protocol, records: list[dict], docs: str | Path = "docs", *, plots: bool = True
) -> Path:
    """Write ``results.md``, ``results.json`` and (``plots``) ``grid/curves-<task>.png``.

    Args:
        protocol: the grid.
        records: every record (:func:`zofast.grid.records.read`).
        docs: the folder.
        plots: draw the curves.

    Returns:
        The path of results.md.

    Example:
        >>> write(Protocol(), read(["bench/results/grid-h200"]))  # doctest: +SKIP
    """
    docs = Path(docs)
    docs.mkdir(parents=True, exist_ok=True)
    summary = summarize(protocol, records)
    final = summary.pop("final")
    commits = sorted({r["commit"] for r in records})
    runs = [{k: v for k, v in r.items() if k != "curves"} for r in records]
    payload = {
        "protocol": protocol.to_dict(),
        "std": STD_NOTE,
        "summary": summary,
        "commits": commits,
        "runs": runs,
    }
    (docs / "results.json").write_text(json.dumps(payload, indent=1) + "\n")
    summary["final"] = final
    for task in protocol.tasks if plots else ():
        if any(r["task"] == task for r in final):
            task_curves(protocol, final, task, docs / "grid" / f"curves-{task}.png")
    path = docs / "results.md"
    kept = "\n"
    if path.is_file() and DISCUSSION in (old := path.read_text()):
        kept = old.split(DISCUSSION, 1)[1]
    path.write_text(markdown(protocol, summary, COMMANDS, commits) + kept)
    return path
