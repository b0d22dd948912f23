"""zofast.grid.resume: zeroth-order cells paused at the end of a call and resumed by the next
end as in one call (records, curves, best dev, test); partial records are small, a torn one is
skipped, and the report never sees them (CPU, the tiny BERT)."""

from __future__ import annotations

import base64
import gzip
import json

import numpy as np
import pytest

from zofast.grid import records as rec
from zofast.grid import resume
from zofast.grid.protocol import Protocol, Variant
from zofast.grid.report import summarize
from zofast.grid.runner import Settings, _Models, pending, run, run_cell
from zofast.train.pause import Paused
from zofast.trajectory import Trajectory

pytestmark = pytest.mark.usefixtures("one_thread")

ZO = Protocol(
    variants=(
        Variant("mezo", 4, 2, (1e-2,), ("float32", "bfloat16"), label="MeZO"),
        Variant("lozo", 4, 2, (1e-2,), ("bfloat16",), rank=2, label="LOZO"),
        Variant("lozo-m", 4, 2, (1e-2,), ("bfloat16",), rank=2, label="LOZO-M"),
    ),
    tasks=("sst-2",),
    seeds=(13,),
    select_seeds=(13,),
    batch_size=4,
    log_every=1,
)
# What differs between two runs of the same cell besides the results: timings and calls.
TIMES = {"seconds", "train_seconds", "steps_per_s", "calls"}


def _settings(kshot, tiny_model_dirs, out, stage, **kwargs):
    return Settings(
        stage, str(out / "runs.jsonl"), kshot, model=str(tiny_model_dirs["bert-encoder"]),
        device="cpu", workers=0, commit="abc", protocol=ZO, records=(), **kwargs,
    )  # fmt: skip


def _results(path) -> dict:
    return {rec.key(r): {k: v for k, v in r.items() if k not in TIMES} for r in rec.read([path])}


@pytest.mark.filterwarnings("ignore:.*not a JSON line")  # the torn line, checked below
def test_cells_paused_every_step_end_as_in_one_call(kshot, tiny_model_dirs, tmp_path):
    for stage in ("select", "final"):  # select: the 3 in fp32; final: the 3 in bf16
        assert run(_settings(kshot, tiny_model_dirs, tmp_path / "a", stage)) == 3
    one_call = _results(tmp_path / "a" / "runs.jsonl")
    assert len(one_call) == 6

    out = tmp_path / "b" / "runs.jsonl"
    for stage in ("select", "final"):
        settings = _settings(kshot, tiny_model_dirs, tmp_path / "b", stage, end=0.0)
        calls = 0
        while pending(settings)[0]:  # end 0: every call takes one step of each cell, then pauses
            added = run(settings)
            calls += 1
            assert added == (3 if calls == 4 else 0)
            if stage == "select" and calls == 1:
                paused = rec.read([out], partial=True)
                assert sorted(r["steps_run"] for r in paused) == [1, 1, 1]
                assert rec.read([out]) == [], "partial records are not runs"
                assert len(summarize(ZO, rec.read([out]))["missing"]["select"]) == 3
                torn = json.dumps({**paused[0], "steps_run": 3})  # a kill mid-write
                with out.open("a") as f:
                    f.write(torn[: len(torn) // 2])
        assert calls == 4
    with pytest.warns(UserWarning, match="not a JSON line"):
        assert _results(out) == one_call
    records = rec.read([out])
    assert all([c["steps_run"] for c in r["calls"]] == [1, 2, 3, 4] for r in records)
    assert all(
        r["seconds"] == pytest.approx(sum(c["seconds"] for c in r["calls"])) for r in records
    )


def test_a_partial_record_that_cannot_resume_starts_the_cell_over(kshot, tiny_model_dirs, tmp_path):
    settings = _settings(kshot, tiny_model_dirs, tmp_path, "select", end=0.0)
    run(settings)
    partial = next(r for r in rec.read([settings.out], partial=True) if r["method"] == "mezo")
    state = json.loads(gzip.decompress(base64.b64decode(partial["state"])))
    state["config"]["eps"] = 1e-2  # the protocol changed between the calls
    changed = {**partial, "state": base64.b64encode(gzip.compress(json.dumps(state).encode()))}
    changed["state"] = changed["state"].decode()
    (tmp_path / "c").mkdir()
    later = _settings(kshot, tiny_model_dirs, tmp_path / "c", "select")
    rec.append(later.out, changed)
    cells, _ = pending(later)
    assert cells[0].variant.method == "mezo", "a cell with a partial record goes first"
    said = []
    record = run_cell(cells[0], later, _Models(later), changed, None, said.append)
    assert said == ["cannot resume from step 1 (the cell's settings changed since it paused); "
                    "starting over"]  # fmt: skip
    assert record["steps_run"] == 4 and [c["steps_run"] for c in record["calls"]] == [1, 4]


def test_a_twenty_thousand_step_partial_record_stays_small():
    traj = Trajectory("LOZO", {"eps": 1e-3, "rank": 2}, run_seed=13, n_groups=2)
    g = np.random.default_rng(0).standard_normal(20_000).astype(np.float32)
    for t, x in enumerate(g):
        traj.record_step(x, [1e-5, 1e-5], [0.0, 0.0])
        if t % 500 == 499:
            traj.record(3)  # the settle before each evaluation
    log = "".join(
        json.dumps({"event": "train", "step": s, "loss": float(g[s]), "forwards": 2 * s,
                    "steps_per_s": 41.3 + s / 1e4, "elapsed": s / 41.3}) + "\n"
        for s in range(100, 20_000, 100)
    )  # fmt: skip
    evals = range(0, 20_001, 500)
    state = {
        "optimizer": {"trajectory": traj.to_dict()},
        "loop": {"history": [{"step": s, "dev_acc": 0.5, "dev_loss": 0.69} for s in evals]},
        "log": base64.b64encode(gzip.compress(log.encode())).decode(),
        "batches": {"generator": base64.b64encode(bytes(5056)).decode(), "order": list(range(16))},
        "steps": 20_000,
    }  # fmt: skip
    cell = ZO.cells("select")[0]
    line = json.dumps(resume.record(cell, "select", Paused(state), [{"seconds": 1.0}]))
    assert len(line) < 200_000, len(line)
