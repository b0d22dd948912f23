"""zofast.train.pause: a zeroth-order run paused between steps (no weights kept) and resumed by
replay ends bit for bit as the uninterrupted run, in every mode the accuracy grid runs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from zofast.models import load_model
from zofast.train import ConfigError, TrainConfig, train
from zofast.train.pause import Paused, resume_paused

pytestmark = pytest.mark.usefixtures("one_thread")

TIMINGS = {"elapsed", "steps_per_s", "seconds", "train_seconds", "output_dir"}

# (method, dtype, the mode "auto" resolves to): the grid's ZO cells. mezo bf16 accumulates
# 64 steps per write, so every pause below has updates not yet written.
CASES = [
    ("mezo", "float32", "inplace"),  # pipelined: paused with the next +ε on the weights
    ("mezo", "bfloat16", "shadow"),
    ("lozo", "bfloat16", "virtual"),
    ("lozo-m", "bfloat16", "virtual"),  # momentum buffers rebuilt by replay
    ("lozo-m", "float32", "inplace"),
]


@pytest.fixture(scope="module")
def tiny(tiny_model_dirs):
    return str(tiny_model_dirs["bert-encoder"])


def _config(tiny, method, dtype, out, **extra):
    return TrainConfig(
        model=tiny, method=method, dtype=dtype, lr=1e-2, steps=9, eval_every=3, batch_size=8,
        log_every=2, seed=5, nu=4, output_dir=str(out), checkpoint_every=0, progress=False,
        plot=False, save_model=True, **extra,
    )  # fmt: skip


def _after(*steps):
    """A stop that pauses the run once after each of ``steps`` (counted over every call)."""
    seen = {"n": 0}

    def stop():
        seen["n"] += 1
        return seen["n"] in steps

    return stop


def _log(path) -> list[dict]:
    lines = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]
    return [{k: v for k, v in e.items() if k not in TIMINGS} for e in lines]


def _same(a, b):
    assert a.steps == b.steps and a.history == b.history and a.diverged is None
    assert (a.best_step, a.best_dev, a.test, a.final_dev) == (b.best_step, b.best_dev, b.test,
                                                              b.final_dev)  # fmt: skip
    for name in ("trajectory", "trajectory_best"):
        assert Path(a.files[name]).read_bytes() == Path(b.files[name]).read_bytes(), name
    assert _log(a.files["log"]) == _log(b.files["log"])
    wa = load_file(f"{a.files['model']}/model.safetensors")
    wb = load_file(f"{b.files['model']}/model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize(("method", "dtype", "mode"), CASES)
def test_paused_twice_and_resumed_ends_bit_for_bit(tiny, tmp_path, method, dtype, mode):
    a = train(_config(tiny, method, dtype, tmp_path / "a"))
    stop = _after(3, 5)  # pauses right after the evaluation at step 3, and after step 5
    paused = train(_config(tiny, method, dtype, tmp_path / "b"), stop=stop)
    assert isinstance(paused, Paused) and paused.steps == 3
    assert not (tmp_path / "b" / "result.json").exists()
    state = json.loads(json.dumps(paused.state, allow_nan=False))
    assert state["optimizer"]["hyperparameters"]["mode"] == mode
    again = resume_paused(state, loaded=load_model(tiny, dtype=dtype), stop=stop)
    assert isinstance(again, Paused) and again.steps == 5
    if dtype == "bfloat16" and method == "mezo":
        assert again.state["optimizer"]["deferred"], "pauses with unwritten updates"
    if dtype == "float32":
        assert again.state["optimizer"]["pending"] == 5, "pauses with a pipelined +ε"
    loaded = load_model(tiny, dtype=dtype)
    b = resume_paused(json.loads(json.dumps(again.state)), loaded=loaded, output_dir=tmp_path / "c")
    assert b.output_dir == str(tmp_path / "c")
    _same(a, b)
    best = load_file(f"{a.files['model']}/model.safetensors")
    named = dict(loaded.model.named_parameters())
    assert all(torch.equal(named[k], best[k]) for k in best), "the model ends holding the best"


def test_a_run_pauses_only_if_it_can_be_rebuilt_by_replay(tiny, tmp_path):
    with pytest.raises(ConfigError, match="only lozo, lozo-m, mezo runs pause"):
        train(_config(tiny, "adam", "float32", tmp_path / "a"), stop=lambda: True)
    assert not (tmp_path / "a").exists()
    offloaded = dataclasses.replace(_config(tiny, "mezo", "float32", tmp_path / "a"), offload=True)
    with pytest.raises(ConfigError, match="an offloaded run does not pause"):
        train(offloaded, stop=lambda: True)
    assert not (tmp_path / "a").exists()
    done = train(_config(tiny, "mezo", "float32", tmp_path / "b"), stop=lambda: False)
    assert not isinstance(done, Paused) and done.steps == 9


def test_bad_paused_states_are_refused_before_anything_is_written(tiny, tmp_path):
    bf16 = "bfloat16"  # virtual mode: a refused resume must take its hooks off the model too
    paused = train(_config(tiny, "lozo", bf16, tmp_path / "a"), stop=lambda: True)
    assert paused.steps == 1
    text = json.dumps(paused.state)
    out = tmp_path / "out"

    def refused(state, match, loaded=None):
        loaded = loaded or load_model(tiny, dtype=bf16)
        before = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
        with pytest.raises(ConfigError, match=match):
            resume_paused(state, loaded=loaded, output_dir=out)
        assert not out.exists()
        assert all(torch.equal(p, before[n]) for n, p in loaded.model.named_parameters())
        modules = list(loaded.model.modules())
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in modules)

    refused({"format": "x"}, "not a paused zofast run")
    state = json.loads(text)
    state["optimizer"]["trajectory"]["device"] = "cuda"
    refused(state, "paused on cuda and would resume on cpu")
    state = json.loads(text)
    state["optimizer"]["hyperparameters"]["eps"] = 1e-2
    refused(state, "optimizer has hyperparameters")
    state = json.loads(text)
    state["log"] = "not base64!"
    refused(state, "malformed paused run")
    other = load_model(tiny, dtype=bf16)
    with torch.no_grad():
        next(other.model.parameters()).add_(1.0)
    refused(json.loads(text), "not the base weights", loaded=other)
    # the same state, intact, resumes
    assert (
        resume_paused(json.loads(text), loaded=load_model(tiny, dtype=bf16), output_dir=out).steps
        == 9
    )
