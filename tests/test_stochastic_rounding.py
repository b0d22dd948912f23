"""Stochastic rounding (round_seed), weight scale (w_scale) and out= of the engine's passes.

The rounding is integer arithmetic on the float32 result, so every backend (C++, Triton's
interpreter, pure torch) gives the same bits from the same float32 value: outer_add_ (explicit
factors, exact fmas) is compared across backends directly; gaussian_ / lowrank_ (whose normals may
differ in the last float32 bit between libms) against the rounding of the backend's own float32
pass. The contract itself is checked against raw Philox words and against the two neighbours of
each value, and its expectation statistically."""

import math

import pytest
import torch
import triton
import triton.language as tl
from helpers_backends import CPU_BACKENDS

from zofast import perturb, rng
from zofast.kernels.philox import (
    load_seed,
    narrow_stochastic,
    round_words_ref,
    stochastic_round_ref,
    triton_interpreting,
)
from zofast.rng import to_signed64

pytestmark = pytest.mark.usefixtures("one_thread")

BACKENDS = CPU_BACKENDS
NARROW = [torch.bfloat16, torch.float16]
ROUND_SEED = 2**64 - 12345  # both words of the key non-zero, the high bit set


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def as_float(words) -> torch.Tensor:
    words = torch.as_tensor(words, dtype=torch.int64)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).view(torch.float32)


def neighbours(x: torch.Tensor, dtype: torch.dtype):
    """The largest value of `dtype` ≤ x and the smallest ≥ x (±inf beyond the finite range)."""
    near = x.to(dtype)
    up = torch.nextafter(near, torch.full_like(near, math.inf))
    down = torch.nextafter(near, torch.full_like(near, -math.inf))
    lo = torch.where(near.float() > x, down, near)
    hi = torch.where(near.float() < x, up, near)
    return lo, hi


def exact_sum(w, left, right, w_scale=None):
    """float32 fl(fl(a·w) + left·rightᵀ) for K = 1, computed apart from the kernels' reference."""
    acc = w.float()
    if w_scale is not None:
        acc = acc * torch.tensor(w_scale, dtype=torch.float32)
    return (acc.double() + left.double() @ right.double().T).float()


# The definition, word for word.


