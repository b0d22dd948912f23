"""Tests of LOZO's mode="virtual" (zofast.virtual): perturbations and pending updates applied
through the layers' forward hooks, the stored weights written only at V refreshes and settles.

CPU, tiny models. The engine takes float32 / bfloat16 / float16 weights only, so "same iterates"
is checked in float32: to float32 rounding (the two modes round differently: in place rounds W at
every pass, virtual once per flush)."""

from __future__ import annotations

import gc
import math

import pytest
import torch
from helpers_models import tiny_gpt2_lm, tiny_opt_lm

import zofast
import zofast.virtual
from zofast.optim import LOZO, MeZO, param_groups
from zofast.perturb import lowrank_factors
from zofast.replay import replay
from zofast.rng import RunSeeds
from zofast.trajectory import Trajectory

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 12


def toy(dtype=torch.float32, bias=True):
    """Embedding → Linear → tanh → Linear (biases: in place; matrices: virtual)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Embedding(VOCAB, 8),
        torch.nn.Linear(8, 8, bias=bias),
        torch.nn.Tanh(),
        torch.nn.Linear(8, 3, bias=bias),
    ).to(dtype)


def batch(k=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(100 + k)
    return torch.randint(0, VOCAB, (32,), generator=gen), torch.randn(32, 3, generator=gen).to(
        dtype
    )


def toy_loss(model, k=0):
    ids, y = batch(k, next(model.parameters()).dtype)
    return lambda: torch.nn.functional.mse_loss(model(ids).double(), y.double())


def train(model, opt, start, stop):
    for k in range(start, stop):
        opt.step(toy_loss(model, k))


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def same(model, snap):
    return all(torch.equal(p, s) for p, s in zip(model.parameters(), snap, strict=True))


def no_hooks(model):
    return all(not m._forward_hooks for m in model.modules())


def gpt2():
    return tiny_gpt2_lm().eval()


def opt_model():
    return tiny_opt_lm().eval()


def lm_loss(model, k=0):
    gen = torch.Generator().manual_seed(200 + k)
    ids = torch.randint(3, 50, (2, 10), generator=gen)
    return lambda: model(input_ids=ids, labels=ids).loss


# Same iterates as in-place LOZO.


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("pipeline", [False, True])
def test_same_iterates_as_inplace(momentum, pipeline):
    """10 steps with ν = 3 (three V refreshes, so three flushes): the losses of every forward
    and the final weights agree with in-place LOZO to float32 rounding."""
    runs = []
    for mode in ("inplace", "virtual"):
        model = toy()
        opt = LOZO(
            model, lr=1e-2, eps=1e-2, rank=2, nu=3, momentum=momentum, seed=4, mode=mode,
            pipeline=pipeline,
        )  # fmt: skip
        losses = []
        for _ in range(10):
            opt.step(toy_loss(model))
            losses.append(opt.last_losses)
        opt.settle()
        runs.append((torch.tensor(losses, dtype=torch.float64), snapshot(model), opt))
    (loss_in, w_in, opt_in), (loss_v, w_v, opt_v) = runs
    assert opt_v.virtual_names == ["0.weight", "1.weight", "3.weight"]
    assert opt_in.virtual_names == []
    torch.testing.assert_close(loss_v, loss_in, rtol=2e-6, atol=0)
    for a, b in zip(w_v, w_in, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * b.abs().max().item())
    assert loss_v[-1].mean() < loss_v[0].mean()  # it optimises


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_same_updates_as_inplace_for_the_same_losses(momentum):
    """With scripted losses (so both modes get identical g's) the weights after settle agree to
    the rounding of the in-place passes (3 per step, rank 2): within 3·steps ulps of max |W|.
    The in-place tensors (biases) take the same passes in both modes: bit-identical."""
    steps, runs = 10, []
    for mode in ("inplace", "virtual"):
        model = toy()
        opt = LOZO(model, lr=1e-2, eps=1e-2, rank=2, nu=3, momentum=momentum, seed=4, mode=mode)
        for t in range(steps):
            losses = iter([1.0 + 0.01 * math.sin(t + 1), 1.0 - 0.01 * math.sin(t + 1)])
            opt.step(lambda losses=losses: next(losses))
        opt.settle()
        runs.append(snapshot(model))
    for a, b in zip(*runs, strict=True):
        if a.dim() == 1:
            assert torch.equal(a, b)
            continue
        _, exponent = math.frexp(b.abs().max().item())
        ulp = 2.0 ** (exponent - 24)
        assert (a.double() - b.double()).abs().max().item() <= 3 * steps * ulp


def effective(module, kind):
    """The weight a layer computes with, read back through its forward (float64)."""
    with torch.no_grad():
        if kind == "embedding":
            return module(torch.arange(module.num_embeddings)).double()
        if kind == "linear":
            eye = torch.eye(module.in_features, dtype=module.weight.dtype)
            out = module(eye) - (0 if module.bias is None else module.bias)
            return out.double().T
        eye = torch.eye(module.nx, dtype=module.weight.dtype)  # GPT-2 Conv1D, W: (in, out)
        return (module(eye) - module.bias).double()


def expected_weight(opt, vt, t, c, nu):
    """W + A·V_Aᵀ + c·U_t·V_tᵀ, from the optimizer state and the seeds alone (float64)."""
    seeds = RunSeeds(opt.run_seed)
    n_params = len(opt.trajectory.params)
    W = vt.param.detach().double().reshape(vt.m, vt.n)
    state = opt.state[vt.param]
    if "virtual_factor" in state:
        v_seed = seeds.seeds(state["virtual_epoch"], n_params, "v")[vt.index]
        _, V_A = lowrank_factors(vt.param.shape, 0, v_seed, vt.rank)
        W = W + state["virtual_factor"].double() @ V_A.double().T
    u_seed = seeds.seeds(t, n_params, "u")[vt.index]
    v_seed = seeds.seeds(t // nu, n_params, "v")[vt.index]
    U, V = lowrank_factors(vt.param.shape, u_seed, v_seed, vt.rank)
    return W + c * (U.double() @ V.double().T)


@pytest.mark.parametrize("arch", ["toy", "gpt2", "opt"])
def test_layers_see_the_perturbed_weights_and_stored_weights_stay(arch):
    """Inside the closure every layer of a virtual tensor computes with W + A·V_Aᵀ ± ε·U_t·V_tᵀ
    (probed through its forward: Linear, Conv1D, Embedding, tied heads), while the stored
    weights are bit-identical to those before the step. Steps 0..7 with ν = 3 include V
    refreshes, where A is still on the old V during the forwards."""
    model = {"toy": toy, "gpt2": gpt2, "opt": opt_model}[arch]()
    loss = {"toy": toy_loss, "gpt2": lm_loss, "opt": lm_loss}[arch]
    eps, nu = 1e-2, 3
    opt = LOZO(model, lr=2e-2, eps=eps, rank=2, nu=nu, momentum=0.5, seed=6, mode="virtual")
    virtual = opt._virtual.layers.tensors
    kinds = {kind for vt in virtual for _, kind in vt.layers}
    if arch == "gpt2":
        assert kinds == {"embedding", "linear", "conv1d"}
        assert "transformer.wte.weight" in opt.virtual_names  # tied with lm_head
        assert "transformer.wpe.weight" in opt.virtual_names
        (wte,) = [vt for vt in virtual if vt.name == "transformer.wte.weight"]
        assert {kind for _, kind in wte.layers} == {"embedding", "linear"}
    if arch == "opt":  # the learned positional embedding overrides forward: in place
        assert "model.decoder.embed_positions.weight" not in opt.virtual_names
        assert "model.decoder.embed_tokens.weight" in opt.virtual_names
        assert "model.decoder.layers.0.fc1.weight" in opt.virtual_names
    checked = []
    for k in range(8):
        t = opt.steps
        before = snapshot(model)
        inner = loss(model, k)
        calls = []

        def closure(t=t, before=before, inner=inner, calls=calls):
            calls.append(1)
            c = eps if len(calls) == 1 else -eps
            worst = 0.0
            for vt in virtual:
                assert torch.equal(vt.param, before[_position(model, vt.param)])
                want = expected_weight(opt, vt, t, c, nu)
                for module, kind in vt.layers:
                    got = effective(module, kind)
                    err = (got - want).abs().max() / want.abs().max()
                    worst = max(worst, err.item())
            checked.append(worst)
            return inner()

        opt.step(closure)
        flushed = t % nu == 0 and t > 0  # the old A went into W at the end of the step
        for vt in virtual:
            assert torch.equal(vt.param, before[_position(model, vt.param)]) != flushed
    assert max(checked) < 2e-6, checked


def _position(model, param):
    return next(i for i, p in enumerate(model.parameters()) if p is param)


def test_between_steps_the_model_computes_with_the_pending_updates():
    model = toy()
    opt = LOZO(model, lr=5e-2, rank=2, nu=100, seed=1, mode="virtual")
    train(model, opt, 0, 5)
    assert opt.unflushed
    ids, _ = batch()
    stored = snapshot(model)
    with torch.inference_mode():  # caches the factors: they must not be inference tensors
        out = model(ids).clone()
    with torch.enable_grad():  # the hooks also work with autograd on
        model(ids).sum().backward()
    assert same(model, stored)
    opt.settle()
    assert not opt.unflushed and opt.trajectory.events[-1] == "settle"
    assert not same(model, stored)
    torch.testing.assert_close(model(ids), out, rtol=1e-5, atol=1e-6)
    opt.settle()  # idempotent: nothing recorded
    assert opt.trajectory.events.count("settle") == 1


def test_bfloat16_model_keeps_float32_factors():
    model = toy(torch.bfloat16)
    opt = LOZO(model, lr=5e-2, eps=1e-2, rank=2, nu=3, seed=2, mode="virtual")
    train(model, opt, 0, 4)
    for p in (model[0].weight, model[1].weight):
        state = opt.state[p]
        assert state["virtual_factor"].dtype == torch.float32
        assert state["virtual_factor"].shape == (p.shape[0], 2)


# Which tensors go virtual.


class Doubling(torch.nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


def test_only_stock_layers_go_virtual():
    torch.manual_seed(0)
    model = torch.nn.ModuleDict(
        {
            "plain": torch.nn.Linear(4, 4),
            "override": Doubling(4, 4),
            "max_norm": torch.nn.Embedding(5, 4, max_norm=1.0),
            "padded": torch.nn.Embedding(5, 4, padding_idx=0),
            "mha": torch.nn.MultiheadAttention(4, 2),  # reads out_proj.weight directly
            "patched": torch.nn.Linear(4, 4),
        }
    )
    model["patched"].forward = lambda x: x  # replaced on the instance
    opt = LOZO(model, lr=1e-3, mode="virtual")
    assert opt.virtual_names == ["plain.weight", "padded.weight"]
    assert opt.trajectory.hyperparameters["virtual_indices"] == [0, 5]
    hooked = [name for name, m in model.named_modules() if m._forward_hooks]
    assert hooked == ["plain", "padded"]


def test_a_tensor_also_used_elsewhere_stays_in_place():
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 4)
    other = torch.nn.Module()
    other.register_parameter("kernel", lin.weight)  # the same tensor, not as a layer's weight
    model = torch.nn.ModuleList([lin, other])
    opt = LOZO(model, lr=1e-3, mode="virtual")
    assert opt.virtual_names == []


def test_a_model_with_nothing_virtual_trains_in_place():
    model = torch.nn.Sequential(torch.nn.LayerNorm(4))
    opt = LOZO(model, lr=1e-2, mode="virtual")
    assert opt.virtual_names == [] and no_hooks(model)
    opt.step(lambda: model(torch.ones(2, 4)).sum())
    assert opt.steps == 1


# Failures: nothing written, nothing pending changed.


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("kind", ["exception", "nan"])
def test_abort_leaves_weights_and_pending_factors_bit_identical(stage, kind):
    model = toy(bias=False)  # every trained tensor virtual
    opt = LOZO(model, lr=5e-2, rank=2, nu=3, momentum=0.9, seed=3, mode="virtual")
    train(model, opt, 0, 3)  # step 3 is a V refresh
    snap = snapshot(model)
    state = {p: dict(opt.state[p]) for p in model.parameters()}
    ids, _ = batch()
    out = model(ids)
    calls = []

    def closure():
        calls.append(1)
        if len(calls) < stage:
            return 1.0
        if kind == "nan":
            return float("nan")
        raise ZeroDivisionError("boom")

    with pytest.raises(FloatingPointError if kind == "nan" else ZeroDivisionError):
        opt.step(closure)
    assert same(model, snap)
    for p in model.parameters():
        assert opt.state[p].keys() == state[p].keys()
        for key, value in state[p].items():
            assert opt.state[p][key] is value
    assert torch.equal(model(ids), out)
    assert opt.steps == 3 and opt.trajectory.events[-1] == ("abort+" if stage == 1 else "abort-")
    train(model, opt, 3, 4)  # and it goes on
    assert opt.steps == 4


# Checkpoints and replay.


@pytest.mark.parametrize(
    "dtype, kwargs",
    [
        (torch.float32, {"momentum": 0.9}),
        (torch.bfloat16, {"momentum": 0.9, "pipeline": True, "virtual_rest": "inplace"}),
        (torch.bfloat16, {"momentum": 0.9}),  # the rest in shadow mode (bf16's default)
        (torch.float32, {}),
    ],
)
def test_state_dict_resume_is_bit_identical(dtype, kwargs, tmp_path):
    model = toy(dtype)
    opt = LOZO(model, lr=5e-2, eps=1e-2, rank=2, nu=3, seed=9, mode="virtual", **kwargs)
    train(model, opt, 0, 5)
    assert opt.unflushed
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    train(model, opt, 5, 11)
    opt.settle()

    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model_b = toy(dtype)
    model_b.load_state_dict(ckpt["model"])
    opt_b = LOZO(model_b, lr=5e-2, eps=1e-2, rank=2, nu=3, seed=0, mode="virtual", **kwargs)
    opt_b.load_state_dict(ckpt["opt"])
    assert opt_b.state[model_b[1].weight]["virtual_factor"].dtype == torch.float32
    train(model_b, opt_b, 5, 11)
    opt_b.settle()
    assert same(model_b, snapshot(model))
    assert opt_b.trajectory == opt.trajectory


def test_replay_is_bit_identical(tmp_path):
    """A run with V refreshes, aborts, a settle half-way and a pending pipelined perturbation."""
    base = toy()
    model = toy()
    opt = LOZO(
        param_groups(model, 0.0), lr=5e-2, eps=1e-2, rank=2, nu=3, momentum=0.5, seed=12,
        mode="virtual", model=model, pipeline=True,
    )  # fmt: skip
    train(model, opt, 0, 4)
    with pytest.raises(FloatingPointError):
        opt.step(lambda: float("inf"))
    train(model, opt, 4, 6)
    opt.settle()
    train(model, opt, 6, 10)
    losses = iter([1.0])
    with pytest.raises(StopIteration):
        opt.step(lambda: next(losses))  # fails at the second evaluation
    train(model, opt, 10, 11)
    assert opt.trajectory.events.count("settle") == 1 and opt.unflushed
    assert opt.trajectory.events.count("abort+") == opt.trajectory.events.count("abort-") == 1
    opt.trajectory.save(tmp_path / "run.json")
    opt.settle()
    trained = snapshot(model)

    fresh = toy()
    assert same(fresh, snapshot(base))
    replay(fresh, Trajectory.load(tmp_path / "run.json"))
    assert same(fresh, trained)
    assert no_hooks(fresh)


# Lifecycle of the hooks.


def test_detach_settles_and_removes_the_hooks():
    model = toy()
    opt = LOZO(model, lr=5e-2, rank=2, seed=1, mode="virtual")
    train(model, opt, 0, 2)
    with pytest.raises(ValueError, match="already driven"):
        LOZO(model, lr=5e-2, mode="virtual")
    opt.detach()
    assert no_hooks(model) and not opt.unflushed
    settled = snapshot(model)
    with pytest.raises(ValueError, match="detached"):
        opt.step(toy_loss(model))
    assert same(model, settled)
    opt.detach()  # idempotent
    again = LOZO(model, lr=5e-2, mode="virtual")  # the layers are free again
    assert len(again.virtual_names) == 3


def test_module_level_detach_flushes_for_a_dropped_optimizer():
    model = toy()
    reference = toy()
    opt = LOZO(model, lr=5e-2, rank=2, seed=1, mode="virtual")
    ref_opt = LOZO(reference, lr=5e-2, rank=2, seed=1, mode="virtual")
    train(model, opt, 0, 2)
    train(reference, ref_opt, 0, 2)
    ref_opt.settle()
    del opt
    gc.collect()
    zofast.virtual.detach(model)
    assert no_hooks(model)
    assert same(model, snapshot(reference))
    zofast.virtual.detach(model)  # nothing left: nothing to do


# Bad input: clear errors, weights untouched, no hooks left behind.


def test_virtual_needs_a_model():
    model = toy()
    with pytest.raises(ValueError, match="model"):
        LOZO(list(model.parameters()), lr=1e-3, mode="virtual")
    with pytest.raises(ValueError, match="model must be a torch.nn.Module"):
        LOZO(list(model.parameters()), lr=1e-3, mode="virtual", model="net")
    assert no_hooks(model)


def test_mezo_has_no_virtual_mode():
    model = toy()
    with pytest.raises(ValueError, match="full-rank"):
        MeZO(model, lr=1e-3, mode="virtual")
    assert no_hooks(model)


def test_weight_decay_on_virtual_tensors_is_refused():
    model = toy()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="weight_decay"):
        LOZO(param_groups(model, 0.1), lr=1e-3, mode="virtual", model=model)
    assert no_hooks(model)
    opt = LOZO(param_groups(model, 0.0), lr=1e-3, mode="virtual", model=model)
    opt.param_groups[0]["weight_decay"] = 0.01  # e.g. changed later
    with pytest.raises(ValueError, match="weight_decay"):
        opt.step(toy_loss(model))
    assert same(model, snap) and opt.steps == 0 and opt.trajectory.events == []
    # Decay on the in-place tensors only is fine.
    opt.param_groups[0]["weight_decay"] = 0.0
    opt.param_groups[1]["weight_decay"] = 0.01
    opt.step(toy_loss(model))
    assert opt.steps == 1


def test_virtual_indices_are_checked():
    model = toy()
    with pytest.raises(ValueError, match="do not match"):
        LOZO(model, lr=1e-3, mode="virtual", virtual_indices=[0])
    with pytest.raises(ValueError, match="not trained matrices"):
        LOZO(list(model.parameters()), lr=1e-3, mode="virtual", virtual_indices=[2])
    with pytest.raises(ValueError, match="list of integers"):
        LOZO(model, lr=1e-3, mode="virtual", virtual_indices="0")
    with pytest.raises(ValueError, match="mode='virtual' only"):
        LOZO(model, lr=1e-3, virtual_indices=[0])
    assert no_hooks(model)
    replay_only = LOZO(list(model.parameters()), lr=1e-3, mode="virtual", virtual_indices=[0, 1])
    with pytest.raises(ValueError, match="without a model"):
        replay_only.step(toy_loss(model))
    assert math.isfinite(toy_loss(model)().item())


def test_bf16_weights_do_not_drift_in_virtual_mode():
    """With a nil update (lr = 1e-30), in-place steps still round bf16 weights at every
    perturb / restore pass and they drift; virtual mode never writes them during a step, and its
    flushes add nothing: bit-identical (bench/tools/drift_bf16.py measures 1000 steps)."""
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    drift = {}
    for mode in ("inplace", "virtual"):
        torch.manual_seed(0)
        model = torch.nn.Linear(64, 64, bias=False).to(torch.bfloat16)
        start = model.weight.detach().clone()
        opt = LOZO(model, lr=1e-30, eps=1e-3, rank=2, nu=20, seed=1, mode=mode)
        for _ in range(60):  # three V refreshes: three flushes in virtual mode
            opt.step(lambda model=model: model(x).float().pow(2).mean())
        opt.settle()
        if mode == "virtual":
            assert torch.equal(model.weight, start)
            opt.detach()
        drift[mode] = ((model.weight.float() - start.float()).norm() / start.float().norm()).item()
    assert drift["virtual"] == 0.0
    assert drift["inplace"] > 1e-3


# The flat buffers (zofast.virtual_step): one GPU's path, forced here on the CPU.


@pytest.fixture
def flat(monkeypatch):
    """Force FlatVirtual (on a GPU it is on by itself)."""
    import zofast.optim.virtual as part

    monkeypatch.setattr(part, "flat_enabled", lambda slots: bool(slots))
    return part


@pytest.mark.parametrize("momentum", [0.0, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flat_buffers_give_the_per_tensor_updates(flat, dtype, momentum, tmp_path):
    """The same g's replayed with the per-tensor path give the flat run's weights bit for bit (A
    and LOZO-M's N are elementwise the same arithmetic), and the flat run's iterates stay within
    rounding of a per-tensor run's (the hooks' products take another layout), across V refreshes
    (nu = 3), an abort and a settle; the hooks really took the flat factors."""
    model, ref = toy(dtype), toy(dtype)
    kwargs = dict(lr=5e-2, eps=1e-2, rank=2, nu=3, momentum=momentum, seed=12, mode="virtual")
    opt = LOZO(param_groups(model, 0.0), model=model, **kwargs)
    assert opt._virtual._flat is not None
    train(model, opt, 0, 4)
    with pytest.raises(FloatingPointError):
        opt.step(lambda: float("inf"))
    assert all(vt.bulk is not None for vt in opt._virtual.layers.tensors)  # c = 0: L = A
    train(model, opt, 4, 8)
    opt.trajectory.save(tmp_path / "run.json")
    opt.settle()
    trained = snapshot(model)

    fresh = toy(dtype)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(flat, "flat_enabled", lambda slots: False)
        replay(fresh, Trajectory.load(tmp_path / "run.json"))
        assert same(fresh, trained)
        opt_ref = LOZO(param_groups(ref, 0.0), model=ref, **kwargs)
        assert opt_ref._virtual._flat is None
        train(ref, opt_ref, 0, 8)
        opt_ref.settle()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for p, q in zip(ref.parameters(), trained, strict=True):
        torch.testing.assert_close(q, p, rtol=tol, atol=tol)


def test_flat_buffers_with_momentum_and_a_loaded_state(flat):
    """LOZO-M (per-tensor momentum, adopted into the flat buffer each step) and a state_dict
    loaded into a new optimizer (its A's copied into a new flat buffer) continue bit for bit."""
    model = toy(torch.bfloat16)
    kwargs = dict(lr=5e-2, eps=1e-2, rank=2, nu=3, momentum=0.5, seed=3, mode="virtual")
    opt = LOZO(param_groups(model, 0.0), model=model, **kwargs)
    train(model, opt, 0, 4)
    state = opt.state_dict()
    weights = snapshot(model)
    ids = batch(0)[0]
    with torch.no_grad():
        seen = model(ids)  # W + A·V_Aᵀ between steps
    train(model, opt, 4, 7)
    opt.settle()
    expected = snapshot(model)

    opt.detach()
    for p, w in zip(model.parameters(), weights, strict=True):
        p.data.copy_(w)
    again = LOZO(param_groups(model, 0.0), model=model, **kwargs)
    again.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(model(ids), seen)  # A and V_A copied into new flat buffers
    train(model, again, 4, 7)
    again.settle()
    assert same(model, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_flat_buffers_on_the_gpu(momentum, tmp_path):
    """On one GPU the flat path is the default: a bf16 OPT run's replay through the per-tensor
    path is bit-identical, its iterates match a per-tensor run's within rounding, and the factor
    buffers' padding is zeros (the momentum's finite check reads whole buffers)."""
    import zofast.optim.virtual as part

    def run():
        model = opt_model().to("cuda", torch.bfloat16)
        opt = LOZO(model, lr=1e-3, eps=1e-2, rank=2, nu=3, momentum=momentum, seed=5)
        for k in range(7):
            gen = torch.Generator().manual_seed(200 + k)
            ids = torch.randint(3, 50, (2, 10), generator=gen).cuda()
            opt.step(lambda ids=ids: model(input_ids=ids, labels=ids).loss)
        return model, opt

    model, opt = run()
    flat = opt._virtual._flat
    assert opt.mode == "virtual" and flat is not None
    assert torch.isfinite(flat.u).all() and torch.isfinite(flat.v).all()
    opt.trajectory.save(tmp_path / "run.json")
    opt.settle()
    trained = snapshot(model)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(part, "flat_enabled", lambda slots: False)
        fresh = opt_model().to("cuda", torch.bfloat16)
        replay(fresh, Trajectory.load(tmp_path / "run.json"))
        assert same(fresh, trained)
        ref, opt_ref = run()
        assert opt_ref._virtual._flat is None
        opt_ref.settle()
    for p, q in zip(ref.parameters(), trained, strict=True):
        torch.testing.assert_close(q, p, rtol=2e-2, atol=2e-2)


def test_the_rest_of_a_virtual_model_goes_to_the_presets():
    """Virtual mode's shadow part holds the biases and norms only; their preset budget is 1 % of
    everything the optimizer trains, not of that part (which left most of OPT-1.3B's biases and
    norms as a temporary each, one launch per module and forward)."""
    blocks = [m for _ in range(40) for m in (torch.nn.Linear(1024, 1024), torch.nn.LayerNorm(1024))]
    model = torch.nn.Sequential(*blocks).to(torch.bfloat16)
    opt = LOZO(model, lr=1e-3)
    assert opt.mode == "virtual"
    rest = opt._shadow.layers.tensors
    assert sum(st.param.numel() for st in rest) > 65536  # more than the old budget
    assert {u.way for st in rest for u in st.uses} == {"preset"}
