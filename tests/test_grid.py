"""zofast.grid: the accuracy grid's protocol, lr selection, records, runner and report (CPU)."""

from __future__ import annotations

import json
import math

import pytest

from zofast.grid import records as rec
from zofast.grid.protocol import ZO_LRS, Protocol, Variant
from zofast.grid.report import summarize, write
from zofast.grid.runner import Settings, estimate, pending, run
from zofast.grid.selection import choose
from zofast.grid.stats import paired, t975

pytestmark = pytest.mark.usefixtures("one_thread")


TINY = Protocol(
    variants=(
        Variant("zero-shot", 0, 1, label="zero-shot"),
        Variant("mezo", 4, 2, (1e-3,), ("float32", "bfloat16"), label="MeZO"),
        Variant("lora", 3, 1, (1e-3,), rank=2, label="LoRA"),
    ),
    tasks=("sst-2",),
    seeds=(13,),
    select_seeds=(13,),
    batch_size=4,
    log_every=1,
)


def _settings(kshot, tiny_model_dirs, tmp_path, stage, **kwargs):
    defaults = dict(
        model=str(tiny_model_dirs["bert-encoder"]), device="cpu", workers=0, commit="abc",
        protocol=TINY, records=(str(tmp_path / "earlier"),),
    )  # fmt: skip
    return Settings(stage, str(tmp_path / "out" / "runs.jsonl"), kshot, **{**defaults, **kwargs})


def test_tiny_grid_end_to_end_select_then_final_and_resume(kshot, tiny_model_dirs, tmp_path):
    settings = _settings(kshot, tiny_model_dirs, tmp_path, "select")
    assert [c.describe() for c in pending(settings)[0]] == [
        "sst-2 seed 13 lora-r2-3 float32 lr 0.001",  # 9 forwards before MeZO's 8
        "sst-2 seed 13 mezo-4 float32 lr 0.001",
    ]
    assert run(settings) == 2
    records = rec.read([settings.out])
    mezo = next(r for r in records if r["method"] == "mezo")
    assert mezo["steps"] == 4 and mezo["forwards"] == 8 and mezo["lr"] == 1e-3
    assert mezo["commit"] == "abc" and mezo["stage"] == "select" and mezo["rank"] is None
    assert [x for x, _ in mezo["curves"]["dev"]] == [0, 4, 8], "dev every 2 steps, as forwards"
    assert [x for x, _ in mezo["curves"]["loss"]] == [2, 4, 6, 8]
    assert mezo["dev_acc"] == max(acc for _, acc in mezo["curves"]["dev"])
    lora = next(r for r in records if r["method"] == "lora")
    assert lora["forwards"] == 9 and lora["rank"] == 2 and 0 <= lora["test_acc"] <= 1
    assert run(settings) == 0, "finished cells are skipped"

    final = _settings(kshot, tiny_model_dirs, tmp_path, "final", records=(settings.out,))
    todo = [c.describe() for c in pending(final)[0]]
    assert todo == ["sst-2 seed 13 mezo-4 bfloat16 lr 0.001", "sst-2 seed 13 zero-shot float32"]
    assert run(final) == 2
    records = rec.read([settings.out])
    assert len(records) == 4
    zero = next(r for r in records if r["method"] == "zero-shot")
    assert zero["steps"] == 0 and zero["forwards"] == 0 and zero["lr"] is None
    bf16 = next(r for r in records if r["dtype"] == "bfloat16")
    assert bf16["mode"] == "shadow" and bf16["lr"] == 1e-3

    summary = summarize(TINY, records)
    assert summary["missing"] == {"select": [], "unchosen": [], "final": []}
    assert summary["table"]["float32"]["sst-2"]["mezo-4"]["n"] == 1
    path = write(TINY, records, tmp_path / "docs")
    text = path.read_text()
    assert "| MeZO | 0.001: " in text and "(1/1) | 0.001 (edge of the grid) |" in text
    assert (tmp_path / "docs" / "grid" / "curves-sst-2.png").stat().st_size > 10_000
    assert len(json.loads((tmp_path / "docs" / "results.json").read_text())["runs"]) == 4


def test_deadline_and_end_hold_back_cells(kshot, tiny_model_dirs, tmp_path):
    settings = _settings(kshot, tiny_model_dirs, tmp_path, "select", deadline=0.0)
    assert run(settings) == 0 and not rec.read([settings.out]), "no cell starts after it"
    # An earlier LoRA run (another seed, 30 steps) trained 10 s a step and spent 5 s besides:
    # LoRA's 3 steps need about 35 s, more than the 20 s left; MeZO (no estimate) still runs.
    (tmp_path / "earlier").mkdir()
    old = {"task": "sst-2", "seed": 99, "method": "lora", "rank": 2, "dtype": "float32",
           "steps": 30, "steps_run": 30, "lr": 1e-3, "seconds": 305.0,
           "train_seconds": 300.0}  # fmt: skip
    rec.append(tmp_path / "earlier" / "call-1.jsonl", old)
    lora = next(c for c in pending(_settings(kshot, tiny_model_dirs, tmp_path, "select"))[0]
                if c.variant.method == "lora")  # fmt: skip
    assert estimate(lora, rec.read([tmp_path / "earlier"])) == pytest.approx(35.0)
    settings = _settings(kshot, tiny_model_dirs, tmp_path, "select", end=20.0)
    assert run(settings) == 1
    assert [r["method"] for r in rec.read([settings.out])] == ["mezo"]


