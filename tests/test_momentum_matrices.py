"""LOZO-M's matrices in flat buffers (zofast.optim.momentum_matrices): the low-rank launch from
caller-made factors (MultiPass.launch_lowrank) against one ``outer_add_`` per tensor, and in-place
LOZO-M with the flat matrices against the per-tensor path, bit for bit (CPU: Triton's interpreter
for the flat launches, the per-tensor factors through Triton too: the C++ engine's normals may
differ from them in the last ulp)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_momentum_update import triton_per_tensor

from zofast._ext import triton_available
from zofast.optim import LOZO
from zofast.perturb import outer_add_
from zofast.replay import replay

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs triton (interpreter)")

# (shape, rank, dtype): odd sizes, a 1-row and a 1-column matrix, a 3-D tensor, every dtype.
TENSORS = [
    ((33, 6), 2, torch.float32),
    ((3, 33), 1, torch.bfloat16),
    ((1, 7), 1, torch.float16),
    ((37, 53), 2, torch.bfloat16),
    ((9, 1), 1, torch.float32),
    ((3, 4, 5), 2, torch.float16),
]


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("scaled", [False, True])
def test_launch_lowrank_is_outer_add_per_tensor(split, stochastic, scaled):
    """Factors written into the plan's layout by hand (split: a v_split plan's 2r columns
    [u_1 | u_2]·[V_1 | V_2]ᵀ) give each tensor ``outer_add_`` of those columns, with its round
    seed and weight scale: the same fma order and rounding words."""
    from zofast.kernels.multi import MultiPass

    gen = torch.Generator().manual_seed(3)
    ws = [torch.randn(shape, generator=gen).to(dtype) for shape, _, dtype in TENSORS]
    ranks = [r for _, r, _ in TENSORS]
    terms = dict(n_terms=2, v_split=1) if split else dict(n_terms=1)
    plan = MultiPass(ws, ranks, **terms, stochastic=stochastic, scaled=scaled)
    u, v = (x.fill_(math.nan) for x in plan.factor_buffers())  # padding: never read
    round_seeds = [2**64 - 1 - 977 * i for i in range(len(ws))]
    w_scales = [1 - 1e-3 * (i + 1) for i in range(len(ws))]
    expected = []
    for i, (w, (U, V)) in enumerate(zip(ws, plan.factor_views(u, v), strict=True)):
        columns = 2 * U.shape[1] if split else U.shape[1]
        left = torch.randn(U.shape[0], columns, generator=gen)
        right = torch.randn(V.shape[0], columns, generator=gen)
        for view, full in ((U, left), (V, right)):  # the layout: column k at offset + k·stride
            view.as_strided(full.shape, view.stride(), view.storage_offset()).copy_(full)
        options = {
            "round_seed": round_seeds[i] if stochastic else None,
            "w_scale": w_scales[i] if scaled else 1.0,
        }
        expected.append(outer_add_(w.clone(), left, right, backend="cpp", **options))
    assert not any(torch.equal(w, e) for w, e in zip(ws, expected, strict=True))
    seeds = np.zeros((len(ws), plan.seed_width), dtype=np.uint64)
    seeds[:, -1] = round_seeds
    scales = np.ones((len(ws), plan.n_terms + scaled), dtype=np.float32)
    scales[:, -1] = w_scales
    plan.launch_lowrank(u, v, torch.from_numpy(seeds.view(np.int64)), torch.from_numpy(scales))
    for i, (w, e) in enumerate(zip(ws, expected, strict=True)):
        assert torch.equal(w, e), f"tensor {i} {TENSORS[i]}"


class Net(torch.nn.Module):
    """Matrices 33×6, 3×33 and 1×3 (rank ≤ 1), a bias each (the flat vectors)."""

    def __init__(self, dtype):
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(6, 33)
        self.head = torch.nn.Linear(33, 3)
        self.out = torch.nn.Linear(3, 1)
        self.to(dtype)

    def forward(self, x):
        return self.out(torch.tanh(self.head(torch.tanh(self.fc(x)))))

    def groups(self, lrs):
        """Two param groups (their lr differs: per-slot scales in the flat pass)."""
        first = [*self.fc.parameters()]
        rest = [*self.head.parameters(), *self.out.parameters()]
        return [{"params": first, "lr": lrs[0]}, {"params": rest, "lr": lrs[1]}]


def run(
    flat, monkeypatch, dtype=torch.float32, rank=2, rounding="nearest", device="cpu", **options
):
    """Six steps of in-place LOZO-M (nu = 3: a V refresh at step 3), weight decay, two groups;
    (model, optimizer, per flat update pass the slots it wrote, aborted steps). options:
    pipeline; losses {closure call: factor} (a NaN factor aborts that step)."""
    from zofast.optim import momentum, momentum_matrices

    writes, aborts, seen = [], [], []
    losses = options.pop("losses", {})
    with monkeypatch.context() as patch:
        patch.setattr(momentum, "bulk_on", lambda device: flat)
        triton_per_tensor(patch)
        spy = momentum_matrices.FlatMatrices.apply

        def counted(*args):
            done = spy(*args)
            if done:
                writes.append(len(done))
            return done

        patch.setattr(momentum_matrices.FlatMatrices, "apply", counted)
        model = Net(dtype).to(device)
        opt = LOZO(
            model.groups((5e-2, 3e-2)),
            lr=5e-2,
            eps=1e-2,
            rank=rank,
            nu=3,
            momentum=0.9,
            seed=5,
            mode="inplace",
            rounding=rounding,
            weight_decay=0.01,
            **options,
        )
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1)).to(device, dtype)

        def closure():
            seen.append(1)
            return model(x).float().pow(2).mean() * losses.get(len(seen), 1.0)

        for t in range(6):
            try:
                opt.step(closure)
            except FloatingPointError:
                aborts.append(t)
    return model, opt, writes, aborts


def assert_same(a, b) -> None:
    """Weights, momentum buffers and trajectories bit for bit."""
    (model, opt), (ref, opt_ref) = a, b
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["momentum_buffer"], opt_ref.state[q]["momentum_buffer"])
    assert opt.trajectory.to_dict() == opt_ref.trajectory.to_dict()


@pytest.mark.parametrize("rank,rounding", [(1, "nearest"), (2, "nearest"), (2, "stochastic")])
def test_flat_matrices_give_the_per_tensor_trajectory(rank, rounding, monkeypatch):
    """Across a V refresh (step 3: per tensor, its float64 projection) and back; replay of the
    flat run's trajectory (through the flat path too) gives its weights."""
    model, opt, writes, _ = run(True, monkeypatch, rank=rank, rounding=rounding)
    ref, opt_ref, ref_writes, _ = run(False, monkeypatch, rank=rank, rounding=rounding)
    # Every step but the refresh one (3) writes the three matrices in the flat pass.
    assert writes == [3] * 5 and ref_writes == []
    assert_same((model, opt), (ref, opt_ref))
    expected = [p.detach().clone() for p in model.parameters()]
    from zofast.optim import momentum

    with monkeypatch.context() as patch:
        patch.setattr(momentum, "bulk_on", lambda device: True)
        triton_per_tensor(patch)
        fresh = Net(torch.float32)
        replay(fresh.groups((5e-2, 3e-2)), opt.trajectory)
    assert all(torch.equal(p, e) for p, e in zip(fresh.parameters(), expected, strict=True))


