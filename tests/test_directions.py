"""Several directions per step (directions=q, zofast.optim.directions), on one process: the step
averages q estimates whose directions are those of a float64 reference built by hand from the
engine's noise, for every optimizer, in place (float32) and in the default exact modes (bf16);
replay, aborts at each of the 2q evaluations, state_dict and the checks. Two ranks:
tests/test_distributed.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.func import functional_call

from zofast import replay
from zofast.optim import LOZO, MeZO
from zofast.perturb import gaussian_noise, lowrank_factors
from zofast.rng import RunSeeds
from zofast.trajectory import Trajectory, param_fingerprint

pytestmark = pytest.mark.usefixtures("one_thread")

METHODS = ("mezo", "lozo", "lozo-m")
LR, EPS, SEED, NU, RANK, BETA = 5e-2, 5e-2, 5, 2, 2, 0.8


def new_model(dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3), torch.nn.LayerNorm(3)
    ).to(dtype)


def new_optimizer(method, params, **kwargs):
    # (accumulate = 1: the references write every step's update at its step)
    common = {"lr": LR, "eps": EPS, "seed": SEED, "accumulate": 1, **kwargs}
    if method == "mezo":
        return MeZO(params, **common)
    return LOZO(params, rank=RANK, nu=NU, momentum=BETA if method == "lozo-m" else 0.0, **common)


def batch(dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(16, 6, generator=gen).to(dtype), torch.randn(16, 3, generator=gen)


def loss_of(model, x, y):
    return lambda: ((model(x).float() - y) ** 2).mean()


def run(method, dtype, q, steps, **kwargs):
    model = new_model(dtype)
    opt = new_optimizer(method, model, directions=q, **kwargs)
    x, y = batch(dtype)
    losses = [opt.step(loss_of(model, x, y)) for _ in range(steps)]
    return model, opt, losses


def final(model, opt) -> list[torch.Tensor]:
    opt.settle()
    if opt.mode != "inplace":
        opt.detach()
    return [p.detach().clone() for p in model.parameters()]


def reference(method, params, q, steps, *, gs=None, wd=0.0):
    """LOZO / LOZO-M / MeZO with q directions per step in float64, every direction's noise
    materialised from the seeds (direction k of step t: index t·q + k; V: step t // nu), the
    update the mean of the q estimates. gs: use these g's (steps × q) instead of computing them;
    wd: weight decay of the matrices, W ← (1 − lr·wd)·W − lr·(update), once per step.
    Returns (the g's, the final tensors)."""
    model64 = new_model(torch.float64)
    names = [n for n, _ in model64.named_parameters()]
    p = [t.detach().double().clone() for t in params]
    x, y = batch(torch.float64)
    seeds, n = RunSeeds(SEED), len(p)
    lowrank = [method != "mezo" and t.dim() >= 2 for t in p]

    def loss(tensors):
        out = functional_call(model64, dict(zip(names, tensors, strict=True)), (x,))
        return ((out - y.double()) ** 2).mean().item()

    def factors(t, k, i):
        """(U or z, V or None) of direction k of step t, tensor i."""
        d, w = t * q + k, p[i]
        if not lowrank[i]:
            return gaussian_noise(w.shape, seeds.seeds(d, n, "full")[i]).double(), None
        u_seed, v_seed = seeds.seeds(d, n, "u")[i], seeds.seeds(t // NU, n, "v")[i]
        U, V = lowrank_factors(w.shape, u_seed, v_seed, min(RANK, *w.shape))
        return U.double(), V.double()

    buffers, out_g = [None] * n, []
    for t in range(steps):
        terms = [[factors(t, k, i) for i in range(n)] for k in range(q)]
        zs = [[u if v is None else u @ v.T for u, v in direction] for direction in terms]
        if gs is None:
            step_g = []
            for z_k in zs:
                plus = loss([w + EPS * z for w, z in zip(p, z_k, strict=True)])
                minus = loss([w - EPS * z for w, z in zip(p, z_k, strict=True)])
                step_g.append((plus - minus) / (2 * EPS))
        else:
            step_g = [float(g) for g in gs[t]]
        out_g.append(step_g)
        for i in range(n):
            V = terms[0][i][1]  # every direction of the step has the step's V
            left = sum(g / q * terms[k][i][0] for k, g in enumerate(step_g))  # mean U (or z)
            if method == "lozo-m":
                if buffers[i] is None:
                    buffers[i] = left
                elif lowrank[i] and t % NU == 0:
                    v_old = seeds.seeds(t // NU - 1, n, "v")[i]
                    V_old = lowrank_factors(p[i].shape, 0, v_old, V.shape[1])[1].double()
                    carry = buffers[i] @ V_old.T @ V / p[i].shape[1]
                    buffers[i] = BETA * carry + (1 - BETA) * left
                else:
                    buffers[i] = BETA * buffers[i] + (1 - BETA) * left
                left = buffers[i]
            decay = 1.0 - LR * wd if p[i].dim() >= 2 else 1.0
            p[i] = decay * p[i] - LR * (left if V is None else left @ V.T)
    return np.array(out_g), p


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_step_averages_the_estimates_of_its_q_directions(method, dtype):
    """float32 in place: the g's and the weights are the float64 reference's up to float32
    rounding. bf16 (exact modes): the weights are the reference's update with the recorded g's
    up to one stochastic rounding per step, and the g's the reference's up to the bf16 forwards'
    rounding; a step with the wrong directions, the sum instead of the mean, or one V per
    direction is far outside both."""
    q, steps = 3, 5  # V refreshes at steps 2 and 4 (nu = 2): momentum carried, A flushed
    model, opt, _ = run(method, dtype, q, steps)
    start = [p.detach().clone() for p in new_model(dtype).parameters()]
    got = final(model, opt)
    assert opt.exact == (dtype == torch.bfloat16)
    g = opt.trajectory.g
    assert g.shape == (steps, q) and len(set(g.ravel().tolist())) == steps * q
    if dtype == torch.float32:
        g_ref, want = reference(method, start, q, steps)
        np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-4)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)
        return
    g_ref, _ = reference(method, start, q, steps)
    assert np.abs(g - g_ref).max() <= 0.1 * np.abs(g_ref).max()  # measured: 0.018 .. 0.034
    _, want = reference(method, start, q, steps, gs=g)
    moved = []
    for a, b, s in zip(got, want, start, strict=True):
        # One stochastic rounding per step (virtual: per flush), each < 1 ulp at the peak.
        top = torch.maximum(b.abs(), s.double().abs()).max().item()
        bound = steps * 2.0 ** (math.floor(math.log2(top)) - 7)
        assert (a.double() - b).abs().max().item() <= bound
        moved.append((b - s.double()).abs().max().item() / bound)
    assert max(moved) > 4  # the updates are far larger than the bound


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("mode", ["inplace", "shadow"])
def test_weight_decay_is_applied_once_per_step(method, mode):
    q, steps, wd = 2, 3, 0.5
    model = new_model()
    start = [p.detach().clone() for p in model.parameters()]
    # One group per tensor keeps the optimizer's order (the seeds' tensor index) the model's.
    groups = [{"params": [p], "weight_decay": wd * (p.dim() >= 2)} for p in model.parameters()]
    opt = new_optimizer(method, groups, directions=q, mode=mode, model=model)
    x, y = batch()
    for _ in range(steps):
        opt.step(loss_of(model, x, y))
    g_ref, want = reference(method, start, q, steps, wd=wd)
    np.testing.assert_allclose(opt.trajectory.g, g_ref, rtol=1e-4, atol=1e-4)
    for a, b in zip(final(model, opt), want, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


def test_one_direction_is_the_default_and_direction_zero_takes_the_steps_seeds():
    model_a, opt_a, losses_a = run("lozo", torch.float32, 1, 4)
    model_b = new_model()
    opt_b = new_optimizer("lozo", model_b)
    x, y = batch()
    losses_b = [opt_b.step(loss_of(model_b, x, y)) for _ in range(4)]
    assert losses_a == losses_b
    assert all(
        torch.equal(a, b) for a, b in zip(model_a.parameters(), model_b.parameters(), strict=True)
    )
    assert opt_a.trajectory.to_dict() == opt_b.trajectory.to_dict()
    assert "directions" not in opt_a.trajectory.hyperparameters
    assert "abort_direction" not in opt_a.trajectory.to_dict()["events"]
    # Step 0's direction 0 has index 0 whatever q is: same weights, same seeds, same g.
    _, opt_q, _ = run("lozo", torch.float32, 4, 1)
    assert opt_q.trajectory.g[0, 0] == opt_a.trajectory.g[0]
    assert opt_q.trajectory.g[0, 1] != opt_a.trajectory.g[1]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "dtype, kwargs",
    [
        (torch.float32, {}),
        (torch.float32, {"pipeline": True}),
        (torch.bfloat16, {}),
    ],
)
def test_replay_of_a_run_with_aborts_at_every_evaluation_is_bit_identical(method, dtype, kwargs):
    q = 3
    model = new_model(dtype)
    opt = new_optimizer(method, model, directions=q, **kwargs)
    x, y = batch(dtype)
    good = loss_of(model, x, y)
    for fail in range(2 * q):  # a step failing at its evaluation number `fail`, then a step
        calls = []

        def closure(calls=calls, fail=fail):
            calls.append(1)
            if len(calls) - 1 == fail:
                raise ZeroDivisionError
            return good()

        with pytest.raises(ZeroDivisionError):
            opt.step(closure)
        assert len(calls) == fail + 1
        opt.step(good)
        if fail == 2:
            opt.settle()
    kinds = [e for e in opt.trajectory.events if e != "settle"]
    assert kinds == [f"abort{'+-'[i % 2]}" if j == 0 else "step" for i in range(6) for j in (0, 1)]
    aborts = [g for kind, g, _, _ in opt.trajectory.iter_events() if kind in (1, 2)]
    assert aborts == [0, 0, 1, 1, 2, 2]
    assert opt.trajectory.g.shape == (2 * q, q)
    got = final(model, opt)
    loaded = Trajectory.from_dict(opt.trajectory.to_dict())
    assert loaded == opt.trajectory
    fresh = new_model(dtype)
    replay(fresh, loaded)
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), got, strict=True))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("mode", ["shadow", "auto"])
def test_a_failure_at_any_of_the_2q_evaluations_leaves_exact_mode_weights_bit_identical(
    method, mode
):
    """Exact modes write nothing before the update: the weights stay torch.equal, whichever of
    the 2q closure calls fails, by an exception or a NaN loss."""
    q = 3
    dtype = torch.float32 if mode == "shadow" else torch.bfloat16
    model = new_model(dtype)
    opt = new_optimizer(method, model, directions=q, mode=mode)
    x, y = batch(dtype)
    good = loss_of(model, x, y)
    opt.step(good)  # momentum buffers and a pending A exist
    before = [p.detach().clone() for p in model.parameters()]
    state = {k: dict(s) for k, s in opt.state.items()}  # replaced, never written in place
    for fail in range(2 * q):
        for bad in (lambda: 1 / 0, lambda: float("nan")):
            calls = []

            def closure(calls=calls, fail=fail, bad=bad):
                calls.append(1)
                return bad() if len(calls) - 1 == fail else good()

            with pytest.raises((ZeroDivisionError, FloatingPointError)):
                opt.step(closure)
            assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before, strict=True))
    assert opt.steps == 1
    assert all(opt.state[k][n] is v for k, entries in state.items() for n, v in entries.items())
    opt.step(good)
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), before, strict=True))