def test_worker_processes_share_the_queue(kshot, tiny_model_dirs, tmp_path):
    settings = _settings(kshot, tiny_model_dirs, tmp_path, "select", workers=2)
    assert run(settings) == 2
    assert sorted(r["method"] for r in rec.read([settings.out])) == ["lora", "mezo"]


def test_records_are_whole_lines_and_the_last_one_wins(tmp_path):
    path = tmp_path / "runs.jsonl"
    one = {"task": "rte", "seed": 13, "method": "mezo", "rank": None, "dtype": "float32",
           "steps": 10, "lr": 1e-5, "dev_acc": 0.5}  # fmt: skip
    rec.append(path, one)
    rec.append(path, {**one, "dev_acc": 0.75})
    with path.open("a") as f:
        f.write('{"task": "rte", "seed"')  # a torn line
    with pytest.warns(UserWarning, match="not a JSON line"):
        records = rec.read([tmp_path, tmp_path / "absent"])
    assert [r["dev_acc"] for r in records] == [0.75]
    rec.append(path, {**one, "partial": True, "steps_run": 3})  # not glued to the torn line
    with pytest.warns(UserWarning, match="runs.jsonl:3: not a JSON line"):
        assert [r["dev_acc"] for r in rec.read([path])] == [0.75], "a partial one is not read"
        assert [r["steps_run"] for r in rec.read([path], partial=True)] == [3]


def _select(protocol, variant, scores):
    """Select records of `variant`: scores[lr] = dev accuracies in task × seed order."""
    out = []
    for lr, accs in scores.items():
        pairs = [(t, s) for t in protocol.tasks for s in protocol.select_seeds]
        for (task, seed), acc in zip(pairs, accs, strict=False):
            out.append({"task": task, "seed": seed, "method": variant.method,
                        "rank": variant.rank, "dtype": "float32", "steps": variant.steps,
                        "lr": lr, "dev_acc": acc, "commit": "abc"})  # fmt: skip
    return out


def test_selection_best_mean_dev_ties_to_the_smaller_lr_and_waits_for_every_run():
    protocol = Protocol()
    mezo, lozo = protocol.variant("mezo-20000"), protocol.variant("lozo-r2-20000")
    a, b, c = ZO_LRS
    records = _select(protocol, mezo, {a: [0.5] * 6, b: [0.7] * 5 + [1.0], c: [0.7] * 6})
    records += _select(protocol, lozo, {a: [0.5] * 6, b: [0.7] * 6, c: [0.7] * 6})
    choices = choose(protocol, records)
    assert choices["mezo-20000"].lr == b and not choices["mezo-20000"].edge
    assert choices["mezo-20000"].scores[b] == pytest.approx(0.75)
    assert choices["lozo-r2-20000"].lr == b, "a tie goes to the smaller lr"
    del records[0]
    assert choose(protocol, records)["mezo-20000"].lr is None, "a select run is missing"
    assert choose(protocol, records)["mezo-20000"].runs[a] == 5


def test_protocol_cells_and_order():
    protocol = Protocol()
    select = protocol.cells("select")
    assert len(select) == 8 * 3 * 2 * 3  # variants with an lr grid × lrs × seeds × tasks
    assert select[0].variant.forwards("rte") == 40_000 and select[0].task == "rte"
    forwards = [c.variant.forwards(c.task) for c in select]
    assert forwards == sorted(forwards, reverse=True), "longest first"
    chosen = {v.name: v.lrs[1] for v in protocol.variants if v.lrs}
    final = protocol.cells("final", chosen)
    assert len(final) == 15 * (4 * 2 + 4 + 1 + 1)
    assert len({c.key for c in final} & {c.key for c in select}) == 8 * 3 * 2
    assert protocol.variant("adam-13333").forwards("rte") == 39_999
    assert protocol.variant("dfo-lora-r4-8000").forwards("trec") == 48_000


def _final_records(protocol, chosen, test_acc):
    """One final record per cell, test accuracy from test_acc(cell)."""
    out = []
    for cell in protocol.cells("final", chosen):
        task, seed, method, rank, dtype, steps, lr = cell.key
        out.append({"task": task, "seed": seed, "method": method, "rank": rank, "dtype": dtype,
                    "steps": steps, "lr": lr, "dev_acc": 0.8, "test_acc": test_acc(cell),
                    "variant": cell.variant.name, "seconds": 10.0, "steps_per_s": 50.0,
                    "device": "H200", "workers": 16, "commit": "abc", "curves": {
                        "dev": [[0, 0.5], [1000, 0.6]], "loss": [[200, 0.7]]}})  # fmt: skip
    return out


