"""zofast.train: the run loop, its files, best-checkpoint keeping and input validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from zofast import plot
from zofast.models import load_model
from zofast.replay import replay
from zofast.train import (
    ConfigError,
    TrainConfig,
    evaluate,
    load_splits,
    train,
    trainable_parameters,
    trajectory_prefix,
)
from zofast.trajectory import Trajectory


@pytest.fixture(scope="module")
def tiny(tiny_model_dirs):
    """A tiny bare BERT encoder (the kind of the embedded MiniLM) with its tokenizer."""
    return str(tiny_model_dirs["bert-encoder"])


def _config(tiny, tmp_path, **kwargs):
    defaults = dict(
        model=tiny,
        task="demo",
        data="demo",
        method="lozo",
        lr=1e-2,
        steps=6,
        eval_every=3,
        batch_size=8,
        output_dir=str(tmp_path / "run"),
        progress=False,
        log_every=2,
        seed=5,
        plot=False,
        zero_shot_test=False,
    )
    return TrainConfig(**{**defaults, **kwargs})


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_replays_to(tiny, trajectory, model):
    """A fresh copy of the tiny model, replayed along `trajectory`, equals `model` bit for bit."""
    fresh = load_model(tiny).model
    replay(fresh, trajectory)
    tuned = dict(model.named_parameters())
    assert all(torch.equal(p, tuned[n]) for n, p in fresh.named_parameters())


@pytest.mark.parametrize("method", ["lozo", "lozo-m", "mezo"])
def test_zeroth_order_run_writes_log_plot_and_trajectories(tiny, tmp_path, method):
    rng_before = torch.random.get_rng_state()
    config = _config(tiny, tmp_path, method=method, plot=True, zero_shot_test=True)
    loaded = load_model(tiny)
    result = train(config, loaded=loaded)
    assert torch.equal(torch.random.get_rng_state(), rng_before), "the global RNG was used"

    events = plot.read_log(result.files["log"])
    kinds = [e["event"] for e in events]
    assert kinds[0] == "config" and kinds[1] == "zero_shot" and kinds[-1] == "final"
    assert kinds.count("train") == 3 and kinds.count("eval") == 2
    assert [e["step"] for e in events if e["event"] == "eval"] == [3, 6]
    final = events[-1]
    assert final["forwards"] == 12 and final["steps"] == 6
    assert final["best_step"] == result.best_step in (0, 3, 6)
    assert result.test == final["test_acc"] and 0 <= result.test <= 1
    with open(result.files["plot"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert json.loads(Path(result.files["result"]).read_text())["best_step"] == result.best_step

    full = Trajectory.load(result.files["trajectory"])
    best = Trajectory.load(result.files["trajectory_best"])
    assert full.steps == 6 and best.steps == result.best_step
    assert full.method == ("MeZO" if method == "mezo" else "LOZO")

    # The model now holds the best dev checkpoint, which the best prefix rebuilds bit for bit.
    _assert_replays_to(tiny, best, loaded.model)


def test_virtual_mode_run_replays_and_leaves_a_plain_model(tiny, tmp_path):
    loaded = load_model(tiny)
    result = train(_config(tiny, tmp_path, mode="virtual"), loaded=loaded)
    assert not any(m._forward_hooks for m in loaded.model.modules()), "hooks left behind"
    best = Trajectory.load(result.files["trajectory_best"])
    assert best.hyperparameters["mode"] == "virtual"
    _assert_replays_to(tiny, best, loaded.model)


def test_runs_are_reproducible_and_seeded(tiny, tmp_path):
    loaded = load_model(tiny)
    base = _params(loaded.model)

    def run(name, seed):
        with torch.no_grad():
            for n, p in loaded.model.named_parameters():
                p.copy_(base[n])
        return train(_config(tiny, tmp_path / name, steps=3, seed=seed), loaded=loaded)

    a, b, c = run("a", 5), run("b", 5), run("c", 6)
    ga = Trajectory.load(a.files["trajectory"]).g
    assert ga.tolist() == Trajectory.load(b.files["trajectory"]).g.tolist()
    assert ga.tolist() != Trajectory.load(c.files["trajectory"]).g.tolist()


def test_best_checkpoint_is_the_base_model_when_nothing_beats_it(tiny, tmp_path, monkeypatch):
    # Dev accuracy scripted so that nothing beats the base (a real run only sometimes gets
    # there): the zero-shot evaluation scores 1.0, every later one 0.5.
    from zofast.train import evaluation, loop

    scores = iter([(1.0, 0.0)])

    def scripted(*args):
        return next(scores, (0.5, 1.0))

    monkeypatch.setattr(evaluation, "evaluate", scripted)  # the zero-shot evaluation's
    monkeypatch.setattr(loop, "evaluate", scripted)  # the loop's
    loaded = load_model(tiny)
    base = _params(loaded.model)
    result = train(_config(tiny, tmp_path, lr=5.0, eps=0.5, steps=3, eval_every=1), loaded=loaded)
    assert result.best_step == 0 and result.best_dev == 1.0
    assert all(torch.equal(p, base[n]) for n, p in loaded.model.named_parameters())
    assert Trajectory.load(result.files["trajectory_best"]).steps == 0
    assert Trajectory.load(result.files["trajectory"]).steps == 3


def test_adam_baseline_and_forward_budget(tiny, tmp_path):
    loaded = load_model(tiny)
    base = _params(loaded.model)
    config = _config(tiny, tmp_path, method="adam", lr=1e-3, forward_budget=12, eval_every=2)
    assert config.resolved_steps == 4
    assert _config(tiny, tmp_path, forward_budget=12).resolved_steps == 6
    result = train(config, loaded=loaded)
    assert result.steps == 4 and result.forwards == 12
    assert "trajectory" not in result.files
    assert all(p.grad is None for p in loaded.model.parameters())
    # The model holds the best dev checkpoint: trained weights unless the base scored best.
    changed = any(not torch.equal(p, base[n]) for n, p in loaded.model.named_parameters())
    assert changed == (result.best_step > 0)


def test_several_directions_per_step_count_their_forwards_and_replay(tiny, tmp_path):
    loaded = load_model(tiny)
    config = _config(tiny, tmp_path, directions=3, forward_budget=24, eval_every=2)
    assert config.resolved_steps == 4  # 6 forwards per step
    result = train(config, loaded=loaded)
    assert result.steps == 4 and result.forwards == 24
    full = Trajectory.load(result.files["trajectory"])
    assert full.g.shape == (4, 3) and full.hyperparameters["directions"] == 3
    _assert_replays_to(tiny, Trajectory.load(result.files["trajectory_best"]), loaded.model)


def test_freeze_keeps_matching_parameters(tiny, tmp_path):
    loaded = load_model(tiny)
    base = _params(loaded.model)
    result = train(
        _config(tiny, tmp_path, freeze="embeddings", eval_every=100, steps=3), loaded=loaded
    )
    names = [e["name"] for e in Trajectory.load(result.files["trajectory"]).params if e["trained"]]
    assert names and not any("embeddings" in n for n in names)
    for n, p in loaded.model.named_parameters():
        if "embeddings" in n:
            assert torch.equal(p, base[n])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "sgd"}, "unknown method 'sgd'"),
        ({"task": "nope"}, "unknown task 'nope'"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"lr": -1e-3}, "lr must be > 0"),
        ({"rank": 0}, "rank must be an integer >= 1"),
        ({"nu": 0}, "nu must be an integer >= 1"),
        ({"eps": 0.0}, "eps must be > 0"),
        ({"momentum": 0.5}, "momentum applies to lozo-m only"),
        ({"data": "/nonexistent/folder"}, "data folder not found"),
        ({"dtype": "int8"}, "dtype must be one of"),
        ({"freeze": "("}, "freeze is not a valid regex"),
        ({"template": "{text_a} {mask}"}, "needs both template and label_words"),
        ({"mode": "sideways"}, "mode must be one of auto, inplace, shadow, virtual"),
        ({"rounding": "up"}, "rounding must be one of auto, nearest, stochastic"),
        ({"mode": "shadow", "pipeline": True}, "pipeline is for mode 'inplace'"),
        ({"dtype": "bfloat16", "pipeline": True}, "pipeline is for mode 'inplace'"),
        ({"mode": "virtual", "method": "mezo"}, "mode 'virtual' is LOZO's"),
        ({"mode": "virtual", "weight_decay": 0.1}, "needs weight_decay 0"),
        ({"checkpoint_every": -1}, "checkpoint_every must be an integer >= 0"),
        ({"directions": 0}, "directions must be an integer >= 1"),
        ({"split": "rows"}, "split must be one of batch, directions"),
        ({"split": "directions", "directions": 2}, "split 'directions' shares"),
    ],
)
def test_bad_configs_are_refused_before_anything_is_written(tiny, tmp_path, kwargs, message):
    config = _config(tiny, tmp_path, **kwargs)
    with pytest.raises(ConfigError, match=message):
        train(config)
    assert not (tmp_path / "run").exists()


def test_no_trainable_parameters(tiny, tmp_path):
    loaded = load_model(tiny)
    base = _params(loaded.model)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        train(_config(tiny, tmp_path, freeze="."), loaded=loaded)
    assert not (tmp_path / "run").exists()
    assert all(torch.equal(p, base[n]) for n, p in loaded.model.named_parameters())
    with pytest.raises(ConfigError, match="no trainable parameters"):
        trainable_parameters(torch.nn.Linear(2, 2), ".")


def test_load_splits_reads_kshot_and_jsonl_folders(tmp_path):
    kshot = tmp_path / "SST-2"
    kshot.mkdir()
    for split in ("train", "dev", "test"):
        (kshot / f"{split}.tsv").write_text("sentence\tlabel\ngood film\t1\nbad film\t0\n")
    splits = load_splits(str(kshot), load_splits.__globals__["get_task"]("sst-2"))
    assert [e.label for e in splits["test"]] == [1, 0]
    folder = tmp_path / "custom"
    folder.mkdir()
    rows = [{"text": "lovely", "label": 1}, {"text": "awful", "label": 0}]
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    splits = load_splits(str(folder), load_splits.__globals__["get_task"]("demo"))
    assert sorted(splits) == ["train"] and splits["train"][0].text_a == "lovely"
    with pytest.raises(ConfigError, match="data folder not found"):
        load_splits(str(tmp_path / "missing"), load_splits.__globals__["get_task"]("demo"))


def test_train_without_dev_or_test_split(tiny, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    rows = [{"text": "lovely day", "label": 1}, {"text": "awful day", "label": 0}] * 4
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    result = train(_config(tiny, tmp_path, data=str(folder), steps=2))
    assert result.best_dev is None and result.test is None and result.best_step == 2
    assert Trajectory.load(result.files["trajectory_best"]).steps == 2


def test_custom_template_task(tiny, tmp_path):
    config = _config(
        tiny,
        tmp_path,
        task="mine",
        template="{text_a} Overall: {mask}.",
        label_words=("bad", "good"),
        steps=2,
    )
    result = train(config)
    assert json.loads(Path(result.files["result"]).read_text())["config"]["label_words"] == [
        "bad",
        "good",
    ]


def test_evaluate_and_trajectory_prefix(tiny):
    from zofast.optim import LOZO
    from zofast.scoring import Scorer

    loaded = load_model(tiny)
    scorer = Scorer(loaded, "demo")
    examples = load_splits("demo", scorer.task)["dev"][:10]
    acc, loss = evaluate(scorer, examples, batch_size=3)
    assert acc == pytest.approx(scorer.accuracy(examples)) and loss > 0
    opt = LOZO(loaded.model, lr=1e-3, rank=1, seed=1, pipeline=True)
    batch = scorer.encode(examples)
    for _ in range(3):
        opt.step(lambda: scorer.loss(batch))
    opt.settle()
    events = len(opt.trajectory.events)
    prefix = trajectory_prefix(opt.trajectory, events)
    assert prefix == opt.trajectory
    assert trajectory_prefix(opt.trajectory, 1).steps == 1


def test_dfo_lora_method(tiny, tmp_path):
    loaded = load_model(tiny)
    base = _params(loaded.model)
    config = _config(
        tiny, tmp_path, method="dfo-lora", steps=24, popsize=6, intrinsic_dim=24, rank=2,
        eval_every=12, save_model=True, plot=True,
    )  # fmt: skip
    result = train(config, loaded=loaded)
    assert result.steps == 1 + 3 * 6, "the starting point and three generations of six"
    assert result.forwards == result.steps * 8, "64 demo examples in batches of 8 per call"
    assert all(torch.equal(p, base[n]) for n, p in loaded.model.named_parameters())
    kinds = [e["event"] for e in plot.read_log(result.files["log"])]
    assert kinds[:2] == ["config", "zero_shot"] and kinds[-1] == "final" and "eval" in kinds
    assert {"dfo", "adapter", "plot", "log", "result"} <= set(result.files)
    with pytest.raises(ConfigError, match="at least one generation"):
        train(_config(tiny, tmp_path / "small", method="dfo-lora", steps=3, popsize=6))


def test_experiment_report_from_records(tmp_path):
    from zofast import experiments

    for seed in (13, 21):  # the report reads records only; the config checks the folders exist
        (tmp_path / "data" / "SST-2" / f"16-{seed}").mkdir(parents=True)
    grid = experiments.GridConfig(
        runs_dir=str(tmp_path / "runs"), docs_dir=str(tmp_path / "docs"), tasks=("sst-2",),
        seeds=(13, 21), methods=("mezo", "lozo"), zo_steps=10, data_root=str(tmp_path / "data"),
    )  # fmt: skip
    assert grid.train_config("sst-2", 13, "lozo", False).forward_budget == 20
    assert grid.train_config("sst-2", 13, "lozo", False).resolved_steps == 10
    (tmp_path / "runs").mkdir()
    rows = []
    for seed, mezo, lozo in ((13, 0.70, 0.75), (21, 0.72, 0.71)):
        rows.append({"task": "sst-2", "seed": seed, "method": "zero-shot", "test": 0.7})
        for method, acc in (("mezo", mezo), ("lozo", lozo)):
            rows.append(
                {"task": "sst-2", "seed": seed, "method": method, "test": acc, "best_step": 5,
                 "steps": 10, "seconds": 2.0, "train_seconds": 1.0}
            )  # fmt: skip
    (tmp_path / "runs" / "runs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    summary = experiments.summarize(grid, experiments.read_records(grid))
    assert summary["table"]["sst-2"]["lozo"]["mean"] == pytest.approx(73.0)
    assert summary["table"]["sst-2"]["mezo"]["std"] == pytest.approx(2**0.5), "ddof = 1"
    assert summary["paired"]["lozo - mezo"]["wins"] == 1
    path = experiments.report(grid)
    text = path.read_text()
    assert "| SST-2 | 70.0 ± 0.0 | 71.0 ± 1.4 | 73.0 ± 2.8 |" in text
    assert "ddof = 1" in text
    path.write_text(text + "my discussion\n")
    assert experiments.report(grid).read_text().endswith("my discussion\n")


def test_dfo_grid_report_uses_the_runners_table_and_convention(capsys):
    from zofast import experiments
    from zofast.dfo import experiments as dfo_experiments

    runs = [
        {"task": "sst-2", "seed": s, "method": m, "test_acc": acc, "dev_acc": 0.5, "seconds": 1.0}
        for s, m, acc in ((13, "zero-shot", 0.70), (21, "zero-shot", 0.70), (13, "dfo-lora", 0.70),
                          (21, "dfo-lora", 0.72))
    ]  # fmt: skip
    summary = dfo_experiments.summarise(runs)
    assert summary["dfo-lora"]["sst-2"]["std"] == pytest.approx(2**0.5), "ddof = 1, as the grid"
    meta = {"model": "m", "dtype": "float32", "device": "cpu", "budget": 8, "popsize": 2,
            "rank": 1, "intrinsic_dim": 4, "sigma": 1.0, "alpha": 0.05}  # fmt: skip
    text = dfo_experiments._markdown(runs, meta)
    assert "| SST-2 | 70.0 ± 0.0 | 71.0 ± 1.4 |" in text and experiments.STD_NOTE in text
    assert dfo_experiments.TASK_FOLDERS is experiments.TASKS
    assert dfo_experiments.SEEDS is experiments.SEEDS
    with pytest.raises(SystemExit) as exit_info:
        experiments.main(["dfo", "--help"])
    assert exit_info.value.code == 0
    assert "python -m zofast.experiments dfo" in capsys.readouterr().out


def test_zofast_train_under_torchrun(tiny, tmp_path):
    """Two processes under torchrun (gloo), each with half of every batch: one set of files
    (rank 0's), and the run of one process on the whole batches, within float tolerance."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # eps 1e-2: L+ − L− well above the float32 noise of forwards over differently padded shards
    flags = ["--model", tiny, "--task", "demo", "--data", "demo", "--lr", "1e-2", "--steps", "4"]
    flags += ["--eps", "1e-2"]
    flags += ["--eval-every", "2", "--batch-size", "8", "--seed", "5", "--no-progress"]
    flags += ["--no-plot", "--no-zero-shot-test", "--device", "cpu"]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    launch += ["--master-port", str(port), "-m", "zofast.cli", "train"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "ddp"
    # cwd: not the source folder, whose zofast/ (no compiled parts) `-m` would import first
    done = subprocess.run(
        [*launch, *flags, "--output-dir", str(out)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    alone = _config(tiny, tmp_path, steps=4, eval_every=2, eps=1e-2, output_dir=str(tmp_path / "1"))
    alone = train(alone)
    ddp = Trajectory.load(out / "trajectory.json")
    one = Trajectory.load(alone.files["trajectory"])
    assert ddp.steps == one.steps == 4
    # atol: the float32 noise of a loss over differently padded shards (~1e-6) over 2ε = 2e-2,
    # twice (a clean CI run once saw 6.7e-5 on a g of 0.054); a wrong g is off by O(g)
    torch.testing.assert_close(
        torch.tensor(list(ddp._g)), torch.tensor(list(one._g)), rtol=1e-3, atol=2e-4
    )
    checkpoints = [p.name for p in out.iterdir() if p.name.startswith("checkpoint-")]
    assert len(checkpoints) == 1, checkpoints  # rank 0's, at the end

    # --split directions: each process evaluates its own direction of every step on the whole
    # batch; the g's are those of one process evaluating both (up to the threads' sums).
    flags += ["--directions", "2", "--split", "directions", "--mode", "shadow", "--steps", "2"]
    out = tmp_path / "directions"
    done = subprocess.run(
        [*launch, *flags, "--output-dir", str(out)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    alone = _config(
        tiny,
        tmp_path,
        steps=2,
        eps=1e-2,
        directions=2,
        mode="shadow",
        output_dir=str(tmp_path / "2"),
    )
    shared, one = (
        Trajectory.load(out / "trajectory.json"),
        Trajectory.load(train(alone).files["trajectory"]),
    )
    assert shared.g.shape == one.g.shape == (2, 2)
    torch.testing.assert_close(torch.tensor(shared.g), torch.tensor(one.g), rtol=1e-4, atol=1e-6)


def test_compiled_forward_trains_like_the_eager_one(tiny, tmp_path):
    """compile=True runs the transformer through torch.compile (dynamic shapes); the in-place
    perturbations reach it, so the run is the eager one up to the compiled forward's last-bit
    rounding."""
    eager = train(_config(tiny, tmp_path / "eager", method="mezo"))
    compiled = train(_config(tiny, tmp_path / "compiled", method="mezo", compile=True))
    assert [h["step"] for h in compiled.history] == [h["step"] for h in eager.history]
    for a, b in zip(eager.history[1:], compiled.history[1:], strict=True):
        assert b["dev_loss"] == pytest.approx(a["dev_loss"], rel=1e-3)
    assert eager.history[-1]["dev_loss"] != eager.history[0]["dev_loss"]  # it did train


def test_compiled_shadow_forward_trains(tiny, tmp_path):
    """MeZO in bf16 (mode "shadow"; a small model: every tensor a preset, no hook) compiled:
    it trains, without recompiling as the presets swap in and out (one graph for the perturbed
    and the plain forwards; what the compiled forward sees: tests/test_shadow_ways.py)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    settings = dict(method="mezo", dtype="bfloat16", lr=1e-3, compile=True)
    compiled = train(_config(tiny, tmp_path / "compiled", **settings))
    assert compiled.config.resolved_mode == "shadow"
    assert 1 <= counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])
    assert compiled.diverged is None and compiled.steps == 6


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(method="adam"), "compile is for"),
        (dict(dtype="bfloat16"), "compile needs mode 'inplace' or 'shadow'"),
        (dict(mode="virtual"), "compile needs mode 'inplace' or 'shadow'"),
        (dict(compile="yes"), "compile must be true or false"),
    ],
)
def test_compile_refuses_what_it_cannot_serve(tiny, tmp_path, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        _config(tiny, tmp_path, **{"compile": True, **kwargs}).validate()