def test_a_nan_loss_is_reported_and_recorded_with_its_direction():
    model = new_model()
    opt = new_optimizer("mezo", model, directions=2)
    x, y = batch()
    good, calls = loss_of(model, x, y), []

    def closure():
        calls.append(1)
        return float("nan") if len(calls) == 4 else good()

    with pytest.raises(FloatingPointError, match="step 0, direction 1"):
        opt.step(closure)
    assert opt.trajectory.events == ["abort-"]
    assert next(opt.trajectory.iter_events())[1] == 1


@pytest.mark.parametrize("method", METHODS)
def test_resume_from_state_dict_is_bit_identical_and_checks_q(method, tmp_path):
    q, dtype = 2, torch.bfloat16
    model, opt, _ = run(method, dtype, q, 3)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    x, y = batch(dtype)
    for _ in range(3):
        opt.step(loss_of(model, x, y))
    got = final(model, opt)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model_b = new_model(dtype)
    model_b.load_state_dict(ckpt["model"])
    other = new_optimizer(method, model_b, directions=3)
    with pytest.raises(ValueError, match="hyperparameters"):
        other.load_state_dict(ckpt["opt"])
    other.detach()
    opt_b = new_optimizer(method, model_b, directions=q)
    opt_b.load_state_dict(ckpt["opt"])
    for _ in range(3):
        opt_b.step(loss_of(model_b, x, y))
    assert all(torch.equal(a, b) for a, b in zip(final(model_b, opt_b), got, strict=True))
    assert opt_b.trajectory == opt.trajectory


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2", None])
def test_directions_must_be_a_positive_integer(bad):
    model = new_model()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="directions must be an integer ≥ 1"):
        new_optimizer("lozo", model, directions=bad)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before, strict=True))