def test_report_numbers_by_hand(tmp_path):
    protocol = Protocol()
    records = []
    for v in protocol.variants:  # the middle lr wins everywhere
        if v.lrs:
            records += _select(protocol, v, {v.lrs[0]: [0.5] * 6, v.lrs[1]: [0.8] * 6,
                                             v.lrs[2]: [0.6] * 6})  # fmt: skip
    chosen = {v.name: v.lrs[1] for v in protocol.variants if v.lrs}
    pairs = [(t, s) for t in protocol.tasks for s in protocol.seeds]
    index = {pair: i for i, pair in enumerate(pairs)}

    def test_acc(cell):
        i = index[(cell.task, cell.seed)]  # 0..14
        name = cell.variant.name
        if name == "lozo-r2-20000":  # LOZO − MeZO = 1, 2, ..., 15 points
            return 0.70 + (i + 1) / 100 - (0.004 if cell.dtype == "bfloat16" else 0)
        if name == "mezo-20000":  # bf16 − fp32 = −0.4 points
            return 0.70 - (0.004 if cell.dtype == "bfloat16" else 0)
        return 0.85

    records += _final_records(protocol, chosen, test_acc)
    summary = summarize(protocol, records)
    assert all(not v for v in summary["missing"].values())
    cell = summary["table"]["float32"]["sst-2"]["lozo-r2-20000"]  # seeds 13..100 → i = 0..4
    assert cell["mean"] == pytest.approx(73.0) and cell["std"] == pytest.approx(math.sqrt(2.5))
    lozo_mezo = summary["comparisons"][0]
    assert (lozo_mezo["a"], lozo_mezo["b"], lozo_mezo["dtype_a"]) == (
        "lozo-r2-20000", "mezo-20000", "float32")  # fmt: skip
    # differences 1..15: mean 8, std sqrt(280 / 14) = sqrt(20), half width t(14) sqrt(20 / 15)
    assert lozo_mezo["mean"] == pytest.approx(8.0) and lozo_mezo["n"] == 15
    assert lozo_mezo["std"] == pytest.approx(math.sqrt(20))
    half = 2.145 * math.sqrt(20 / 15)
    assert lozo_mezo["ci"] == pytest.approx([8 - half, 8 + half])
    assert summary["precision"]["mezo-20000"]["mean"] == pytest.approx(-0.4)
    goals = {g["goal"]: g["met"] for g in summary["goals"]}
    assert goals["LOZO ≥ MeZO + 1 point (float32)"] is True
    assert goals["LOZO within 2 points of Adam at the same budget (LOZO float32)"] is False
    assert goals["bf16 within 0.5 points of float32: MeZO"] is True
    assert goals["bf16 within 0.5 points of float32: LOZO-M r2"] is True  # 0.85 both
    text = write(protocol, records, tmp_path, plots=False).read_text()
    assert "| LOZO r2 fp32 − MeZO fp32 | +8.00 | 4.47 | [+5.5, +10.5] | 15 / 0 / 15 |" in text
    assert "| SST-2 | 85.0 ± 0.0 | 70.0 ± 0.0 | 73.0 ± 1.6 |" in text
    assert "ddof = 1" in text and "incomplete" not in text
    assert "| MeZO | 3e-06: 50.0 (6/6); 1e-05: 80.0 (6/6); 3e-05: 60.0 (6/6) | 1e-05 |" in text
    (tmp_path / "results.md").write_text(text + "kept words\n")
    partial = [r for r in records if not (r["seed"] == 100 and r["task"] == "trec")]
    text = write(protocol, partial, tmp_path, plots=False).read_text()
    assert text.endswith("kept words\n") and "**The grid is incomplete:" in text
    assert "(n=4)" in text and "not yet measured" in text


def test_t_quantiles_and_intervals():
    assert t975(1) == 12.706 and t975(14) == 2.145 and t975(30) == 2.042
    assert t975(45) == 2.021 and t975(10_000) == 1.960
    p = paired([1.0, 2.0, 3.0, -1.0, 0.0])
    assert p["wins"] == 3 and p["ties"] == 1 and p["mean"] == pytest.approx(1.0)
    half = 2.776 * math.sqrt(2.5) / math.sqrt(5)
    assert p["ci"] == pytest.approx([1 - half, 1 + half])
    assert paired([4.0])["ci"] is None


def test_compile_reaches_the_float32_zeroth_order_cells_only(kshot, tmp_path):
    """Settings.compile (``run --compile``): the float32 MeZO / LOZO cells compile their
    transformer; bf16 cells (exact modes, hooks) and first-order ones do not."""
    from dataclasses import replace

    compiled = {}
    cells = TINY.cells("select")
    cells += [replace(c, dtype="bfloat16") for c in cells if c.variant.method == "mezo"]
    cells += [c for c in TINY.cells("final") if c.variant.method == "zero-shot"]
    for cell in cells:
        config = cell.train_config(TINY, kshot, None, str(tmp_path), True)
        compiled[cell.variant.method, cell.dtype] = config.compile
    assert compiled == {
        ("zero-shot", "float32"): False,
        ("mezo", "float32"): True,
        ("mezo", "bfloat16"): False,
        ("lora", "float32"): False,
    }
