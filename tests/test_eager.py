"""The eager ops' host path: the one staged copy of a pass's seeds and scales, the float32 check
of scales without a torch op, the flat tile of odd row lengths; results unchanged bit for bit."""

import math

import pytest
import torch
from helpers_backends import CPU_BACKENDS, TRITON_ON_CPU

from zofast import perturb, perturb_args
from zofast.kernels import lowrank as lowrank_kernels

EDGE_FLOATS = [
    0.0,
    -0.0,
    1.0,
    -2.5,
    1e-3,
    0.1,
    1 / 3,
    1.0 + 2**-24,  # a tie: rounds to even (1.0)
    1.0 + 3 * 2**-24,  # a tie: rounds to even (1 + 2^-22)
    3.4028234663852886e38,  # the largest float32
    3.4028235e38,  # rounds down to it
    2**-149,  # the smallest subnormal
    1.5 * 2**-149,  # rounds to 2^-148
    0.75 * 2**-149,  # rounds up to 2^-149
    -1.2e-40,
    7,
    -(2**40),
]


def torch_float32(value) -> float:
    """What the scale check used to compute, with torch ops."""
    return torch.tensor(float(value), dtype=torch.float64).to(torch.float32).item()


@pytest.mark.parametrize("value", EDGE_FLOATS)
def test_as_float32_rounds_like_torch(value):
    assert math.copysign(1, perturb_args.as_float32(value, "scale")) == math.copysign(
        1, torch_float32(value)
    )
    assert perturb_args.as_float32(value, "scale") == torch_float32(value)


@pytest.mark.parametrize(
    "value,match",
    [
        (3.4028235677973366e38, "overflows float32"),  # rounds to inf in float32
        (1e39, "overflows float32"),
        (-1e39, "overflows float32"),
        (10**400, "overflows float32"),
        (0.5 * 2**-149, "underflows"),  # a tie between 0 and 2^-149: even is 0
        (1e-50, "underflows"),
        (float("nan"), "finite real number"),
        ("1.0", "finite real number"),
        (True, "finite real number"),
    ],
)
def test_as_float32_refuses_what_float32_cannot_hold(value, match):
    with pytest.raises(ValueError, match=match):
        perturb_args.as_float32(value, "scale")


@pytest.mark.parametrize("n_ints,n_floats", [(1, 1), (2, 1), (3, 2), (1, 0), (0, 1), (5, 7)])
def test_device_terms_round_trip_bit_patterns(n_ints, n_floats):
    ints = [0, 2**63, 2**64 - 1, 2**63 - 1, 12345][:n_ints]
    floats = [1e-3, -0.5, 2**-149, 3.4028234663852886e38, -1.0, 0.0, 7.0][:n_floats]
    seeds, scales = perturb._device_terms(ints, floats, torch.device("cpu"))
    assert seeds.dtype == torch.int64 and scales.dtype == torch.float32
    assert [s % 2**64 for s in seeds.tolist()] == ints
    assert scales.tolist() == [torch_float32(f) for f in floats]
    assert scales.data_ptr() % 16 == 0 or not floats  # aligned as a tensor of its own


def test_staged_pass_appends_round_seed_and_weight_scale():
    device = torch.device("cpu")
    seeds, scales, round_t, w_scale_t = perturb._staged_pass(
        [1, 2**64 - 1], [0.5, -0.25], 2**63 + 5, 0.999, device
    )
    assert [s % 2**64 for s in seeds.tolist()] == [1, 2**64 - 1]
    assert scales.tolist() == [0.5, -0.25]
    assert round_t.tolist() == [(2**63 + 5) - 2**64] and round_t.shape == (1,)
    assert w_scale_t.tolist() == [torch_float32(0.999)] and w_scale_t.shape == (1,)
    given = torch.tensor([7])
    _, _, round_t, w_scale_t = perturb._staged_pass([1], [1.0], given, None, device)
    assert round_t is given and w_scale_t is None


