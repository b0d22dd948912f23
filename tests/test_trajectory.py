"""Tests of zofast.trajectory: checkpoint = seeds, bit-identical replay."""

from __future__ import annotations

import copy
import json
import math
from array import array

import numpy as np
import pytest
import torch

from zofast.optim import LOZO, MeZO, param_groups
from zofast.replay import replay
from zofast.trajectory import Trajectory, param_fingerprint

pytestmark = pytest.mark.usefixtures("one_thread")


class Net(torch.nn.Module):
    """Every kind of tensor the optimizers handle: a 2×8 embedding (rank clamped), a 3-D conv
    weight, LayerNorm vectors, a 0-D scalar, and a frozen layer."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(2, 8)
        self.conv = torch.nn.Conv1d(8, 6, 3)
        self.norm = torch.nn.LayerNorm(6)
        self.head = torch.nn.Linear(6, 3)
        self.scale = torch.nn.Parameter(torch.tensor(1.0))
        self.frozen = torch.nn.Linear(3, 3)
        self.frozen.requires_grad_(False)

    def forward(self, tokens):
        h = self.conv(self.emb(tokens).transpose(1, 2)).mean(-1)
        return self.frozen(self.head(self.norm(h))) * self.scale


def make_net(dtype=torch.float32):
    torch.manual_seed(0)
    return Net().to(dtype)


def batch(k):
    gen = torch.Generator().manual_seed(k)
    return torch.randint(0, 2, (8, 5), generator=gen), torch.randint(0, 3, (8,), generator=gen)


def loss_fn(model, tokens, labels):
    return torch.nn.functional.cross_entropy(model(tokens).float(), labels)


METHODS = {
    "LOZO": (LOZO, {"rank": 2, "nu": 4}),
    "LOZO-M": (LOZO, {"rank": 3, "nu": 4, "momentum": 0.8}),
    "MeZO": (MeZO, {}),
}


def fails_second_call(closure):
    calls = []

    def broken():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("data loader died")
        return closure()

    return broken


# How a run applies its perturbations: in place (rounding to nearest, as before stochastic
# rounding existed), in place pipelined, or the default (exact for bf16: shadow mode).
SETTINGS = {
    "inplace": {"mode": "inplace", "rounding": "nearest"},
    "pipelined": {"mode": "inplace", "rounding": "nearest", "pipeline": True},
    "default": {},
}


def run(method, dtype, setting, steps=30, model=None):
    """Train with a scheduler, weight decay, one aborted step at each stage and (pipelined) a
    mid-run settle(), like a real run with evaluations."""
    model = model if model is not None else make_net(dtype)
    cls, kwargs = METHODS[method]
    extra = dict(SETTINGS[setting])
    if setting == "default":
        extra["model"] = model
    opt = cls(param_groups(model, 0.1), lr=5e-3, seed=31, **extra, **kwargs)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.7)
    for k in range(steps):
        tokens, labels = batch(k)
        if k == 10:
            with pytest.raises(RuntimeError):
                opt.step(fails_second_call(lambda t=tokens, y=labels: loss_fn(model, t, y)))
        if k == 20:
            with pytest.raises(FloatingPointError):
                opt.step(lambda: float("nan"))
        if k == 15:
            opt.settle()
        opt.step(lambda t=tokens, y=labels: loss_fn(model, t, y))
        sched.step()
    return model, opt


def assert_same(a: torch.nn.Module, b: torch.nn.Module):
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert p.dtype == q.dtype
        assert torch.equal(p, q), name


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_replay_is_bit_identical(method, dtype, setting, tmp_path):
    model, opt = run(method, dtype, setting)
    opt.settle()
    events = opt.trajectory.events
    assert events.count("step") == 30 and "abort-" in events and "abort+" in events
    base = make_net(dtype)
    before = copy.deepcopy(base)
    with pytest.raises(AssertionError):
        assert_same(base, model)  # training changed the weights
    replay(base, opt.trajectory)
    assert_same(base, model)
    assert torch.equal(base.frozen.weight, before.frozen.weight)
    # ... and through a file.
    path = tmp_path / "run.json"
    opt.trajectory.save(path)
    loaded = Trajectory.load(path)
    assert loaded == opt.trajectory
    again = make_net(dtype)
    replay(again, str(path))
    assert_same(again, model)


def test_replay_without_settle_reproduces_the_unsettled_weights():
    model, opt = run("LOZO", torch.float32, "pipelined", steps=12)
    assert opt.pending
    base = make_net()
    replay(base, opt.trajectory, settle=False)
    assert_same(base, model)


def test_replay_of_a_resumed_run(tmp_path):
    model, opt = run("LOZO-M", torch.float32, "pipelined", steps=12)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "c.pt")
    ckpt = torch.load(tmp_path / "c.pt", weights_only=True)
    resumed = make_net()
    resumed.load_state_dict(ckpt["model"])
    cls, kwargs = METHODS["LOZO-M"]
    opt2 = cls(param_groups(resumed, 0.1), lr=5e-3, seed=0, pipeline=True, **kwargs)
    opt2.load_state_dict(ckpt["opt"])
    for k in range(12, 20):
        tokens, labels = batch(k)
        opt2.step(lambda t=tokens, y=labels: loss_fn(resumed, t, y))
    opt2.settle()
    base = make_net()
    replay(base, opt2.trajectory)
    assert_same(base, resumed)
    assert opt2.trajectory.steps == 20


def test_replay_with_a_parameter_list_and_frozen_inference_copy():
    model = make_net()
    opt = MeZO(model.parameters(), lr=1e-2, seed=2)  # no names recorded: order matters
    for k in range(5):
        tokens, labels = batch(k)
        opt.step(lambda t=tokens, y=labels: loss_fn(model, t, y))
    assert all(e["name"] is None for e in opt.trajectory.params)
    base = make_net().requires_grad_(False)
    replay(list(base.parameters()), opt.trajectory)
    assert_same(base, model)
    assert not any(p.requires_grad for p in base.parameters())  # flags are put back
    other = make_net()
    replay(other, opt.trajectory)  # a module, matched by order
    assert_same(other, model)


def test_replay_refuses_a_mismatched_model():
    model, opt = run("LOZO", torch.float32, "inplace", steps=3)
    traj = opt.trajectory
    torch.manual_seed(1)
    other = Net()  # same architecture, other initial weights
    wrong = make_net()
    wrong.head = torch.nn.Linear(6, 4)
    cases = [
        (model, "base weights"),  # the fine-tuned model is not the base
        (make_net(torch.bfloat16), "dtype"),
        (other, "base weights"),
        (torch.nn.Linear(3, 3), "no parameters named"),
        (list(make_net().parameters())[:-1], "tensors"),
        (wrong, "shape"),
    ]
    for target, match in cases:
        params = list(target.parameters()) if isinstance(target, torch.nn.Module) else target
        before = [p.detach().clone() for p in params]
        with pytest.raises(ValueError, match=match):
            replay(target, traj)
        assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True)), match


def test_trajectory_records_what_replay_needs():
    model, opt = run("LOZO-M", torch.float32, "inplace", steps=8)
    traj = opt.trajectory
    assert traj.method == "LOZO" and traj.run_seed == 31
    assert traj.hyperparameters == {
        "eps": 1e-3,
        "rank": 3,
        "nu": 4,
        "momentum": 0.8,
        "mode": "inplace",
        "rounding": "nearest",
        "pipeline": False,
    }
    assert traj.g.dtype == np.float32 and traj.g.shape == (8,)
    assert traj.lr.shape == (8, 2) and traj.lr[0, 0] == 5e-3 and traj.lr[7, 0] == 5e-3 * 0.7
    assert (
        traj.weight_decay[:, 0].tolist() == [0.1] * 8
        and traj.weight_decay[:, 1].tolist() == [0.0] * 8
    )
    names = [e["name"] for e in traj.params]
    assert names[:4] == ["emb.weight", "conv.weight", "head.weight", "scale"]  # decay group first
    assert not any(n.startswith("frozen") for n in names)  # param_groups leaves frozen ones out
    assert all(e["trained"] for e in traj.params)
    assert traj.device == "cpu"


def test_twenty_thousand_steps_fit_in_one_megabyte(tmp_path):
    model = make_net()
    groups = param_groups(model, 0.1)
    traj = Trajectory("LOZO", {"eps": 1e-3, "rank": 2}, run_seed=2**64 - 1, n_groups=2)
    flat = [p for g in groups for _, p in g["params"]]
    names = [n for g in groups for n, _ in g["params"]]
    traj.params = param_fingerprint(
        flat, names, [0] * 4 + [1] * (len(flat) - 4), [True] * len(flat)
    )
    rng = np.random.default_rng(0)
    for k in range(20_000):
        lr = 1e-6 * 0.5 * (1 + math.cos(math.pi * k / 20_000))  # a cosine schedule
        traj.record_step(float(np.float32(rng.standard_normal() * 30)), [lr, lr], [0.1, 0.0])
    path = tmp_path / "long.json"
    traj.save(path)
    size = path.stat().st_size
    assert size <= 1_000_000, size
    loaded = Trajectory.load(path)
    assert loaded == traj and loaded.steps == 20_000 and loaded.run_seed == 2**64 - 1
    assert np.array_equal(loaded.g, traj.g) and np.array_equal(loaded.lr, traj.lr)


def test_files_are_json_and_malformed_ones_are_refused(tmp_path):
    _, opt = run("MeZO", torch.float32, "inplace", steps=3)
    path = tmp_path / "t.json"
    opt.trajectory.save(path)
    data = json.loads(path.read_text())  # plain JSON, no pickle
    assert data["format"] == "zofast.trajectory"

    bad = tmp_path / "bad.json"
    bad.write_text("not json")
    with pytest.raises(ValueError, match="JSON"):
        Trajectory.load(bad)
    for mutate, match in [
        (lambda d: d.update(format="other"), "not a zofast trajectory"),
        (lambda d: d.update(version=99), "version"),
        (lambda d: d["events"].update(g=d["events"]["lr"]), "length"),
        (lambda d: d["events"].update(kinds="!!!"), "base64"),
        (lambda d: d.pop("method"), "malformed"),
        (lambda d: d.update(params=None), "fingerprint"),
    ]:
        d = json.loads(path.read_text())
        mutate(d)
        bad.write_text(json.dumps(d))
        with pytest.raises(ValueError, match=match):
            Trajectory.load(bad)


def _hostile(d: dict, what: str) -> None:
    """Mutate a saved trajectory's dict the way `what` says."""
    from zofast.trajectory import _pack

    n = Trajectory.from_dict(d).lr.size  # one per step and group
    if what == "group out of range":
        d["params"][0]["group"] = 7
    elif what == "negative lr":
        d["events"]["lr"] = _pack(array("d", [-1.0] * n), "f8")
    elif what == "NaN weight decay":
        d["events"]["weight_decay"] = _pack(array("d", [math.nan] * n), "f8")
    elif what == "a billion groups":
        d["n_groups"] = 10**9
    elif what == "run seed not a number":
        d["run_seed"] = "abc"
    elif what == "negative size":
        d["params"][0]["shape"] = [-1, 4]
    elif what == "trained not a bool":
        d["params"][0]["trained"] = "yes"
    elif what == "hyperparameters not a dict":
        d["hyperparameters"] = [1, 2]
    elif what == "eps that overflows float32":
        d["hyperparameters"]["eps"] = 1e39