def test_round_words_are_the_contracts_philox_words():
    # Random123's known answer at counter 0, key 0: bits(0, 0, c) for c = 0..3.
    zero = torch.zeros(4, dtype=torch.int64)
    want = [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert round_words_ref(0, zero, torch.arange(4)).tolist() == want
    seed = 0x0123456789ABCDEF
    rows = torch.tensor([0, 1, 2**32 + 5, 2**40 + 7, 3])
    cols = torch.tensor([0, 7, 2**34 + 2, 13, 2**33 + 3])
    counters = torch.stack(
        [(cols >> 2) & 0xFFFFFFFF, cols >> 34, rows & 0xFFFFFFFF, rows >> 32], dim=1
    )
    words = rng.philox4x32(counters, (seed & 0xFFFFFFFF, seed >> 32), backend="cpp")
    want = words.gather(1, (cols & 3)[:, None])[:, 0]
    assert torch.equal(round_words_ref(seed, rows, cols), want)
    # Row 0 is the full-rank stream: (0, c) for every op.
    assert torch.equal(
        round_words_ref(seed, torch.zeros(9, dtype=torch.int64), torch.arange(9)),
        round_words_ref(seed, torch.tensor(0), torch.arange(9)),
    )


EDGES = [
    0x3F800000,  # 1: exact in both
    0x3F808000,  # bf16 tie
    0x3F807FFF,
    0x3F800001,
    0x3F801000,  # fp16 tie
    0x7F800000,  # inf
    0x7F7FFFFF,  # float32 max: bf16 max or inf
    0x7F7F0000,  # bf16 max, exact
    0x7F7F8000,
    0x477FE000,  # fp16 max, exact
    0x477FE001,
    0x477FF000,  # fp16's tie to inf
    0x477FFFFF,
    0x47800000,  # 65536: inf in fp16
    0x38800000,  # fp16's smallest normal
    0x387FFFFF,  # just below: through the subnormal path
    0x33800000,  # 2^-24: fp16's smallest subnormal
    0x33000000,  # 2^-25: half of it
    0x33000001,
    0x33400000,
    0x00000000,  # zero
    0x00000001,  # float32 subnormals
    0x007FFFFF,
    0x00800000,
    0x7FC00000,  # NaNs
    0x7F800001,
    0x7FFFFFFF,
]
EDGE_X = as_float(EDGES + [e | 0x80000000 for e in EDGES])


@pytest.mark.parametrize("dtype", NARROW)
@pytest.mark.parametrize("col_offset", [0, 3])
def test_edge_values_round_to_a_neighbour_identically_on_every_backend(dtype, col_offset):
    """x reaches the rounding exactly as fma(x, 1, 0) of an (N, 1) outer_add_; every result is
    one of x's two neighbours in `dtype` (NaN -> the canonical 0x7FFF), the same on all backends
    and equal to the reference with the words of (row, col_offset)."""
    x = EDGE_X[:, None]
    rows = torch.arange(x.shape[0])
    words = round_words_ref(ROUND_SEED, rows[:, None], torch.tensor([[col_offset]]))
    want = stochastic_round_ref(x, dtype, words)
    for backend in BACKENDS:
        w = torch.full(x.shape, -0.0, dtype=dtype)  # fma(x, 1, -0) is x, for x = ±0 too
        out = torch.full_like(w, math.nan)
        perturb.outer_add_(
            w,
            x,
            torch.ones(1, 1),
            col_offset=col_offset,
            round_seed=ROUND_SEED,
            out=out,
            backend=backend,
        )
        assert torch.equal(bits(out), bits(want)), backend
    nan = torch.isnan(x)
    assert (bits(want)[nan] == 0x7FFF).all()
    lo, hi = neighbours(x[~nan], dtype)
    got = want[~nan]
    assert ((bits(got) == bits(lo)) | (bits(got) == bits(hi))).all()
    exact = lo.float() == x[~nan]
    assert torch.equal(got[exact].float(), x[~nan][exact])  # representable values stay


@triton.jit
def _tile_kernel(
    x_ptr,
    y_ptr,
    seed_ptr,
    m,
    n,
    row_offset,
    col_offset,
    BM: tl.constexpr,
    BN: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    col_start = tl.program_id(1).to(tl.int64) * BN
    cols = col_start + tl.arange(0, BN)
    mask = (rows < m)[:, None] & (cols < n)[None, :]
    offsets = rows[:, None] * n + cols[None, :]
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
    seed_lo, seed_hi = load_seed(seed_ptr)
    y = narrow_stochastic(
        x, y_ptr, seed_lo, seed_hi, row_offset + rows, col_offset + col_start, ALIGNED
    )
    tl.store(y_ptr + offsets, y, mask=mask)


@pytest.mark.skipif(not triton_interpreting(), reason="the interpreter's test; GPU: test_gpu")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, on NaNs
@pytest.mark.parametrize("dtype", NARROW)
def test_triton_tile_rounding_on_random_bit_patterns(dtype, fresh_seed):
    """narrow_stochastic on float32 values of every kind (random 32-bit patterns: NaNs, infs,
    subnormals), column-aligned (a Philox block per four columns) and not (one per element)."""
    gen = torch.Generator().manual_seed(fresh_seed % 2**32)
    m, n = 19, 45
    x = as_float(torch.randint(0, 2**32, (m, n), generator=gen))
    seed = torch.tensor([to_signed64(ROUND_SEED)])
    for row_offset, col_offset in ((0, 0), (2**33 + 3, 4 * 2**31), (5, 3)):
        y = torch.empty(m, n, dtype=dtype)
        grid = (triton.cdiv(m, 8), triton.cdiv(n, 16))
        aligned = col_offset % 4 == 0
        _tile_kernel[grid](x, y, seed, m, n, row_offset, col_offset, 8, 16, ALIGNED=aligned)
        rows = row_offset + torch.arange(m)[:, None]
        words = round_words_ref(ROUND_SEED, rows, col_offset + torch.arange(n)[None, :])
        want = stochastic_round_ref(x, dtype, words)
        assert torch.equal(bits(y), bits(want)), (row_offset, col_offset, fresh_seed)


# Every backend, random data, shapes that fit no tile.


@pytest.mark.parametrize("dtype", NARROW + [torch.float32])
def test_outer_add_rounds_identically_on_every_backend(dtype, fresh_seed):
    gen = torch.Generator().manual_seed(fresh_seed % 2**32)
    w = torch.randn(37, 53, generator=gen).to(dtype)
    left, right = 1e-3 * torch.randn(37, 3, generator=gen), torch.randn(53, 3, generator=gen)
    kwargs = dict(row_offset=5, col_offset=6, round_seed=fresh_seed, w_scale=0.999)
    results = [perturb.outer_add_(w.clone(), left, right, backend=b, **kwargs) for b in BACKENDS]
    for backend, got in zip(BACKENDS, results, strict=True):
        assert torch.equal(bits(got), bits(results[0])), (backend, fresh_seed)
    if dtype == torch.float32:  # nothing to round: the seed has no effect
        kwargs.pop("round_seed")
        assert torch.equal(results[0], perturb.outer_add_(w.clone(), left, right, **kwargs))
    else:  # most elements move less than a step: rounding differs from nearest in some
        nearest = perturb.outer_add_(w.clone(), left, right, w_scale=0.999)
        assert 0 < (results[0] != nearest).sum() < w.numel()


def test_outer_add_on_a_large_odd_matrix_cpp_equals_reference(fresh_seed):
    gen = torch.Generator().manual_seed(fresh_seed % 2**32)
    w = torch.randn(1823, 781, generator=gen).to(torch.bfloat16)
    left, right = 1e-3 * torch.randn(1823, 2, generator=gen), torch.randn(781, 2, generator=gen)
    kwargs = dict(row_offset=7, col_offset=2, round_seed=fresh_seed)
    a = perturb.outer_add_(w.clone(), left, right, backend="cpp", **kwargs)
    b = perturb.outer_add_(w.clone(), left, right, backend="torch", **kwargs)
    assert torch.equal(bits(a), bits(b)), fresh_seed


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", NARROW)
def test_noise_passes_round_their_float32_result_stochastically(backend, dtype, fresh_seed):
    """gaussian_ / lowrank_ with a round seed (and a weight scale) = the same pass on a float32
    copy (widening is exact), rounded by the reference with the contract's words."""
    gen = torch.Generator().manual_seed(fresh_seed % 2**32)
    shape = (23, 37) if backend != "cpp" else (183, 79)
    w = torch.randn(shape, generator=gen).to(dtype)
    m, n = shape
    seeds, scales = [fresh_seed, fresh_seed ^ 1], [1e-3, -2e-3]
    kwargs = dict(w_scale=0.75, backend=backend)
    got = perturb.gaussian_(w.clone(), seeds, scales, offset=9, round_seed=ROUND_SEED, **kwargs)
    wide = perturb.gaussian_(w.float(), seeds, scales, offset=9, **kwargs)
    index = 9 + torch.arange(w.numel())
    words = round_words_ref(ROUND_SEED, torch.tensor(0), index).view(shape)
    assert torch.equal(bits(got), bits(stochastic_round_ref(wide, dtype, words))), fresh_seed
    args = ([fresh_seed, 3], [4, 5], 2, [1e-2, 1e-3])
    offsets = dict(row_offset=11, col_offset=5)
    got = perturb.lowrank_(w.clone(), *args, round_seed=ROUND_SEED, **offsets, **kwargs)
    wide = perturb.lowrank_(w.float(), *args, **offsets, **kwargs)
    words = round_words_ref(ROUND_SEED, 11 + torch.arange(m)[:, None], 5 + torch.arange(n))
    assert torch.equal(bits(got), bits(stochastic_round_ref(wide, dtype, words))), fresh_seed


@pytest.mark.parametrize("backend", BACKENDS)
def test_shards_round_as_the_whole_tensor(backend, fresh_seed):
    """A row shard, an aligned and an unaligned column shard (row_offset / col_offset / offset)
    get exactly the whole tensor's rounding words."""
    gen = torch.Generator().manual_seed(fresh_seed % 2**32)
    w = torch.randn(30, 22, generator=gen).to(torch.bfloat16)
    left, right = 1e-3 * torch.randn(30, 2, generator=gen), torch.randn(22, 2, generator=gen)
    opts = dict(round_seed=fresh_seed, backend=backend)
    full = perturb.outer_add_(w.clone(), left, right, **opts)
    rows = perturb.outer_add_(w[12:].clone(), left[12:], right, row_offset=12, **opts)
    assert torch.equal(bits(full[12:]), bits(rows))
    for c0 in (8, 5):
        part = w[:, c0:].contiguous()
        cols = perturb.outer_add_(part, left, right[c0:], col_offset=c0, **opts)
        assert torch.equal(bits(full[:, c0:]), bits(cols)), c0
    full = perturb.lowrank_(w.clone(), 7, 8, 2, 1e-2, **opts)
    shard = perturb.lowrank_(w[:, 5:].contiguous(), 7, 8, 2, 1e-2, col_offset=5, **opts)
    assert torch.equal(bits(full[:, 5:]), bits(shard))
    flat = perturb.gaussian_(w.clone().view(-1), 9, 1e-2, **opts)
    part = perturb.gaussian_(w.view(-1)[301:551].clone(), 9, 1e-2, offset=301, **opts)
    assert torch.equal(bits(flat[301:551]), bits(part))


# The expectation.


@pytest.mark.parametrize("dtype", NARROW)
def test_mean_of_stochastic_roundings_is_the_float32_result(dtype, fresh_seed):
    """The same sub-half-step update from the same start, N round seeds: the mean result is the
    float32 result within 5 sigma of the binomial noise; round-to-nearest, which drops every
    update, fails the same check by far."""
    gen = torch.Generator().manual_seed(fresh_seed % 2**32)
    count, n_seeds = 2048, 100
    low = -7 if dtype == torch.bfloat16 else -6.5  # fp16: a quarter of the start subnormal
    start = (10 ** torch.empty(count, 1).uniform_(low, 1, generator=gen)).to(dtype)
    start = torch.where(torch.rand(count, 1, generator=gen) < 0.5, -start, start)
    lo, hi = neighbours(start.float(), dtype)
    step = torch.nextafter(start, torch.full_like(start, math.inf)).float() - start.float()
    fraction = 0.05 + 0.4 * torch.rand(count, 1, generator=gen)  # of a step: always dropped
    update = (fraction * step).float()
    x = exact_sum(start, update, torch.ones(1, 1))  # the float32 result
    lo, hi = neighbours(x, dtype)
    spacing = (hi.double() - lo.double()).clamp_min(1e-300)
    p = (x.double() - lo.double()) / spacing
    assert (p > 0.01).all() and (p < 0.99).all()

    def total(round_seeds):
        z = torch.zeros_like(p)
        for seed in round_seeds:
            r = perturb.outer_add_(start.clone(), update, torch.ones(1, 1), round_seed=seed)
            z += (r.double() - x.double()) / spacing
        return z.sum().item()

    sigma = math.sqrt(n_seeds * (p * (1 - p)).sum().item())
    seeds = [(fresh_seed + 7919 * k) % 2**64 for k in range(n_seeds)]
    assert abs(total(seeds)) <= 5 * sigma, (fresh_seed, total(seeds), sigma)
    assert abs(total([None] * n_seeds)) > 5 * sigma  # round to nearest: -n_seeds·Σ p


# Weight scale and out.


@pytest.mark.parametrize("dtype", NARROW + [torch.float32])
def test_w_scale_is_one_rounded_multiply_before_the_terms(dtype, fresh_seed):
    gen = torch.Generator().manual_seed(fresh_seed % 2**32)
    w = torch.randn(29, 31, generator=gen).to(dtype)
    left, right = 1e-2 * torch.randn(29, 1, generator=gen), torch.randn(31, 1, generator=gen)
    a = 1 - 1e-3 * 0.1  # lr·wd
    want = exact_sum(w, left, right, a).to(dtype)
    for backend in BACKENDS:
        got = perturb.outer_add_(w.clone(), left, right, w_scale=a, backend=backend)
        assert torch.equal(bits(got), bits(want)), backend
    # 1.0 (and anything that is 1.0 in float32) multiplies nothing: today's bits.
    plain = perturb.lowrank_(w.clone(), 1, 2, 2, 1e-2)
    for one in (1.0, 1, 1 + 1e-12):
        assert torch.equal(
            bits(perturb.lowrank_(w.clone(), 1, 2, 2, 1e-2, w_scale=one)), bits(plain)
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_reads_w_once_and_equals_the_in_place_result(backend):
    w = torch.randn(40, 26).to(torch.float16)
    before = w.clone()
    opts = dict(round_seed=ROUND_SEED, w_scale=0.5, backend=backend)
    calls = [
        lambda x, out: perturb.gaussian_(x, [3, 4], [1e-2, 1e-3], out=out, **opts),
        lambda x, out: perturb.lowrank_(x, 5, 6, 3, 1e-2, row_offset=1, out=out, **opts),
        lambda x, out: perturb.outer_add_(x, torch.ones(40, 1), torch.ones(26, 1), out=out, **opts),
    ]
    for call in calls:
        out = torch.full_like(w, math.nan)
        assert call(w, out) is out
        assert torch.equal(bits(w), bits(before))
        assert torch.equal(bits(out), bits(call(w.clone(), None)))
        same = w.clone()
        assert call(same, same) is same  # out=w: in place
        assert torch.equal(bits(same), bits(out))


def _call(op, w, **kwargs):
    if op == "gaussian_":
        return perturb.gaussian_(w, 1, 1e-2, **kwargs)
    if op == "lowrank_":
        return perturb.lowrank_(w, 1, 2, 2, 1e-2, **kwargs)
    return perturb.outer_add_(w, torch.ones(w.shape[0], 1), torch.ones(w.shape[1], 1), **kwargs)


BAD = [
    ({"round_seed": -1}, ValueError, "round_seed"),
    ({"round_seed": 2**64}, ValueError, "round_seed"),
    ({"round_seed": 1.0}, ValueError, "round_seed"),
    ({"round_seed": True}, ValueError, "round_seed"),
    ({"round_seed": "7"}, ValueError, "round_seed"),
    ({"round_seed": torch.tensor([1.0])}, ValueError, "round_seed"),
    ({"w_scale": math.nan}, ValueError, "w_scale"),
    ({"w_scale": math.inf}, ValueError, "w_scale"),
    ({"w_scale": 1e39}, ValueError, "w_scale"),  # finite in float64, not in float32
    ({"w_scale": 10**400}, ValueError, "w_scale"),
    ({"w_scale": True}, ValueError, "w_scale"),
    ({"w_scale": "0.9"}, ValueError, "w_scale"),
    ({"w_scale": 1j}, ValueError, "w_scale"),
    ({"out": "w[1:]"}, ValueError, "overlaps"),
    ({"out": "w.T"}, ValueError, "out"),
    ({"out": torch.zeros(6, 8, dtype=torch.bfloat16)}, ValueError, "out"),
    ({"out": torch.zeros(8, 6)}, ValueError, "out"),
    ({"out": [0.0] * 48}, TypeError, "out"),
]


@pytest.mark.parametrize("op", ["gaussian_", "lowrank_", "outer_add_"])
@pytest.mark.parametrize("kwargs,error,match", BAD)
def test_bad_round_seed_w_scale_or_out_raise_before_writing(op, kwargs, error, match):
    buffer = torch.randn(2 * 48).to(torch.bfloat16)
    w = buffer[:48].view(8, 6)
    kwargs = dict(kwargs)
    if kwargs.get("out") == "w[1:]":
        kwargs["out"] = buffer[6:54].view(8, 6)
    elif kwargs.get("out") == "w.T":
        kwargs["out"] = torch.zeros(6, 8, dtype=torch.bfloat16).T
    before, out = buffer.clone(), kwargs.get("out")
    out_before = out.clone() if isinstance(out, torch.Tensor) else None
    with pytest.raises(error, match=match):
        _call(op, w, round_seed=kwargs.pop("round_seed", 5), **kwargs)
    assert torch.equal(bits(buffer), bits(before))
    if out_before is not None:
        assert torch.equal(out, out_before)
