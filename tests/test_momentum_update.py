"""LOZO-M's update of its 1-D tensors in one launch (zofast.kernels.multi_columns,
zofast.optim.momentum_update): bit for bit the per-tensor ``outer_add_`` path, kernel and
optimizer, bf16 / fp16 / fp32, stochastic and nearest rounding (CPU: Triton's interpreter against
the C++ engine)."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from zofast._ext import triton_available
from zofast.optim import LOZO
from zofast.perturb import outer_add_
from zofast.replay import replay

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs triton (interpreter)")

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
SIZES = [1, 7, 1025, 2048 + 16, 781]  # no multiple of the block, a single element


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("scaled", [False, True])
def test_multi_columns_is_outer_add_per_tensor(dtype, stochastic, scaled):
    from zofast.kernels.multi_columns import MultiColumns, multi_columns_ref

    gen = torch.Generator().manual_seed(0)
    ws = [torch.randn(n, generator=gen).to(dtype) for n in SIZES]
    starts = [int(a) for a in np.cumsum([0] + [-(-n // 64) * 64 for n in SIZES])[:-1]]
    total = starts[-1] + SIZES[-1]
    columns = [torch.randn(total, generator=gen) for _ in range(2)]
    scales = np.random.default_rng(1).normal(size=(len(SIZES), 2)).astype(np.float32)
    w_scale = np.float32(0.999)
    seeds = [2**63 + 12345 + i for i in range(len(SIZES))]
    offsets = [0, 3, 0, 10, 0]
    expected = []
    for i, w in enumerate(ws):
        part = slice(starts[i], starts[i] + SIZES[i])
        options = {
            "row_offset": offsets[i],
            "round_seed": seeds[i] if stochastic else None,
            "w_scale": float(w_scale) if scaled else 1.0,
        }
        left = torch.stack([c[part] for c in columns], 1)
        right = torch.from_numpy(scales[i : i + 1].copy())
        by_engine = outer_add_(w.clone().view(-1, 1), left, right, backend="cpp", **options)
        expected.append(by_engine.view(-1))
        ref = multi_columns_ref(
            w,
            columns,
            starts[i],
            scales[i].tolist(),
            options["round_seed"],
            float(w_scale) if scaled else None,
            offsets[i],
        )
        assert torch.equal(ref, expected[-1])
    changed = [not torch.equal(w, e) for w, e in zip(ws, expected, strict=True)]
    assert all(changed)  # every tensor moves: an element the kernel skips would show
    table = np.concatenate([scales, np.full((len(SIZES), 1), w_scale)], 1) if scaled else scales
    MultiColumns(ws, starts, offsets, 2, stochastic, scaled).launch(
        torch.tensor([c.data_ptr() for c in columns]),
        torch.from_numpy(np.ascontiguousarray(table, dtype=np.float32)),
        torch.from_numpy(np.array(seeds, dtype=np.uint64).view(np.int64)),
    )
    for w, e in zip(ws, expected, strict=True):
        assert torch.equal(w, e)


class Net(torch.nn.Module):
    """A Linear (virtual mode's), a bias and a norm of odd sizes (the flat vectors)."""

    def __init__(self, dtype):
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(6, 33)
        self.norm = torch.nn.LayerNorm(33)
        self.head = torch.nn.Linear(33, 3)
        self.to(dtype)

    def forward(self, x):
        return self.head(self.norm(self.fc(x)))


def triton_per_tensor(patch) -> None:
    """The per-tensor path's factors (U, V) through Triton (its interpreter on a CPU), as on a
    GPU: the flat launches' factors are Triton's, and the C++ engine's normals may differ from
    them in the last ulp (tests/test_multi.py). Both paths apply them with the same passes."""
    from zofast.optim import noise

    patch.setattr(
        noise, "lowrank_factors", functools.partial(noise.lowrank_factors, backend="triton")
    )


def run(dtype, mode, rounding, flat, monkeypatch, pipeline=False, weight_decay=0.0, device="cpu"):
    """Six LOZO-M steps; (model, optimizer, FlatUpdate.run calls)."""
    from zofast.optim import momentum, momentum_update

    calls = []
    with monkeypatch.context() as patch:
        patch.setattr(momentum, "bulk_on", lambda device: flat)
        triton_per_tensor(patch)
        spy = momentum_update.FlatUpdate.run
        patch.setattr(momentum_update.FlatUpdate, "run", lambda *a: calls.append(1) or spy(*a))
        model = Net(dtype).to(device)
        opt = LOZO(
            model,
            lr=5e-2,
            eps=1e-2,
            rank=1,
            nu=3,
            momentum=0.9,
            seed=5,
            mode=mode,
            rounding=rounding,
            pipeline=pipeline,
            weight_decay=weight_decay,
        )
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1)).to(device, dtype)
        for _ in range(6):
            opt.step(lambda: model(x).float().pow(2).mean())
    return model, opt, len(calls)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("mode", ["shadow", "virtual", "inplace"])
def test_flat_update_gives_the_per_tensor_trajectory(dtype, rounding, mode, monkeypatch):
    """Weights, momentum buffers and the recorded g's bit for bit; and replay of the flat run's
    trajectory (through the flat path too) gives its weights."""
    if mode == "inplace" and dtype != torch.float32:
        pytest.skip("in place on bf16 / fp16 warns and random-walks; fp32 covers the pass")
    decay = 0.0 if mode == "virtual" else 0.01  # (refused on virtual tensors)
    model, opt, calls = run(dtype, mode, rounding, True, monkeypatch, weight_decay=decay)
    ref, opt_ref, ref_calls = run(dtype, mode, rounding, False, monkeypatch, weight_decay=decay)
    assert calls == 6 and ref_calls == 0
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, q)
        a, b = opt.state[p]["momentum_buffer"], opt_ref.state[q]["momentum_buffer"]
        assert torch.equal(a, b)
    assert opt.trajectory.to_dict() == opt_ref.trajectory.to_dict()
    opt.settle()
    expected = [p.detach().clone() for p in model.parameters()]
    from zofast.optim import momentum

    with monkeypatch.context() as patch:
        patch.setattr(momentum, "bulk_on", lambda device: True)
        triton_per_tensor(patch)
        fresh = Net(dtype)
        replay(fresh, opt.trajectory)
    assert all(torch.equal(p, e) for p, e in zip(fresh.parameters(), expected, strict=True))


def test_a_pipelined_in_place_step_takes_the_per_tensor_path(monkeypatch):
    """The next step's perturbation is a term the flat buffers do not hold: per tensor."""
    model, _, calls = run(torch.float32, "inplace", "nearest", True, monkeypatch, pipeline=True)
    ref, _, _ = run(torch.float32, "inplace", "nearest", False, monkeypatch, pipeline=True)
    assert calls == 0
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters(), strict=True))


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["shadow", "virtual"])
def test_the_graphed_flat_update_gives_the_per_tensor_weights_on_the_gpu(mode, monkeypatch):
    """On a GPU the pass is a CUDA graph (ColumnsPass) replayed with new tables every step."""
    model, _, calls = run(torch.bfloat16, mode, "stochastic", True, monkeypatch, device="cuda")
    ref, _, _ = run(torch.bfloat16, mode, "stochastic", False, monkeypatch, device="cuda")
    assert calls == 6
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters(), strict=True))