def test_an_aborted_step_leaves_the_per_tensor_state(monkeypatch):
    """A NaN second loss at step 4 (closure call 10): FloatingPointError, nothing written; the
    run goes on from the per-tensor run's weights and buffers."""
    losses = {10: math.nan}
    model, opt, writes, aborts = run(True, monkeypatch, losses=losses)
    ref, opt_ref, _, ref_aborts = run(False, monkeypatch, losses=losses)
    assert aborts == ref_aborts == [4] and writes
    assert_same((model, opt), (ref, opt_ref))


@pytest.mark.filterwarnings("ignore:mode='inplace' on bfloat16")
def test_bf16_in_place_with_stochastic_rounding(monkeypatch):
    """Narrow weights take the pass's stochastic rounding words."""
    model, opt, writes, _ = run(True, monkeypatch, torch.bfloat16, rounding="stochastic")
    ref, opt_ref, _, _ = run(False, monkeypatch, torch.bfloat16, rounding="stochastic")
    assert writes == [3] * 5
    assert_same((model, opt), (ref, opt_ref))


def test_a_pipelined_step_takes_the_per_tensor_path(monkeypatch):
    """The next step's perturbation is a term the flat pass does not hold: per tensor (the
    buffers are still the flat ones)."""
    model, opt, writes, _ = run(True, monkeypatch, pipeline=True)
    ref, opt_ref, _, _ = run(False, monkeypatch, pipeline=True)
    assert writes == []
    assert_same((model, opt), (ref, opt_ref))


@pytest.mark.gpu
@pytest.mark.filterwarnings("ignore:mode='inplace' on bfloat16")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flat_matrices_on_the_gpu(dtype, monkeypatch):
    """Compiled Triton on a GPU: the flat pass gives the per-tensor run bit for bit."""
    model, opt, writes, _ = run(True, monkeypatch, dtype, rounding="stochastic", device="cuda")
    ref, opt_ref, _, _ = run(False, monkeypatch, dtype, rounding="stochastic", device="cuda")
    assert writes == [3] * 5
    assert_same((model, opt), (ref, opt_ref))
