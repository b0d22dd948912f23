"""Tests of DFO-LoRA (zofast.dfo.lora, zofast.dfo.population, zofast.dfo.arch) on tiny models."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from helpers_models import TINY_ARCHS, TINY_KINDS

from zofast.data import load_demo
from zofast.dfo.arch import find_architecture
from zofast.dfo.fireworks import Fireworks
from zofast.dfo.lora import DFOLoRA, DFOLoRAConfig
from zofast.dfo.population import PopulationEvaluator, clipped_std
from zofast.models import LoadedModel, load_model
from zofast.perturb import gaussian_noise
from zofast.rng import RunSeeds
from zofast.scoring import Scorer

SMALL = {"rank": 2, "intrinsic_dim": 40, "popsize": 6}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_paths(tiny_model_dirs):
    return tiny_model_dirs


@pytest.fixture(scope="module")
def demo():
    data = load_demo()
    return {"train": data["train"][:16], "dev": data["dev"][:16], "test": data["test"][:24]}


def _load(tiny_paths, arch):
    lm = load_model(tiny_paths[arch])
    assert lm.kind == TINY_KINDS[arch]
    return lm


def _no_hooks(model) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_zero_vector_is_the_original_model(tiny_paths, demo, arch):
    lm = _load(tiny_paths, arch)
    scorer = Scorer(lm, "demo")
    batch = scorer.encode(demo["train"])
    ref = scorer.logits(batch)
    dfo = DFOLoRA(lm, init="random", seed=3, **SMALL)
    assert torch.equal(scorer.logits(batch), ref)
    rng = np.random.default_rng(0)
    dfo.set_z(rng.standard_normal((dfo.num_layers, dfo.intrinsic_dim)))
    assert not torch.equal(scorer.logits(batch), ref)
    dfo.set_z(np.zeros((dfo.num_layers, dfo.intrinsic_dim)))
    assert torch.equal(scorer.logits(batch), ref)
    dfo.set_z(rng.standard_normal((dfo.num_layers, dfo.intrinsic_dim)))
    dfo.remove()
    assert torch.equal(scorer.logits(batch), ref)
    assert _no_hooks(lm.model)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_batched_equals_sequential(tiny_paths, demo, arch):
    lm = _load(tiny_paths, arch)
    scorer = Scorer(lm, "demo")
    dfo = DFOLoRA(lm, init="random", seed=5, **SMALL)
    rng = np.random.default_rng(1)
    dfo.set_z(0.5 * rng.standard_normal((dfo.num_layers, dfo.intrinsic_dim)))
    batch = scorer.encode(demo["train"])
    ev = PopulationEvaluator(scorer, dfo.arch, dfo.hooks, [batch])
    full = PopulationEvaluator(scorer, dfo.arch, dfo.hooks, [batch], mode="full")
    assert ev.mode == "replay", ev.fallback_reason
    zs = rng.standard_normal((5, dfo.intrinsic_dim))
    for layer in range(dfo.num_layers):
        mats = dfo.factors(layer, zs)
        sequential = ev.sequential_losses(layer, mats)
        assert sequential.std() > 1e-4
        torch.testing.assert_close(ev.losses(layer, mats), sequential, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(full.losses(layer, mats), sequential, rtol=1e-5, atol=1e-5)
        dfo.evaluator, dfo.max_candidates = ev, 2  # chunks of 2 + 2 + 1 candidates
        chunked = torch.as_tensor(dfo._evaluate(layer, zs), dtype=torch.float32)
        torch.testing.assert_close(chunked, sequential, rtol=1e-5, atol=1e-5)
    # the candidate equal to the incumbents reproduces the model's own loss
    ref = float(torch.nn.functional.cross_entropy(scorer.logits(batch), batch.labels))
    assert ev.current_loss() == pytest.approx(ref, abs=1e-5)
    layer = dfo.num_layers - 1
    own = ev.losses(layer, dfo.factors(layer, dfo.incumbents[layer][None]))
    assert float(own[0]) == pytest.approx(ref, abs=1e-5)


def test_length_buckets_give_the_same_loss(tiny_paths, demo):
    lm = _load(tiny_paths, "bert-encoder")
    scorer = Scorer(lm, "demo")
    dfo = DFOLoRA(lm, init="random", seed=2, **SMALL)
    one = PopulationEvaluator(scorer, dfo.arch, dfo.hooks, dfo._encode(scorer, demo["train"], 1))
    four = PopulationEvaluator(scorer, dfo.arch, dfo.hooks, dfo._encode(scorer, demo["train"], 4))
    assert len(four.parts) == 4
    zs = np.random.default_rng(2).standard_normal((4, dfo.intrinsic_dim))
    mats = dfo.factors(1, zs)
    torch.testing.assert_close(one.losses(1, mats), four.losses(1, mats), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["roberta", "gpt2", "llama", "bert-encoder"])
def test_trimmed_tail_fused_gelu_and_merged_incumbents(tiny_paths, demo, arch):
    lm = _load(tiny_paths, arch)
    scorer = Scorer(lm, "demo")
    dfo = DFOLoRA(lm, init="random", seed=4, **SMALL)
    rng = np.random.default_rng(4)
    dfo.set_z(0.5 * rng.standard_normal((dfo.num_layers, dfo.intrinsic_dim)))
    batch = scorer.encode(demo["train"])
    ev = PopulationEvaluator(scorer, dfo.arch, dfo.hooks, [batch])
    plain = PopulationEvaluator(
        scorer, dfo.arch, dfo.hooks, [batch], trim=False, fuse_activations=False, merge=False
    )
    assert ev.trimmed == (arch != "bert-encoder"), ev.trim_reason
    assert plain.trim_reason == "disabled"
    assert (len(ev._activations) > 0) == (arch == "gpt2")
    params = {name: (p, p.detach().clone()) for name, p in lm.model.named_parameters()}
    with dfo.hooks.merged():  # incumbents merged into swapped-in weights: same logits
        merged_logits = scorer.logits(batch)
        assert any(p is not params[n][0] for n, p in lm.model.named_parameters())
    torch.testing.assert_close(merged_logits, scorer.logits(batch), rtol=1e-5, atol=1e-5)
    seen = []
    tail = lm.model.get_submodule(dfo.arch.tail_names[-1])
    handle = tail.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    zs = rng.standard_normal((3, dfo.intrinsic_dim))
    for layer in range(dfo.num_layers):
        mats = dfo.factors(layer, zs)
        seen.clear()
        fast = ev.losses(layer, mats)
        assert seen == [1 if ev.trimmed else batch.input_ids.shape[1]]
        torch.testing.assert_close(fast, plain.losses(layer, mats), rtol=1e-5, atol=1e-5)
    handle.remove()
    for name, p in lm.model.named_parameters():  # the model's own weights: same objects, values
        assert p is params[name][0] and torch.equal(p, params[name][1])
    if arch == "gpt2":  # gelu_new's formula equals the one-kernel tanh-GELU
        x = torch.linspace(-8, 8, 1001)
        act = ev._activations[0]
        with ev.fused_activations():
            fused = act(x)
        assert "forward" not in act.__dict__
        torch.testing.assert_close(fused, act(x), rtol=1e-6, atol=1e-6)
    if arch == "roberta":  # a tail that is not per-token fails the self-check: trim stays off
        bad = dataclasses.replace(dfo.arch, tail_names=(dfo.arch.targets[-1]["key"].module_name,))
        off = PopulationEvaluator(scorer, bad, dfo.hooks, [batch])
        assert not off.trimmed and off.trim_reason.startswith("the trimmed last layer")
        mats = dfo.factors(0, zs)
        torch.testing.assert_close(off.losses(0, mats), plain.losses(0, mats))
    assert _no_hooks_but(lm.model, dfo)


def _no_hooks_but(model, dfo) -> bool:
    """Only DFOLoRA's own forward hooks remain (the evaluators' pre-hooks are temporary)."""
    return all(not m._forward_pre_hooks for m in model.modules())


def test_gpt2_update_only_touches_query_and_key(tiny_paths):
    lm = _load(tiny_paths, "gpt2")
    c_attn = lm.model.transformer.h[0].attn.c_attn
    width = lm.model.config.n_embd
    dfo = DFOLoRA(lm, init="random", seed=1, **SMALL)
    dfo.set_z(np.random.default_rng(3).standard_normal((dfo.num_layers, dfo.intrinsic_dim)))
    mats = dfo.hooks.get_layer(0)
    inp = torch.randn(3, 5, width, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tuned = c_attn(inp)
        dfo.hooks.set_layer(0, None)
        plain = c_attn(inp)
    q = inp @ mats["query"][0] @ mats["query"][1]
    k = inp @ mats["key"][0] @ mats["key"][1]
    torch.testing.assert_close(tuned[..., :width], plain[..., :width] + q)
    torch.testing.assert_close(tuned[..., width : 2 * width], plain[..., width : 2 * width] + k)
    assert torch.equal(tuned[..., 2 * width :], plain[..., 2 * width :])
    # Conv1D weight is (in, 3·D): the plain output is x·W + b with W not transposed
    torch.testing.assert_close(plain, inp @ c_attn.weight + c_attn.bias)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_fit_decreases_the_loss(tiny_paths, demo, arch, tmp_path):
    lm = _load(tiny_paths, arch)
    dfo = DFOLoRA(lm, seed=7, **SMALL)
    log = tmp_path / "log.jsonl"
    budget = 1 + SMALL["popsize"] * dfo.num_layers * 6
    res = dfo.fit(demo["train"], demo["dev"], budget=budget, task="demo", log=log, progress=False)
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert lines[0]["step"] == 0 and lines[0]["calls"] == 1
    assert res.calls == budget and res.generations == len(lines) - 1
    losses = [line["loss"] for line in lines]
    assert all(b <= a for a, b in zip(losses, losses[1:], strict=False))
    assert res.train_loss < losses[0]
    assert {"step", "calls", "loss", "dev_acc", "elapsed"} <= set(lines[-1])
    assert lines[-1]["dev_acc"] is not None
    assert res.mode == "replay"
    assert res.best_dev_acc == max(h["dev_acc"] for h in res.history)


def test_alternation_and_single_optimizers(tiny_paths, demo, tmp_path):
    for optimizers in [("cma", "fwa"), ("cma",), ("fwa",)]:
        lm = _load(tiny_paths, "roberta")
        dfo = DFOLoRA(lm, optimizers=optimizers, seed=11, **SMALL)
        log = tmp_path / f"{'-'.join(optimizers)}.jsonl"
        budget = 1 + SMALL["popsize"] * dfo.num_layers * 4
        res = dfo.fit(demo["train"], None, budget=budget, task="demo", log=log, progress=False)
        lines = [json.loads(x) for x in log.read_text().splitlines()][1:]
        for line in lines:
            assert line["optimizer"] == optimizers[line["round"] % len(optimizers)]
        assert {line["round"] for line in lines} == {0, 1, 2, 3}
        assert res.train_loss < lines[0]["loss"] or res.train_loss <= lines[0]["gen_best"]
        assert res.best_dev_acc is None
        if optimizers == ("cma", "fwa"):
            assert set(dfo._es) == {(layer, o) for layer in range(dfo.num_layers) for o in (0, 1)}


def test_handover_injects_the_incumbent(tiny_paths, demo, tmp_path, monkeypatch):
    import cma

    injected = []
    original = cma.CMAEvolutionStrategy.inject

    def spy(self, solutions, force=None):
        injected.append((np.array(solutions[0]), force, dfo.incumbents))
        return original(self, solutions, force=force)

    created = []

    class SpyFireworks(Fireworks):
        def __init__(self, x0, sigma0, inopts=None):
            created.append((np.array(x0), dfo.incumbents, dfo._layer_pos))
            super().__init__(x0, sigma0, inopts)

    monkeypatch.setattr(cma.CMAEvolutionStrategy, "inject", spy)
    monkeypatch.setattr("zofast.dfo.lora.search.Fireworks", SpyFireworks)
    lm = _load(tiny_paths, "opt")
    dfo = DFOLoRA(lm, seed=4, **SMALL)
    log = tmp_path / "log.jsonl"
    budget = 1 + SMALL["popsize"] * dfo.num_layers * 3
    dfo.fit(demo["train"], None, budget=budget, task="demo", log=log, progress=False)
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    # layers whose incumbent FWA improved in round 1 are handed back to CMA-ES in round 2
    improved = [
        line["layer"]
        for prev, line in zip(lines, lines[1:], strict=False)
        if line["round"] == 1 and line["loss"] < prev["loss"]
    ]
    assert improved, "FWA should improve some layer in round 1"
    assert len(injected) == len(improved)
    for (z, force, incumbents), layer in zip(injected, improved, strict=True):
        assert force is True
        assert np.array_equal(z, incumbents[layer])
    # each layer's FWA is created in round 1 at that layer's incumbent from round 0
    assert [layer for _, _, layer in created] == list(range(dfo.num_layers))
    for x0, incumbents, layer in created:
        assert np.array_equal(x0, incumbents[layer])
    assert any(np.any(x0) for x0, _, _ in created)


def test_seeded_runs_are_reproducible(tiny_paths, demo):
    runs = []
    state = np.random.get_state()
    for seed in (21, 21, 22):
        lm = _load(tiny_paths, "llama")
        dfo = DFOLoRA(lm, seed=seed, **SMALL)
        budget = 1 + SMALL["popsize"] * dfo.num_layers * 4
        res = dfo.fit(demo["train"], demo["dev"], budget=budget, task="demo", progress=False)
        runs.append((dfo.incumbents, res.train_loss, [h["dev_acc"] for h in res.history]))
    assert np.array_equal(runs[0][0], runs[1][0])
    assert runs[0][1:] == runs[1][1:]
    assert not np.array_equal(runs[0][0], runs[2][0])
    after = np.random.get_state()
    assert state[0] == after[0] and np.array_equal(state[1], after[1])  # numpy global untouched


def test_projections_from_seeds_and_init_scales(tiny_paths, demo):
    lm = _load(tiny_paths, "bert-encoder")
    cached = DFOLoRA(lm, init="random", seed=9, cache_projections=True, **SMALL)
    seed = RunSeeds(9).seed(1, 2, "search")
    expected = gaussian_noise((32 * 2, 10), seed)
    assert torch.equal(cached.projection(1, 2), expected)
    zs = np.random.default_rng(0).standard_normal((3, 40))
    a = cached.factors(1, zs)
    cached.remove()
    regen = DFOLoRA(lm, init="random", seed=9, cache_projections=False, **SMALL)
    b = regen.factors(1, zs)
    regen.projection(0, 0)
    assert all(k[0] == 0 for k in regen.projections._cached)
    for name in a:
        assert torch.equal(a[name][0], b[name][0]) and torch.equal(a[name][1], b[name][1])
    # A entries start with std ~ alpha * sigma_l
    assert float(a["query"][0].std()) == pytest.approx(regen.alpha, rel=0.3)
    regen.remove()
    assert np.array_equal(DFOLoRA(lm, init="random", **SMALL).layer_stds, np.ones(2))

    lm = _load(tiny_paths, "bert-encoder")
    dfo = DFOLoRA(lm, init="hidden", seed=9, **SMALL)
    assert dfo.layer_stds is None
    with pytest.raises(RuntimeError, match="fit"):
        dfo.factors(0, zs)
    dfo.fit(demo["train"], None, budget=SMALL["popsize"] + 1, task="demo", progress=False)
    emb = lm.model.get_input_embeddings().weight
    assert dfo.layer_stds[0] == pytest.approx(clipped_std(emb))
    scorer = Scorer(lm, "demo")
    batch = scorer.encode(demo["train"])
    hidden = lm.model(
        **{"input_ids": batch.input_ids, "attention_mask": batch.attention_mask},
        output_hidden_states=True,
    ).hidden_states
    assert dfo.layer_stds[1] == pytest.approx(
        clipped_std(hidden[1][batch.attention_mask.bool()]), rel=1e-3
    )


def test_clipped_std_ignores_outliers():
    values = torch.cat(
        [torch.randn(10_000, generator=torch.Generator().manual_seed(0)), torch.tensor([1e4])]
    )
    assert values.std() > 50
    assert clipped_std(values) == pytest.approx(1.0, rel=0.05)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_peft_export_round_trip(tiny_paths, demo, arch, tmp_path):
    peft = pytest.importorskip("peft")
    lm = _load(tiny_paths, arch)
    dfo = DFOLoRA(lm, seed=13, **SMALL)
    budget = 1 + SMALL["popsize"] * dfo.num_layers * 3
    dfo.fit(demo["train"], demo["dev"], budget=budget, task="demo", progress=False)
    if not np.any(dfo.z):
        dfo.set_z(dfo.incumbents)
    assert np.any(dfo.z)
    scorer = Scorer(lm, "demo")
    batch = scorer.encode(demo["test"])
    tuned = scorer.logits(batch)
    out = dfo.export_peft(tmp_path / "adapter")
    config = json.loads((out / "adapter_config.json").read_text())
    fresh = load_model(tiny_paths[arch])
    assert not torch.equal(Scorer(fresh, "demo").logits(batch), tuned)
    peft_model = peft.PeftModel.from_pretrained(fresh.model, str(out))
    wrapped = LoadedModel(peft_model.get_base_model(), fresh.tokenizer, fresh.kind, fresh.name)
    # same maths, different operation order ((x·A)·B vs PEFT's linear layers): rounding only
    tol = 1e-5 * max(1.0, float(tuned.abs().max()))
    torch.testing.assert_close(Scorer(wrapped, "demo").logits(batch), tuned, rtol=1e-4, atol=tol)
    from safetensors.torch import load_file

    weights = load_file(str(out / "adapter_model.safetensors"))
    if arch == "gpt2":
        assert config["fan_in_fan_out"] is True and config["r"] == 2 * SMALL["rank"]
        width = lm.model.config.n_embd
        for key, w in weights.items():
            if key.endswith("lora_B.weight"):
                assert w.shape == (3 * width, 2 * SMALL["rank"])
                assert not torch.any(w[2 * width :])
    else:
        assert config["fan_in_fan_out"] is False and config["r"] == SMALL["rank"]
        assert config["lora_alpha"] == config["r"]
    assert len(config["target_modules"]) == len(weights) // 2


def test_save_load_resume(tiny_paths, demo, tmp_path):
    lm = _load(tiny_paths, "roberta")
    dfo = DFOLoRA(lm, seed=17, **SMALL)
    per_round = SMALL["popsize"] * dfo.num_layers
    first = 1 + per_round * 2 + SMALL["popsize"]  # stops mid-round
    res = dfo.fit(demo["train"], demo["dev"], budget=first, task="demo", progress=False)
    assert dfo._layer_pos == 1
    scorer = Scorer(lm, "demo")
    batch = scorer.encode(demo["test"])
    tuned = scorer.logits(batch)
    dfo.save(tmp_path / "ckpt")
    assert not list((tmp_path / "ckpt").glob("*.pkl"))

    resumed = []
    for _ in range(2):
        fresh = _load(tiny_paths, "roberta")
        back = DFOLoRA.load(tmp_path / "ckpt", fresh)
        assert np.array_equal(back.incumbents, dfo.incumbents)
        assert np.array_equal(back.z, dfo.z)
        assert np.array_equal(back.layer_stds, dfo.layer_stds)
        assert back._best["dev_acc"] == res.best_dev_acc
        assert np.array_equal(back._best["z"], dfo._best["z"])
        assert (back.calls, back._round, back._layer_pos) == (dfo.calls, 2, 1)
        assert back.train_loss == dfo.train_loss
        torch.testing.assert_close(Scorer(fresh, "demo").logits(batch), tuned, rtol=0, atol=0)
        second = first + per_round * 2
        res2 = back.fit(demo["train"], demo["dev"], budget=second, task="demo", progress=False)
        assert res2.calls == second and res2.generations == res.generations + 2 * dfo.num_layers
        assert res2.train_loss <= res.train_loss
        assert res2.best_dev_acc >= res.best_dev_acc
        assert len(res2.history) > len(res.history)
        resumed.append((back.incumbents, res2.train_loss))
    assert np.array_equal(resumed[0][0], resumed[1][0]) and resumed[0][1] == resumed[1][1]
    # the optimizers' states (CMA-ES and Fireworks) are restored: resuming is the same search
    uninterrupted = dfo.fit(demo["train"], demo["dev"], budget=second, task="demo", progress=False)
    assert np.array_equal(dfo.incumbents, resumed[0][0])
    assert uninterrupted.train_loss == resumed[0][1]

    other = _load(tiny_paths, "gpt2")
    with pytest.raises(ValueError, match="different architecture"):
        DFOLoRA.load(tmp_path / "ckpt", other)
    with pytest.raises(ValueError, match="overridden"):
        DFOLoRA.load(tmp_path / "ckpt", _load(tiny_paths, "roberta"), rank=8)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rank": 0}, "rank"),
        ({"intrinsic_dim": 0}, "intrinsic_dim"),
        ({"intrinsic_dim": 3}, "intrinsic_dim"),
        ({"popsize": 1}, "popsize"),
        ({"optimizers": ("cma", "pso")}, "optimizers"),
        ({"optimizers": ()}, "optimizers"),
        ({"targets": ("query", "output")}, "target"),
        ({"init": "zeros"}, "init"),
        ({"sigma": 0.0}, "sigma"),
        ({"seed": -1}, "seed"),
        ({"fwa_options": {"seed": 3}}, "fwa_options"),
        ({"mode": "fast"}, "mode"),
    ],
)
def test_bad_arguments_leave_the_model_untouched(tiny_paths, demo, kwargs, match):
    lm = _load(tiny_paths, "bert")
    before = _params(lm.model)
    with pytest.raises(ValueError, match=match):
        DFOLoRA(lm, **{**SMALL, **kwargs})
    assert all(torch.equal(a, b) for a, b in zip(before, lm.model.parameters(), strict=True))
    assert _no_hooks(lm.model)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_attaching_twice_raises_and_leaves_the_model_untouched(tiny_paths, demo, arch):
    lm = _load(tiny_paths, arch)
    scorer = Scorer(lm, "demo")
    batch = scorer.encode(demo["train"])
    first = DFOLoRA(lm, init="random", seed=3, **SMALL)
    first.set_z(np.random.default_rng(0).standard_normal((first.num_layers, first.intrinsic_dim)))
    tuned = scorer.logits(batch)
    hooks = {n: dict(m._forward_hooks) for n, m in lm.model.named_modules()}
    with pytest.raises(ValueError, match="already has DFO-LoRA hooks"):
        DFOLoRA(lm, init="random", seed=4, **SMALL)
    assert {n: dict(m._forward_hooks) for n, m in lm.model.named_modules()} == hooks
    assert torch.equal(scorer.logits(batch), tuned)
    first.remove()
    second = DFOLoRA(lm, init="random", seed=4, **SMALL)  # allowed once the first is removed
    second.remove()
    assert _no_hooks(lm.model)


def test_config_object_equals_keywords(tiny_paths):
    lm = _load(tiny_paths, "bert")
    config = DFOLoRAConfig(init="random", seed=3, targets=("key", "query"), **SMALL)
    assert config.targets == ("query", "key")
    a = DFOLoRA(lm, config=config)
    zs = np.random.default_rng(2).standard_normal((3, a.intrinsic_dim))
    fa = a.factors(1, zs)
    a.remove()
    b = DFOLoRA(lm, init="random", seed=3, **SMALL)
    fb = b.factors(1, zs)
    b.remove()
    assert all(torch.equal(fa[k][i], fb[k][i]) for k in fa for i in (0, 1))
    with pytest.raises(ValueError, match="not both"):
        DFOLoRA(lm, rank=3, config=config)
    with pytest.raises(ValueError, match="popsize"):
        DFOLoRAConfig(popsize=1)
    assert _no_hooks(lm.model)


def test_bad_models_and_budgets(tiny_paths, demo):
    plain = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    with pytest.raises(ValueError, match="no recognised attention layers"):
        DFOLoRA(plain)
    assert _no_hooks(plain)
    with pytest.raises(ValueError, match="no recognised attention layers"):
        find_architecture(plain)

    lm = _load(tiny_paths, "opt")
    scorer = Scorer(lm, "demo")
    batch = scorer.encode(demo["train"])
    ref = scorer.logits(batch)
    before = _params(lm.model)
    dfo = DFOLoRA(lm, **SMALL)
    with pytest.raises(ValueError, match="smaller than one generation"):
        dfo.fit(demo["train"], demo["dev"], budget=SMALL["popsize"] - 1, task="demo")
    with pytest.raises(ValueError, match="task"):
        dfo.fit(demo["train"], demo["dev"], budget=100)
    with pytest.raises(ValueError, match="at least one training example"):
        dfo.fit([], demo["dev"], budget=100, task="demo")
    bare = DFOLoRA(_load(tiny_paths, "opt").model, **SMALL)
    with pytest.raises(ValueError, match="scorer"):
        bare.fit(demo["train"], None, budget=100, task="demo")
    assert dfo.calls == 0 and dfo.layer_stds is None
    assert torch.equal(scorer.logits(batch), ref)
    assert all(torch.equal(a, b) for a, b in zip(before, lm.model.parameters(), strict=True))


def test_bare_model_with_scorer(tiny_paths, demo):
    lm = _load(tiny_paths, "gpt2")
    scorer = Scorer(lm, "demo")
    dfo = DFOLoRA(lm.model, **SMALL)
    res = dfo.fit(demo["train"], None, budget=1 + 6 * 4, scorer=scorer, progress=False)
    assert res.calls == 25
    with pytest.raises(ValueError, match="wrap the model"):
        dfo.fit(demo["train"], None, budget=50, scorer=Scorer(_load(tiny_paths, "gpt2"), "demo"))


@pytest.mark.parametrize("diagonal", [True, False])
def test_cma_state_round_trip_continues_identically(diagonal):
    cma = pytest.importorskip("cma")
    from zofast.dfo.state import cma_state, set_cma_state

    def make():
        rng = np.random.Generator(np.random.PCG64(3))
        opts = {
            "popsize": 8,
            "seed": np.nan,
            "randn": lambda *shape: rng.standard_normal(shape),
            "CMA_diagonal": diagonal,
            "verbose": -9,
            "verb_disp": 0,
            "verb_log": 0,
        }
        return cma.CMAEvolutionStrategy(np.zeros(12), 0.7, opts), rng

    def f(x):
        return float(np.sum((x - 1.0) ** 2 * np.arange(1, 13)))

    es, rng = make()
    for _ in range(5):
        xs = es.ask()
        es.tell(xs, [f(x) for x in xs])
    tags, arrays = cma_state(es)
    tags = json.loads(json.dumps(tags, allow_nan=False))
    twin, twin_rng = make()
    set_cma_state(twin, tags, {k: v.copy() for k, v in arrays.items()})
    twin_rng.bit_generator.state = json.loads(json.dumps(rng.bit_generator.state))
    for _ in range(20):
        xa, xb = es.ask(), twin.ask()
        assert all(np.array_equal(a, b) for a, b in zip(xa, xb, strict=True))
        es.tell(xa, [f(x) for x in xa])
        twin.tell(xb, [f(x) for x in xb])
    assert twin.sigma == es.sigma and twin.result.fbest == es.result.fbest
