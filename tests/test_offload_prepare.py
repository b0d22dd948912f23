"""Streamed offload's per-block preparation (zofast.offload_prepare): a block's factors and
perturbed small tensors are made just before its upload, inside the forward, not for every block
before it; the iterates stay bit for bit the resident run's, and an aborted step leaves the host
tensors as they were. The CPU stands in for the GPU (tests/test_offload.py)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers_models import optimizer, weights
from test_offload import batch, tiny

from zofast import offload, paired
from zofast.optim import noise as noise_module
from zofast.paired_ways import SmallValues
from zofast.shadow_step import Presets

pytestmark = pytest.mark.usefixtures("one_thread")


def _closure(model, options, data):
    if options.get("paired"):
        return lambda: paired.losses(model, data)
    return lambda: model(**data).loss.float()


def _events(model, streamed, opt, monkeypatch) -> list:
    """Record ("start", i) when block i's forward starts (before the stream's pre-hook) and
    ("made", i) at every host engine call that makes a block i tensor's factors or perturbed
    copies; returns the list (and the u seeds -> slot map is resolved after each step)."""
    events: list = []
    block_of = {id(p): i for i, params in enumerate(streamed._params) for p in params}
    for i, (_, block) in enumerate(streamed.blocks):
        block.register_forward_pre_hook(lambda m, a, i=i: events.append(("start", i)), prepend=True)
    factors = noise_module.lowrank_factors

    def recording(shape, u_seed, *args, **kwargs):
        events.append(("factors", int(u_seed)))
        return factors(shape, u_seed, *args, **kwargs)

    monkeypatch.setattr(noise_module, "lowrank_factors", recording)
    perturb = SmallValues._perturb

    def perturbing(self, c):
        blocks = {block_of.get(id(st.param)) for st in self.tensors}
        events.append(("made", blocks.pop() if len(blocks) == 1 else None))
        return perturb(self, c)

    monkeypatch.setattr(SmallValues, "_perturb", perturbing)
    presets = Presets._perturb

    def presetting(self, c):
        blocks = {block_of.get(id(st.param)) for st in self.tensors}
        events.append(("made", blocks.pop() if len(blocks) == 1 else None))
        return presets(self, c)

    monkeypatch.setattr(Presets, "_perturb", presetting)
    return events


def _resolved(events: list, opt, streamed, t: int) -> list:
    """events with the factors' u seeds of step t turned into ("made", block) (None: not a
    block tensor's)."""
    block_of = {id(p): i for i, params in enumerate(streamed._params) for p in params}
    seeds = opt._noise.seeds("u", t)
    by_seed = {int(seeds[s.index]): block_of.get(id(s.param)) for s in opt._slots if s.rank}
    return [("made", by_seed.get(x)) if kind == "factors" else (kind, x) for kind, x in events]


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("lozo", {"paired": True}),  # virtual factors, paired biases / norms (SmallValues)
        ("lozo", {"paired": True, "mode": "shadow"}),
        ("lozo", {}),  # virtual factors, shadow presets (Presets)
        ("mezo", {"mode": "shadow"}),  # presets
    ],
    ids=str,
)
def test_a_blocks_preparation_follows_the_previous_blocks_start(monkeypatch, method, options):
    """Block i's factors and perturbed copies are made after block i − 1's forward started and
    before block i's (block 0's: in its own pre-hook): while the blocks before it stream. On the
    code before the deferral every block's were made before block 0's forward."""
    model = tiny(dtype="bfloat16", layers=4)
    streamed = offload.stream(model, device="cpu")
    opt = optimizer(method, model, options)
    events = _events(model, streamed, opt, monkeypatch)
    closure = _closure(model, options, batch())
    for t in range(2):
        events.clear()
        opt.step(closure)
        seen = _resolved(events, opt, streamed, t)
        starts = [k for k, e in enumerate(seen) if e[0] == "start"]
        first_forward = starts[: len(streamed.blocks)]  # (non-paired: two forwards a step)
        made = [(k, e[1]) for k, e in enumerate(seen) if e[0] == "made" and e[1] is not None]
        assert made, "no block tensor was prepared"
        for k, i in made:
            if k > starts[-1] and not options.get("paired"):
                continue
            later = [s for s in starts if s > k]
            assert later, (t, i, seen)
            nxt = seen[later[0]][1]  # the forward the preparation ran before
            started = [s for s in starts if s < k]
            assert started, f"block {i}'s preparation ran before the forward: {seen}"
            assert seen[started[-1]][1] == max(i - 1, 0) and nxt in (i, i + 1), (i, seen)
        assert len(first_forward) == len(streamed.blocks)
    opt.detach()
    streamed.remove()