HOSTILE = [
    ("group out of range", "group must be in 0..1, got 7"),
    ("negative lr", "lr or weight decay is negative or not finite"),
    ("NaN weight decay", "lr or weight decay is negative or not finite"),
    ("a billion groups", "1000000000 parameter groups"),
    ("run seed not a number", "run_seed 'abc' is not a number"),
    ("negative size", "shape must be a list of sizes"),
    ("trained not a bool", "trained must be true or false"),
    ("hyperparameters not a dict", "hyperparameters must be a dict"),
    ("eps that overflows float32", "eps = 1e\\+39 overflows float32"),
]


@pytest.mark.parametrize(("what", "match"), HOSTILE)
def test_hostile_trajectory_files_are_refused_and_the_base_untouched(tmp_path, what, match):
    _, opt = run("MeZO", torch.float32, "inplace", steps=3)
    path = tmp_path / "t.json"
    opt.trajectory.save(path)
    d = json.loads(path.read_text())
    _hostile(d, what)
    path.write_text(json.dumps(d))
    base = make_net()
    before = [p.detach().clone() for p in base.parameters()]
    with pytest.raises(ValueError, match=match):
        replay(base, path)
    assert all(torch.equal(p, b) for p, b in zip(base.parameters(), before, strict=True))


def test_truncated_undecodable_and_oversized_files_are_refused(tmp_path, monkeypatch):
    from zofast import trajectory as trajectory_module

    _, opt = run("MeZO", torch.float32, "inplace", steps=3)
    path = tmp_path / "t.json"
    opt.trajectory.save(path)
    text = path.read_bytes()
    cut = tmp_path / "cut.json"
    cut.write_bytes(text[: len(text) // 2])
    with pytest.raises(ValueError, match="not a JSON trajectory"):
        Trajectory.load(cut)
    latin = tmp_path / "latin.json"
    latin.write_bytes(b"\xff\xfe" + text)
    with pytest.raises(ValueError, match="not a JSON trajectory"):
        Trajectory.load(latin)
    monkeypatch.setattr(trajectory_module, "MAX_ARRAY_BYTES", 8)  # 3 steps: g 12 bytes, lr 24
    with pytest.raises(ValueError, match="'g' is larger than 8 bytes"):
        Trajectory.load(path)


def test_an_unstarted_trajectory_replays_as_a_no_op():
    model = make_net()
    opt = LOZO(model, lr=1e-3)
    base = make_net()
    replay(base, opt.trajectory)
    assert_same(base, model)
    assert Trajectory.from_dict(opt.trajectory.to_dict()) == opt.trajectory