def test_split_is_checked():
    model = new_model()
    with pytest.raises(ValueError, match="split must be one of"):
        new_optimizer("mezo", model, directions=2, split="rows")
    with pytest.raises(ValueError, match="process_group"):
        new_optimizer("mezo", model, directions=2, split="directions")


def test_trajectory_checks_directions():
    traj = Trajectory("MeZO", {"eps": 1e-3, "directions": 2}, 0, 1)
    traj.params = param_fingerprint([torch.ones(2)], [None], [0], [True])
    with pytest.raises(ValueError, match="one g per direction"):
        traj.record_step(0.5, [1e-3], [0.0])
    traj.record_step([0.5, -0.25], [1e-3], [0.0])
    with pytest.raises(ValueError, match="direction must be in 0..1"):
        traj.record(1, 2)
    traj.record(2, 1)
    assert traj.steps == 1 and traj.g.tolist() == [[0.5, -0.25]]
    data = traj.to_dict()
    assert Trajectory.from_dict(data) == traj
    with pytest.raises(ValueError, match="directions must be an integer"):
        Trajectory("MeZO", {"directions": 0}, 0, 1)
    data["hyperparameters"]["directions"] = 3
    with pytest.raises(ValueError, match="disagree in length"):
        Trajectory.from_dict(data)


@pytest.mark.parametrize("method", ["lozo", "lozo-m"])
def test_virtual_modes_flat_buffers_take_every_direction(monkeypatch, method):
    """One GPU's flat virtual buffers (zofast.virtual_step, forced here on the CPU) load each
    direction for its forwards; the update and the momentum then run per tensor with all q
    directions: replay without the flat buffers gives the run's weights bit for bit, and a run
    without them stays within the hooks' rounding."""
    import zofast.optim.virtual as part

    monkeypatch.setattr(part, "flat_enabled", lambda slots: bool(slots))
    model, opt, _ = run(method, torch.bfloat16, 3, 5)
    assert opt.mode == "virtual" and opt._virtual._flat is not None
    got = final(model, opt)
    monkeypatch.setattr(part, "flat_enabled", lambda slots: False)
    fresh = new_model(torch.bfloat16)
    replay(fresh, opt.trajectory)
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), got, strict=True))
    plain, plain_opt, _ = run(method, torch.bfloat16, 3, 5)
    assert plain_opt._virtual._flat is None
    np.testing.assert_allclose(opt.trajectory.g, plain_opt.trajectory.g, rtol=0.05, atol=0.05)
    for a, b in zip(final(plain, plain_opt), got, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