CASES = [
    ("lozo", "bfloat16", {"paired": True}),  # virtual matrices, paired biases and norms
    ("lozo", "bfloat16", {"paired": True, "mode": "shadow"}),
    ("lozo", "bfloat16", {}),  # virtual, two forwards, shadow presets for the rest
    ("lozo-m", "bfloat16", {"paired": True}),
    ("lozo-m", "bfloat16", {}),
    ("mezo", "bfloat16", {"mode": "shadow"}),
    ("mezo", "float32", {"mode": "inplace"}),
]


class _Failing:
    """A pre-hook on one block that raises, or makes the block's output NaN, while armed."""

    def __init__(self, block):
        self.armed = None
        block.register_forward_hook(self)

    def __call__(self, module, args, out):
        if self.armed == "raise":
            raise RuntimeError("boom")
        if self.armed == "nan":
            first = out[0] if isinstance(out, tuple) else out
            first.fill_(math.nan)
        return None


def _run(model, method, options, data, fail) -> tuple:
    """Steps with aborts in between: an exception in block 1's forward, a NaN loss; in an exact
    mode the weights after each abort must be those before it (in place restores by a pass, in
    its rounding)."""
    opt = optimizer(method, model, options)
    closure = _closure(model, options, data)
    for kind in (None, "raise", None, "nan", None, None):
        fail.armed = kind
        before = weights(model)
        if kind is None:
            opt.step(closure)
            continue
        with pytest.raises((RuntimeError, FloatingPointError)):
            opt.step(closure)
        after = weights(model)
        if options.get("mode") != "inplace":
            assert all(torch.equal(after[n], w) for n, w in before.items()), kind
    fail.armed = None
    opt.detach()
    return opt


@pytest.mark.parametrize(("method", "dtype", "options"), CASES, ids=str)
def test_streamed_runs_with_aborts_equal_the_resident_run_bit_for_bit(method, dtype, options):
    """The same steps and aborts (an exception, a NaN loss, both mid-forward) on a resident and
    a streamed model: every abort of an exact mode leaves the host tensors equal to before, and
    the iterates end bit for bit the same."""
    data = batch()
    plain_model = tiny(dtype=dtype)
    plain = _run(plain_model, method, options, data, _Failing(plain_model.model.decoder.layers[1]))
    model = tiny(dtype=dtype)
    streamed = offload.stream(model, device="cpu")
    opt = _run(model, method, options, data, _Failing(model.model.decoder.layers[1]))
    assert streamed.uploads > 0
    assert opt.trajectory.to_dict() == plain.trajectory.to_dict()
    a, b = weights(model), weights(plain_model)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    streamed.remove()


def test_deferred_values_are_made_at_their_first_read():
    """A block's factors still deferred (no forward reached it) are made where they are read
    (an update, a hook): the same numbers as made up front."""
    model = tiny(dtype="bfloat16")
    streamed = offload.stream(model, device="cpu")
    opt = optimizer("lozo", model, {"paired": True})
    opt._coef(0, 1e-2)
    vt = next(s.virtual for s in opt._slots if s.virtual is not None and ".layers.2." in name(s))
    assert vt._make is not None
    U, V = vt.U, vt.V
    slot = next(s for s in opt._slots if s.virtual is vt)
    U0, V0 = opt._noise.factors(slot, 0)
    assert torch.equal(U, U0) and torch.equal(V, V0) and vt._make is None
    opt._coef(0, 0.0)
    opt.detach()
    streamed.remove()


def name(slot) -> str:
    return slot.virtual.name
