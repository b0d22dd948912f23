"""zofast.train's method "lora": PEFT adapters on the attention projections, trained by Adam."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from zofast.models import load_model
from zofast.scoring import Scorer
from zofast.train import ConfigError, TrainConfig, evaluate, load_splits, resolve_task, train
from zofast.train.lora import attention_projections

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tiny_model_dirs):
    return str(tiny_model_dirs["bert-encoder"])


def _config(tiny, tmp_path, **kwargs):
    defaults = dict(
        model=tiny, method="lora", lr=1e-2, steps=8, eval_every=4, batch_size=8, seed=3,
        output_dir=str(tmp_path / "run"), progress=False, plot=False, log_every=1,
        zero_shot_test=False, checkpoint_every=0,
    )  # fmt: skip
    return TrainConfig(**{**defaults, **kwargs})


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _script_dev(monkeypatch, zero_shot, later):
    """Dev accuracies scripted (zero-shot's, then the loop's); the test split is evaluated for
    real (the demo's dev split has 64 examples, its test split 200)."""
    from zofast.train import evaluation, loop

    real = evaluation.evaluate
    for module, values in ((evaluation, [zero_shot]), (loop, later)):
        scores = iter(values)

        def scripted(scorer, examples, *args, scores=scores):
            return next(scores, (0.1, 9.0)) if len(examples) == 64 else real(scorer, examples)

        monkeypatch.setattr(module, "evaluate", scripted)


def test_lora_trains_only_the_attention_projections_and_leaves_a_plain_model(
    tiny, tmp_path, monkeypatch
):
    _script_dev(monkeypatch, (0.5, 1.0), [(0.9, 1.0)])  # the last step is the best
    loaded = load_model(tiny)
    base = _params(loaded.model)
    flags = {n: p.requires_grad for n, p in loaded.model.named_parameters()}
    generator = torch.random.get_rng_state()
    result = train(_config(tiny, tmp_path, steps=30, eval_every=30, log_every=5), loaded=loaded)
    assert torch.equal(torch.random.get_rng_state(), generator), "global RNG untouched"
    losses = _train_losses(result)
    assert losses[-1] < losses[0] - 0.05, losses
    targets = set(attention_projections(loaded.model))
    assert len(targets) == 8  # 2 layers × query, key, value, attention output
    changed = {n for n, p in loaded.model.named_parameters() if not torch.equal(p, base[n])}
    assert changed == {f"{t}.weight" for t in targets}, "only the projections' weights move"
    assert result.best_step == 30 and result.forwards == 90, "a first-order step counts 3"
    assert not any("lora" in n for n, _ in loaded.model.named_parameters())
    assert not hasattr(loaded.model, "peft_config")
    assert {n: p.requires_grad for n, p in loaded.model.named_parameters()} == flags
    config = _config(tiny, tmp_path)
    test = load_splits("demo", resolve_task(config))["test"]
    scorer = Scorer(loaded, resolve_task(config))
    assert evaluate(scorer, test)[0] == result.test, "the test accuracy is the merged model's"


def _train_losses(result):
    lines = Path(result.files["log"]).read_text(encoding="utf-8").splitlines()
    return [e["loss"] for e in map(json.loads, lines) if e["event"] == "train"]


def test_lora_keeps_the_best_dev_adapters(tiny, tmp_path, monkeypatch):
    # Dev accuracy peaks at step 2 of 4: the model must end as the 2-step run does.
    _script_dev(monkeypatch, (0.5, 1.0), [(0.6, 1.0), (0.9, 1.0), (0.7, 1.0)])
    four = load_model(tiny)
    result = train(_config(tiny, tmp_path / "a", steps=4, eval_every=1), loaded=four)
    assert result.best_step == 2 and result.steps == 4
    _script_dev(monkeypatch, (0.5, 1.0), [(0.6, 1.0), (0.9, 1.0)])
    two = load_model(tiny)
    assert train(_config(tiny, tmp_path / "b", steps=2, eval_every=1), loaded=two).best_step == 2
    base = load_model(tiny).model.state_dict()
    for (name, p), q in zip(four.model.named_parameters(), two.model.parameters(), strict=True):
        assert torch.equal(p, q), name
        if name in {f"{t}.weight" for t in attention_projections(four.model)}:
            assert not torch.equal(p, base[name]), name


def test_lora_best_at_step_0_is_the_base_model_bit_for_bit(tiny, tmp_path, monkeypatch):
    _script_dev(monkeypatch, (0.9, 1.0), [(0.5, 1.0)] * 3)
    loaded = load_model(tiny)
    base = _params(loaded.model)
    assert train(_config(tiny, tmp_path, steps=3, eval_every=1), loaded=loaded).best_step == 0
    assert all(torch.equal(p, base[n]) for n, p in loaded.model.named_parameters())


def test_lora_saved_model_is_the_merged_best(tiny, tmp_path):
    loaded = load_model(tiny)
    result = train(_config(tiny, tmp_path, save_model=True), loaded=loaded)
    saved = load_model(result.files["model"])
    for (name, p), q in zip(loaded.model.named_parameters(), saved.model.parameters(), strict=True):
        assert torch.equal(p, q), name


@pytest.mark.parametrize(
    ("arch", "expected"),
    [
        ("gpt2", {"transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj"}),
        ("opt", {f"model.decoder.layers.0.self_attn.{x}_proj" for x in "qkv"}
         | {"model.decoder.layers.0.self_attn.out_proj"}),
        ("llama", {f"model.layers.0.self_attn.{x}_proj" for x in "qkvo"}),
    ],
)  # fmt: skip
def test_attention_projections_of_the_decoder_families(tiny_model_dirs, arch, expected):
    names = attention_projections(load_model(tiny_model_dirs[arch]).model)
    assert {n for n in names if ".0." in n} == expected


def test_lora_runs_on_gpt2_conv1d(tiny_model_dirs, tmp_path):
    tiny = str(tiny_model_dirs["gpt2"])
    loaded = load_model(tiny)
    base = _params(loaded.model)
    result = train(_config(tiny, tmp_path, steps=3, eval_every=3), loaded=loaded)
    changed = {n for n, p in loaded.model.named_parameters() if not torch.equal(p, base[n])}
    assert result.best_step in (0, 3)
    assert result.best_step == 0 or changed == {
        f"transformer.h.{i}.attn.{m}.weight" for i in range(2) for m in ("c_attn", "c_proj")
    }


def test_lora_without_peft_is_one_config_error(tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)
    loaded = load_model(tiny)
    with pytest.raises(ConfigError, match="method lora needs peft"):
        train(_config(tiny, tmp_path), loaded=loaded)
    assert not (tmp_path / "run").exists(), "nothing written before the error"


def test_lora_rank_defaults_to_8():
    assert TrainConfig(method="lora").resolved_rank == 8
    assert TrainConfig(method="lozo").resolved_rank == 2
    with pytest.raises(ConfigError, match="rank must be an integer >= 1"):
        TrainConfig(method="lora", rank=0).validate()