def spy_device_terms(monkeypatch):
    calls = []
    real = perturb._device_terms

    def spy(ints, floats, device):
        calls.append((list(ints), list(floats)))
        return real(ints, floats, device)

    monkeypatch.setattr(perturb, "_device_terms", spy)
    return calls


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_one_staged_copy_per_call_and_results_unchanged(monkeypatch, backend):
    """Every host value of a call (seeds, scales, round seed, weight scale) travels in one copy
    (none on Triton's one-launch path: kernel arguments, tests/test_one_launch.py); the results
    equal those of the graph-capture form, which stages nothing."""
    w = torch.randn(37, 29).to(torch.bfloat16)
    options = dict(round_seed=2**64 - 3, w_scale=0.999, backend=backend)
    calls = spy_device_terms(monkeypatch)
    eager_low = perturb.lowrank_(w.clone(), [5, 6], [9, 9], 2, [1e-2, -3e-3], **options)
    eager_full = perturb.gaussian_(w.clone(), [5, 6], [1e-2, -3e-3], **options)
    f32 = [torch_float32(x) for x in (1e-2, -3e-3, 0.999)]
    staged = [([5, 6, 9, 9, 2**64 - 3], f32), ([5, 6, 2**64 - 3], f32)]
    assert calls == ([] if backend == "triton" and perturb._ONE_LAUNCH else staged)
    as_tensors = dict(
        round_seed=torch.tensor([2**64 - 3 - 2**64]),
        w_scale=torch.tensor([0.999], dtype=torch.float32),
        backend=backend,
    )
    scales = torch.tensor([1e-2, -3e-3], dtype=torch.float32)
    graph_low = perturb.lowrank_(
        w.clone(), torch.tensor([5, 6]), torch.tensor([9]), 2, scales, **as_tensors
    )
    graph_full = perturb.gaussian_(w.clone(), torch.tensor([5, 6]), scales, **as_tensors)
    assert torch.equal(eager_low, graph_low)
    assert torch.equal(eager_full, graph_full)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("op", ["gaussian_", "lowrank_"])
def test_bad_input_stages_nothing(monkeypatch, op, backend):
    """Validation comes before the copy and the launch: a bad scale, seed, round seed or weight
    scale raises with nothing staged and w untouched."""
    calls = spy_device_terms(monkeypatch)
    w = torch.randn(6, 5).to(torch.bfloat16)
    before = w.clone()
    call = {
        "gaussian_": lambda seed=1, **kw: perturb.gaussian_(w, seed, **kw),
        "lowrank_": lambda seed=1, **kw: perturb.lowrank_(w, seed, 2, 2, **kw),
    }[op]
    for kwargs, match in [
        ({"scale": 1e39}, "overflows"),
        ({"scale": [1.0, 2.0]}, "one value per seed"),
        ({"seed": 2**64, "scale": 1.0}, "0..2\\*\\*64-1"),
        ({"scale": 1.0, "round_seed": -1}, "round_seed"),
        ({"scale": 1.0, "w_scale": float("inf")}, "w_scale"),
        ({"scale": 1.0, "out": torch.empty(6, 5)}, "out must be like w"),
    ]:
        with pytest.raises(ValueError, match=match):
            call(backend=backend, **kwargs)
    with pytest.raises(ValueError, match="backend"):
        call(scale=1.0, backend="cuda")
    assert calls == [] and torch.equal(w, before)


def test_unaligned_rows_take_the_flat_tile():
    assert lowrank_kernels.default_tile(2, row_aligned=False) == (8, 512)
    assert lowrank_kernels.default_tile(2) == (32, 128)


@pytest.mark.skipif(not TRITON_ON_CPU, reason="the Triton interpreter is not available")
@pytest.mark.parametrize("shape", [(37, 523), (9, 1030), (20, 29)])
def test_flat_tile_gives_the_same_bits(shape):
    """Odd row lengths launch 8×512 tiles: bit for bit the 32×128 tiles' result, with stochastic
    rounding, a weight scale and a column offset that is not a multiple of 4."""
    w = torch.randn(shape).to(torch.bfloat16)
    u = torch.randn(2, 3, shape[0])
    v = torch.randn(2, 3, shape[1])
    options = dict(
        round_seed=torch.tensor([2**62 + 7]),
        w_scale=torch.tensor([0.999]),
        row_offset=5,
        col_offset=6,
    )
    flat = lowrank_kernels.lowrank_triton(w.clone(), u, v, **options)
    tiled = lowrank_kernels.lowrank_triton(w.clone(), u, v, 32, 128, **options)
    assert torch.equal(flat, tiled)
