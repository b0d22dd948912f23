"""Paired steps (``LOZO(..., paired=True)``, zofast.optim.paired and zofast.paired_layers): one
forward over the batch stacked twice gives (L+, L−). CPU, tiny models (a toy model that takes
every way of zofast.paired_layers, GPT-2 and OPT built from configs, a BERT encoder and the
embedded MiniLM through zofast train's scorer).

* Lockstep: a paired optimizer and a two-forward one in the same mode step together, the paired
  one given the two-forward step's losses. Every copy of the paired forward must then be the
  two-forward step's +ε or −ε forward (float32: to 4e-6 of the outputs' size; bf16: no further
  from a float32 reference than twice the two-forward step's own distance), and the weights,
  optimizer state and trajectory must stay bit-identical step after step: the update is the
  two-forward step's, every LOZO variant, ν refreshes included.
* Free runs: with their own losses the two runs' g's and weights agree to float32 rounding.
* Failures leave the weights bit-identical; what cannot be paired is refused with one error.
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers_models import tiny_gpt2_lm, tiny_opt_lm

import zofast.paired
from zofast.optim import LOZO, MeZO
from zofast.perturb import gaussian_noise, lowrank_factors
from zofast.replay import replay
from zofast.trajectory import Trajectory

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, ROWS, LENGTH = 12, 4, 5


class Custom(torch.nn.Module):
    """A module with its own forward: its tensors take the "split" way."""

    def __init__(self, d):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(d))
        self.table = torch.nn.Parameter(torch.randn(8, d))

    def forward(self, x):
        return x * self.scale + self.table[: x.shape[1]]


class Toy(torch.nn.Module):
    """Every way: virtual / product and rows (a broadcast positional embedding too), bias, a
    LayerNorm, an RMSNorm, a Linear on flattened tokens (as OPT's MLP), a custom module."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(VOCAB, 8)
        self.pos = torch.nn.Embedding(8, 8)
        self.lin = torch.nn.Linear(8, 8)
        self.norm = torch.nn.LayerNorm(8)
        self.custom = Custom(8)
        self.flat = torch.nn.Linear(8, 8)
        self.rms = torch.nn.RMSNorm(8)
        self.head = torch.nn.Linear(8, 3)
        with torch.no_grad():  # affine parameters away from 1 and 0
            for norm in (self.norm, self.rms):
                norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.uniform_(-0.5, 0.5)

    def forward(self, ids):
        h = self.emb(ids) + self.pos(torch.arange(ids.shape[1])[None])  # pos: (1, L, 8)
        h = self.norm(torch.tanh(self.lin(h)))
        h = self.custom(h)
        h = self.flat(h.reshape(-1, 8)).view(h.shape)
        return self.head(self.rms(h))


VARIANTS = {
    "lozo-r1": {"rank": 1},
    "lozo-r2": {"rank": 2},
    "lozo-m": {"rank": 2, "momentum": 0.9},
}


class Evaluation:
    """Batch k of a case: ``two()`` (a two-forward closure), ``paired()`` (its paired closure),
    ``pick(out)`` (what the recorder keeps of the model's output) and ``reference(m)`` (the
    outputs and loss of a plain model m on the batch)."""


def toy_evaluation(model, k):
    e = Evaluation()
    gen = torch.Generator().manual_seed(100 + k)
    ids = torch.randint(0, VOCAB, (ROWS, LENGTH), generator=gen)
    y = torch.randn(ROWS, LENGTH, 3, generator=gen)

    def paired():
        out = model(torch.cat([ids, ids])).float()
        return torch.stack([F.mse_loss(out[:ROWS], y), F.mse_loss(out[ROWS:], y)])

    def reference(m):
        out = m(ids)
        return out, F.mse_loss(out, y.to(out.dtype))

    e.two, e.paired, e.pick, e.reference = (
        lambda: F.mse_loss(model(ids).float(), y), paired, lambda out: out, reference
    )  # fmt: skip
    return e


def lm_evaluation(model, k):
    e = Evaluation()
    gen = torch.Generator().manual_seed(200 + k)
    ids = torch.randint(3, 50, (3, 10), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0  # padding: OPT's positions follow the mask
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}

    def reference(m):
        out = m(**inputs)
        return out.logits, out.loss

    e.two, e.paired = (lambda: model(**inputs).loss), lambda: zofast.paired.losses(model, inputs)
    e.pick, e.reference = (lambda out: out.logits), reference
    return e


class ScorerCase:
    """zofast train's path: a BERT encoder (MiniLM's kind) scored by zofast.scoring.Scorer."""

    def __init__(self, loaded, batch_size):
        from zofast.data import load_demo
        from zofast.scoring import Scorer

        self.scorer, self.batch_size = Scorer(loaded, "sst-2"), batch_size
        self.examples = load_demo()["train"]
        self.model = loaded.model.eval()

    def evaluation(self, model, k):
        e, scorer = Evaluation(), self.scorer
        batch = scorer.encode(self.examples[k * self.batch_size : (k + 1) * self.batch_size])
        stacked = batch.repeat(2)

        def on(m, f, b):
            scorer.model = m
            return f(b)

        def reference(m):
            return on(m, scorer.forward_hidden, batch), on(m, scorer.loss, batch)

        e.two = lambda: on(model, scorer.loss, batch)
        e.paired = lambda: on(model, scorer.losses, stacked)
        e.pick, e.reference = (lambda out: out.last_hidden_state), reference
        return e


CASES = {
    "toy": (Toy, toy_evaluation),
    "gpt2": (lambda: tiny_gpt2_lm().eval(), lm_evaluation),
    "opt": (lambda: tiny_opt_lm().eval(), lm_evaluation),
}


def optimizer(model, paired, mode, variant, **extra):
    kwargs = dict(lr=1e-2, eps=1e-2, nu=3, seed=9, mode=mode, paired=paired, **VARIANTS[variant])
    if mode == "shadow":
        kwargs["weight_decay"] = 1e-2
    elif not paired:
        kwargs["virtual_rest"] = "shadow"  # as paired (float32 would run them in place)
    return LOZO(model, **{**kwargs, **extra})


def recorder(model):
    seen: list = []
    state = {"pick": None}
    handle = model.register_forward_hook(
        lambda m, a, out: seen.append(state["pick"](out).detach().float().clone())
    )
    return seen, state, handle


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def state_of(opt):
    return [
        {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
        for g in opt.param_groups
        for p in g["params"]
    ]


def same_state(a, b):
    return all(
        x.keys() == y.keys()
        and all(torch.equal(x[k], y[k]) if torch.is_tensor(x[k]) else x[k] == y[k] for k in x)
        for x, y in zip(a, b, strict=True)
    )


def effective(opt, model, plain, sign):
    """`plain` (a float64 copy of the model without hooks) given the weights the paired step's
    copy of sign ±1 computes with, from the stored weights and the step's state alone, in
    float64: W + A·V_Aᵀ ± c·U·Vᵀ (virtual), W ± c·U·Vᵀ or W ± c·z (the others)."""
    params = dict(plain.named_parameters())
    names = {id(p): n for n, p in model.named_parameters()}
    with torch.no_grad():
        if opt._virtual is not None:
            for slot in opt._virtual.slots:
                vt = slot.virtual
                w = vt.param.double().reshape(vt.m, vt.n)
                if vt.A is not None:
                    w = w + vt.A.double() @ vt.V_A.double().T
                w = w + sign * vt.c * (vt.U.double() @ vt.V.double().T)
                params[names[id(vt.param)]].copy_(w.view(vt.param.shape))
        for st in opt._shadow.layers.tensors:
            if st.rank:
                U, V = lowrank_factors(st.param.shape, *st.seeds, st.rank)
                z = (U.double() @ V.double().T).view(st.param.shape)
            else:
                z = gaussian_noise(st.param.shape, st.seeds[0]).double()
            params[names[id(st.param)]].copy_(st.param.double() + sign * st.c * z)
    return plain


def lockstep(make, evaluation, mode, variant, dtype=torch.float32, steps=7):
    """A two-forward run and a paired run in lockstep, the paired one given the two-forward
    losses, and a float64 evaluation of each copy's effective weights. Checks on the way that
    the weights, state and trajectories stay bit-identical; returns the relative errors of the
    two runs' outputs against the reference, forward by forward, and of their L+ − L−, step by
    step: {"two": (outputs, differences), "paired": (...)}."""
    start = make().to(dtype)
    plain = copy.deepcopy(start).double()
    models = {kind: copy.deepcopy(start) for kind in ("two", "paired")}
    opts = {kind: optimizer(models[kind], kind == "paired", mode, variant) for kind in models}
    records = {kind: recorder(models[kind]) for kind in models}
    refs, losses = [], {"two": [], "paired": []}
    for k in range(steps):
        evals = {kind: evaluation(models[kind], k) for kind in models}
        for kind in models:
            records[kind][1]["pick"] = evals[kind].pick
        opts["two"].step(evals["two"].two)
        pair = opts["two"].last_losses
        losses["two"].append(pair)

        def drive(pair=pair, e=evals["paired"]):
            for sign in (1, -1):
                out, loss = e.reference(effective(opts["paired"], models["paired"], plain, sign))
                refs.append((out.detach(), loss.item()))
            losses["paired"].append(tuple(e.paired().tolist()))  # the paired forward runs
            return pair

        opts["paired"].step(drive)
        weights = zip(snapshot(models["two"]), snapshot(models["paired"]), strict=True)
        assert all(torch.equal(a, b) for a, b in weights), f"step {k}: weights differ"
        assert same_state(state_of(opts["two"]), state_of(opts["paired"])), f"step {k}"
    for _, _, handle in records.values():
        handle.remove()
    traj = {kind: opts[kind].trajectory for kind in models}
    assert traj["two"].g.tolist() == traj["paired"].g.tolist()
    assert traj["two"].events == traj["paired"].events
    for opt in opts.values():
        opt.detach()
    outputs = {"two": records["two"][0], "paired": halves(records["paired"][0])}
    assert len(outputs["two"]) == len(outputs["paired"]) == len(refs) == 2 * steps
    errors = {}
    for kind in models:
        out = [
            ((got.double() - ref).abs().max() / ref.abs().max()).item()
            for got, (ref, _) in zip(outputs[kind], refs, strict=True)
        ]
        want = [refs[2 * t][1] - refs[2 * t + 1][1] for t in range(steps)]
        diffs = [abs(lp - lm - w) for (lp, lm), w in zip(losses[kind], want, strict=True)]
        errors[kind] = (out, diffs)
    return errors


def halves(outputs):
    """The paired run's outputs split into the two-forward order: +, −, +, −, ..."""
    out = []
    for full in outputs:
        n = full.shape[0] // 2
        out += [full[:n], full[n:]]
    return out


def check_accuracy(errors, floor, difference_factor=2.0):
    """The paired forwards are no less accurate than the two-forward ones against the float64
    reference: a paired copy's largest relative error is at most twice the two-forward
    forwards' largest (plus `floor`, a few ulps: both are at rounding level), and the mean error
    of L+ − L− (which g divides by 2ε) at most `difference_factor` times theirs."""
    (out_two, diff_two), (out_paired, diff_paired) = errors["two"], errors["paired"]
    assert max(out_paired) <= 2 * max(out_two) + floor, (max(out_paired), max(out_two))
    mean_two, mean_paired = sum(diff_two) / len(diff_two), sum(diff_paired) / len(diff_paired)
    assert mean_paired <= difference_factor * mean_two + 8 * 2.0**-24, (mean_paired, mean_two)


# Each copy is a two-forward evaluation; the update path is the two-forward step's.


@pytest.mark.parametrize("mode", ["virtual", "shadow"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("arch", list(CASES))
def test_each_copy_is_a_two_forward_evaluation_float32(arch, variant, mode):
    """Steps 0..6 with ν = 3 (V refreshes at 3 and 6, a pending A at every later step), the
    paired run given the two-forward losses: weights, optimizer state and trajectories stay
    bit-identical, and each copy is as close to a float64 evaluation of its effective weights
    as the two-forward forwards are (check_accuracy; floor: 8 float32 ulps)."""
    check_accuracy(lockstep(*CASES[arch], mode, variant), floor=8 * 2.0**-24)


@pytest.mark.parametrize("mode", ["virtual", "shadow"])
@pytest.mark.parametrize("variant", ["lozo-r2", "lozo-m"])
@pytest.mark.parametrize("arch", list(CASES))
def test_each_copy_is_a_two_forward_evaluation_bfloat16(arch, variant, mode):
    """The same with bf16 weights (stochastic rounding of the updates included in the
    bit-identical update path; floor: 8 bf16 ulps). L+ − L− of bf16 forwards is noisy over 7
    steps (the paired / two-forward ratio of its mean error measured 0.6–2.0 over these cases):
    bounded at 3×."""
    errors = lockstep(*CASES[arch], mode, variant, dtype=torch.bfloat16)
    check_accuracy(errors, floor=8 * 2.0**-8, difference_factor=3.0)


def free_run(arch, mode, variant, paired, steps=10):
    make, evaluation = CASES[arch]
    model = make()
    opt = optimizer(model, paired, mode, variant)
    for k in range(steps):
        e = evaluation(model, k)
        opt.step(e.paired if paired else e.two)
    opt.detach()
    return model, opt


@pytest.mark.parametrize("mode", ["virtual", "shadow"])
@pytest.mark.parametrize("variant", ["lozo-r2", "lozo-m"])
@pytest.mark.parametrize("arch", list(CASES))
def test_free_runs_agree(arch, variant, mode):
    """Each run with its own losses, 10 steps, ν = 3: the g's agree to 1e-4 of their size (the
    losses differ in their last float32 bits, which g divides by 2ε = 0.02, and the runs drift
    apart by that; measured ≤ 1.6e-5), and the settled weights differ by at most 1e-4 of how
    far training moved them (measured ≤ 2.6e-5; a wrong update would differ by O(1))."""
    start = torch.cat([p.reshape(-1) for p in snapshot(CASES[arch][0]())])
    runs = [free_run(arch, mode, variant, paired) for paired in (False, True)]
    (two, opt_two), (paired, opt_paired) = runs
    g_two, g_paired = opt_two.trajectory.g, opt_paired.trajectory.g
    assert abs(g_paired - g_two).max() <= 1e-4 * abs(g_two).max()
    w_two, w_paired = (torch.cat([p.reshape(-1) for p in snapshot(m)]) for m in (two, paired))
    assert (w_paired - w_two).norm() <= 1e-4 * (w_two - start).norm()
    assert opt_paired.trajectory.hyperparameters["paired"] is True
    assert "paired" not in opt_two.trajectory.hyperparameters


@pytest.mark.parametrize("mode", ["virtual", "shadow"])
def test_several_directions_per_step(mode):
    """directions=3: one paired forward per direction, the same g's as the two-forward step's
    six forwards (to float32 rounding, as test_free_runs_agree), the trajectory's g per
    direction."""
    runs = []
    for paired in (False, True):
        model = Toy()
        opt = optimizer(model, paired, mode, "lozo-m", directions=3)
        calls = []
        for k in range(4):
            e = toy_evaluation(model, k)
            closure = e.paired if paired else e.two
            opt.step(lambda closure=closure, calls=calls: (calls.append(1), closure())[1])
        opt.detach()
        assert len(calls) == 4 * (3 if paired else 6)
        runs.append(opt.trajectory.g)
    two, paired = runs
    assert two.shape == paired.shape == (4, 3)
    assert abs(paired - two).max() <= 1e-4 * abs(two).max()


def test_modes_and_names():
    model = Toy()
    opt = LOZO(model, lr=1e-2, paired=True)  # float32: "auto" is virtual with a shadow rest
    assert (opt.mode, opt.paired, opt.exact) == ("virtual", True, True)
    assert opt.virtual_names == [
        "emb.weight", "pos.weight", "lin.weight", "flat.weight", "head.weight"
    ]  # fmt: skip
    ways = {st.name: [u.way for u in st.uses] for st in opt._shadow.layers.tensors}
    assert ways == {  # the Linears' biases: added by their virtual weights' products
        "lin.bias": ["fused"],
        "norm.weight": ["norm"],
        "norm.bias": ["norm"],
        "custom.scale": ["split"],
        "custom.table": ["split"],
        "flat.bias": ["fused"],
        "rms.weight": ["norm"],
        "head.bias": ["fused"],
    }
    opt.detach()
    opt = LOZO(model, lr=1e-2, paired=True, weight_decay=1e-3)  # decay: shadow
    assert opt.mode == "shadow"
    ways = {st.name: [u.way for u in st.uses] for st in opt._shadow.layers.tensors}
    assert ways["emb.weight"] == ["rows"] and ways["lin.weight"] == ["product"]
    opt.detach()
    opt = LOZO(tiny_gpt2_lm(), lr=1e-2, paired=True, mode="shadow")  # the tied head: both
    wte = [st for st in opt._shadow.layers.tensors if st.name == "transformer.wte.weight"]
    assert sorted(u.way for u in wte[0].uses) == ["product", "rows"]


@pytest.mark.parametrize("arch", ["toy", "gpt2"])
def test_factors_padded_as_on_a_gpu(arch, monkeypatch):
    """The virtual factors' columns zero-padded to 8 (as on a GPU, where cuBLAS wants aligned
    operands), a fused bias's column among them: the same results."""
    import zofast.paired_ways

    monkeypatch.setattr(zofast.paired_ways, "factor_width", lambda k, device: -(-k // 8) * 8)
    check_accuracy(lockstep(*CASES[arch], "virtual", "lozo-m"), floor=8 * 2.0**-24)


@pytest.mark.parametrize("frozen", ["weight", "bias"])
def test_a_norm_with_one_affine_tensor_frozen(frozen):
    """A LayerNorm whose weight or bias is frozen: each copy is still as accurate."""

    def make():
        model = Toy()
        getattr(model.norm, frozen).requires_grad_(False)
        return model

    check_accuracy(lockstep(make, toy_evaluation, "virtual", "lozo-r2", steps=4), 8 * 2.0**-24)


# zofast train, the scorer, the embedded MiniLM, ZOTrainer.


def test_scorer_of_a_bert_encoder(tiny_model_dirs):
    """zofast train's scorer on the encoder kind (MiniLM's): 2B rows of examples and label
    descriptions, embeddings with broadcast positions; LOZO-M, ν = 3."""
    from zofast.models import load_model

    case = ScorerCase(load_model(tiny_model_dirs["bert-encoder"]), batch_size=3)
    errors = lockstep(lambda: case.model, case.evaluation, "virtual", "lozo-m", steps=4)
    check_accuracy(errors, floor=8 * 2.0**-24)


@pytest.mark.slow
def test_scorer_of_the_embedded_minilm():
    """zofast train's default model (the embedded all-MiniLM-L6-v2), 4 steps, batch 2."""
    from zofast.models import load_model

    case = ScorerCase(load_model(), batch_size=2)
    errors = lockstep(lambda: case.model, case.evaluation, "virtual", "lozo-m", steps=4)
    check_accuracy(errors, floor=8 * 2.0**-24)


def test_zofast_train_paired(tiny_model_dirs, tmp_path):
    """TrainConfig(paired=True), float32: mode "auto" resolves to virtual with a shadow rest, the
    run's g's agree with a two-forward run's (virtual, its rest in place as float32's default,
    whose roundings differ: 1e-3 of the g's size at a small lr), and its best trajectory replays
    to the weights the run ends with."""
    from zofast.models import load_model
    from zofast.train import TrainConfig, train

    tiny = str(tiny_model_dirs["bert-encoder"])
    runs = {}
    for paired in (False, True):
        loaded = load_model(tiny)
        config = TrainConfig(
            model=tiny, method="lozo-m", lr=1e-4, steps=6, nu=3, eval_every=3, batch_size=4,
            output_dir=str(tmp_path / f"run-{paired}"), progress=False, plot=False,
            zero_shot_test=False, checkpoint_every=0, paired=paired,
            mode="auto" if paired else "virtual",
        )  # fmt: skip
        if paired:
            assert config.validate().resolved_mode == "virtual"
        result = train(config, loaded=loaded)
        traj = Trajectory.load(result.files["trajectory"])
        runs[paired] = (loaded.model, traj)
    (_, two), (model, paired) = runs[False], runs[True]
    assert paired.hyperparameters["paired"] is True
    assert paired.hyperparameters["virtual_rest"] == "shadow"
    assert abs(paired.g - two.g).max() <= 1e-3 * abs(two.g).max()
    fresh = load_model(tiny).model
    replay(fresh, Trajectory.load(tmp_path / "run-True" / "trajectory-best.json"))
    best = dict(model.named_parameters())  # the run ends holding its best checkpoint
    assert all(torch.equal(p, best[n]) for n, p in fresh.named_parameters())


def test_zotrainer_paired(tmp_path):
    """ZOTrainer(zo_paired=True) on a GPT-2: the same g's as a two-forward ZOTrainer in the
    same mode, to float32 rounding."""
    from zofast.hf import ZOTrainer, ZOTrainingArguments

    model = tiny_gpt2_lm()
    gen = torch.Generator().manual_seed(0)
    rows = [
        {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        for ids in torch.randint(3, 50, (8, 10), generator=gen)
    ]
    g = {}
    for paired in (False, True):
        args = ZOTrainingArguments(
            str(tmp_path / f"out-{paired}"), max_steps=4, per_device_train_batch_size=4,
            learning_rate=1e-2, zo_eps=1e-2, zo_mode="shadow", zo_paired=paired,
            save_strategy="no", report_to=[], use_cpu=True, logging_strategy="no",
            lr_scheduler_type="constant",
        )  # fmt: skip
        trainer = ZOTrainer(model=copy.deepcopy(model), args=args, train_dataset=rows)
        trainer.train()
        assert trainer.zo_optimizer.paired is paired
        g[paired] = trainer.trajectory.g
    assert abs(g[True] - g[False]).max() <= 1e-4 * abs(g[False]).max()

    class Custom(ZOTrainer):
        def compute_loss(self, model, inputs, **kwargs):
            return super().compute_loss(model, inputs, **kwargs)

    trainer = Custom(model=model, args=args, train_dataset=rows)
    with pytest.raises(ValueError, match="compute_loss"):
        trainer.create_optimizer()


# The helpers.


def test_losses_are_each_copys_model_loss():
    """zofast.paired.losses, outside a step: both entries are model(**inputs).loss."""
    import transformers

    bert = transformers.BertConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        vocab_size=50, max_position_embeddings=32,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 50, (3, 8), generator=gen)
    cases = [
        (tiny_gpt2_lm(), ids),
        (tiny_opt_lm(), ids),
        (transformers.BertForMaskedLM(bert), ids.masked_fill(ids < 20, -100)),
        (transformers.BertForSequenceClassification(bert), torch.tensor([0, 1, 1])),
        (transformers.BertForTokenClassification(bert), ids % 2),
    ]
    regression = copy.deepcopy(bert)
    regression.num_labels = 1
    cases.append((transformers.BertForSequenceClassification(regression), torch.randn(3)))
    for model, labels in cases:
        model.eval()
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
        with torch.no_grad():
            want = model(**inputs).loss
            got = zofast.paired.losses(model, inputs)
        assert got.shape == (2,), type(model).__name__
        torch.testing.assert_close(got, want.float().expand(2), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="labels"):
        zofast.paired.losses(cases[0][0], {"input_ids": ids})
    with pytest.raises(ValueError, match="does not know"):
        zofast.paired.losses(transformers.BertModel(bert), {"input_ids": ids, "labels": ids})


def test_stack():
    ids = torch.arange(6).view(2, 3)
    out = zofast.paired.stack({"input_ids": ids, "position_ids": torch.arange(3)[None], "x": 1})
    assert torch.equal(out["input_ids"], torch.cat([ids, ids]))
    assert out["position_ids"].shape == (1, 3) and out["x"] == 1
    assert torch.equal(zofast.paired.stack(ids), torch.cat([ids, ids]))
    with pytest.raises(TypeError):
        zofast.paired.stack([ids])


# Failures: the weights bit-identical, the run goes on.


def storage(model):
    return [p.data.data_ptr() for p in model.parameters()]


@pytest.mark.parametrize("failure", ["exception", "nan", "scalar", "odd rows", "inside a forward"])
@pytest.mark.parametrize("mode", ["virtual", "shadow"])
def test_a_failing_step_leaves_the_weights_bit_identical(failure, mode):
    model = Toy()
    opt = optimizer(model, True, mode, "lozo-m")
    for k in range(3):  # step 3 is a V refresh with a pending A
        opt.step(toy_evaluation(model, k).paired)
    weights, state, where = snapshot(model), state_of(opt), storage(model)
    ids = torch.randint(0, VOCAB, (ROWS, LENGTH))
    with torch.no_grad():
        before = model(ids)

    def closure():
        out = model(torch.cat([ids, ids]))
        if failure == "exception":
            raise ZeroDivisionError("boom")
        if failure == "nan":
            return torch.stack([out.sum(), torch.tensor(float("nan"))])
        if failure == "scalar":
            return out.sum()
        return torch.zeros(2)

    if failure == "odd rows":
        closure = lambda: model(ids[:3]).sum(dim=(1, 2))[:2]  # noqa: E731
    if failure == "inside a forward":
        model.custom.register_forward_hook(lambda *a: 1 / 0 if a[2].shape[0] == 8 else None)
    error = {
        "exception": ZeroDivisionError,
        "nan": FloatingPointError,
        "scalar": ValueError,
        "odd rows": ValueError,
        "inside a forward": ZeroDivisionError,
    }[failure]
    with pytest.raises(error):
        opt.step(closure)
    assert all(torch.equal(a, b) for a, b in zip(snapshot(model), weights, strict=True))
    assert storage(model) == where  # nothing left swapped in
    assert same_state(state_of(opt), state)
    assert opt.steps == 3 and opt.trajectory.events[-1] in ("abort+", "abort-")
    with torch.no_grad():
        assert torch.equal(model(ids), before)  # c back to 0: the model as before the step
    if failure == "inside a forward":
        model.custom._forward_hooks.popitem()
    opt.step(toy_evaluation(model, 3).paired)  # and it goes on
    assert opt.steps == 4


def test_odd_rows_message():
    model = Toy()
    opt = LOZO(model, lr=1e-2, paired=True)
    with pytest.raises(ValueError, match="stacked twice"):
        opt.step(lambda: model(torch.zeros(3, LENGTH, dtype=torch.long)).sum(dim=(1, 2))[:2])


# What cannot be paired.


def test_refusals():
    model = Toy()
    with pytest.raises(ValueError, match="LOZO's"):
        MeZO(model, lr=1e-3, paired=True)
    with pytest.raises(ValueError, match="exact mode"):
        LOZO(model, lr=1e-3, paired=True, mode="inplace")
    with pytest.raises(ValueError, match="exact mode"):
        LOZO(model, lr=1e-3, paired=True, mode="virtual", virtual_rest="inplace")
    with pytest.raises(ValueError, match="pipeline"):
        LOZO(model, lr=1e-3, paired=True, pipeline=True)
    with pytest.raises(ValueError, match="model"):
        LOZO(list(model.parameters()), lr=1e-3, paired=True)
    with pytest.raises(ValueError, match="True or False"):
        LOZO(model, lr=1e-3, paired=1)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_paired_plan_refuses_full_rank_matrices():
    from zofast.paired_layers import plan
    from zofast.shadow import ShadowTensor

    lin = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="full-rank"):
        plan(lin, [ShadowTensor(0, "weight", lin.weight, rank=0)])


def test_train_config_and_cli_refusals():
    from zofast.cli import main
    from zofast.train import ConfigError, TrainConfig

    with pytest.raises(ConfigError, match="lozo"):
        TrainConfig(method="mezo", paired=True).validate()
    with pytest.raises(ConfigError, match="exact mode"):
        TrainConfig(paired=True, mode="inplace").validate()
    assert main(["train", "--method", "mezo", "--paired", "--steps", "1"]) == 2
    assert TrainConfig(paired=True, weight_decay=0.1).resolved_mode == "shadow"


# Checkpoints, replay, data parallelism.


@pytest.mark.parametrize("mode", ["virtual", "shadow"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resume_and_replay_are_bit_identical(dtype, mode, tmp_path):
    def run(model, opt, start, stop):
        for k in range(start, stop):
            opt.step(toy_evaluation(model, k).paired)

    base = Toy().to(dtype)
    model = copy.deepcopy(base)
    opt = optimizer(model, True, mode, "lozo-m")
    run(model, opt, 0, 4)
    saved_weights, saved_state = snapshot(model), opt.state_dict()
    run(model, opt, 4, 8)
    opt.settle()
    final = snapshot(model)

    resumed = copy.deepcopy(base)
    with torch.no_grad():
        for p, w in zip(resumed.parameters(), saved_weights, strict=True):
            p.copy_(w)
    opt.detach()
    opt2 = optimizer(resumed, True, mode, "lozo-m")
    opt2.load_state_dict(saved_state)
    run(resumed, opt2, 4, 8)
    opt2.settle()
    assert all(torch.equal(a, b) for a, b in zip(snapshot(resumed), final, strict=True))

    path = tmp_path / "trajectory.json"
    opt2.trajectory.save(path)
    fresh = copy.deepcopy(base)
    replay(fresh, path)
    assert all(torch.equal(a, b) for a, b in zip(snapshot(fresh), final, strict=True))


def data_parallel_worker(rank: int, world: int, init_file: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        shards = [(0, 1), (1, 4)]  # ranks with 1 and 3 examples of a batch of 4

        def run(rows, group):
            model = Toy()
            opt = LOZO(model, lr=1e-2, eps=1e-2, nu=2, momentum=0.9, seed=5, paired=True,
                       process_group=group)  # fmt: skip
            for k in range(4):
                gen = torch.Generator().manual_seed(k)
                ids = torch.randint(0, VOCAB, (ROWS, LENGTH), generator=gen)[rows[0] : rows[1]]
                y = torch.randn(ROWS, LENGTH, 3, generator=gen)[rows[0] : rows[1]]
                n = len(ids)

                def closure(ids=ids, y=y, n=n):
                    out = model(torch.cat([ids, ids]))
                    return torch.stack([F.mse_loss(out[:n], y), F.mse_loss(out[n:], y)])

                opt.step(closure, examples=n)
            opt.detach()
            return torch.cat([p.detach().reshape(-1) for p in model.parameters()])

        mine = run(shards[rank], dist.group.WORLD)
        others = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(others, mine)
        assert all(torch.equal(mine, o) for o in others), "ranks differ"
        # One process: g differs in its last bits (one float32 mean against the ranks' float64
        # weighted mean), so the weights do by lr·Δg·|Z|.
        torch.testing.assert_close(mine, run((0, 4), None), rtol=1e-5, atol=1e-5)
        dist.barrier()  # every rank done before any tears the group down
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_data_parallel_paired_steps():
    """Two gloo ranks, shards of 1 and 3 examples: one all-reduce of (L+, L−) per step, the
    ranks bit-identical and equal to one process on the whole batch."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(data_parallel_worker, args=(2, os.path.join(folder, "init")), nprocs=2)


def test_usage_warning_is_quiet():
    """Every tensor of a paired forward counts as used (no shadow-mode warning)."""
    model = Toy()
    opt = LOZO(model, lr=1e-2, paired=True, mode="shadow")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(toy_evaluation(model, 0).paired)
    assert math.isfinite(opt.last_losses[0])
