"""The perturbation engine against materialised references, on odd shapes and every dtype, plus the
contract's properties (block independence, rows as global indices, sharding) and bad input."""

import pytest
import torch
from helpers_backends import CPU_BACKENDS, TRITON_ON_CPU

from zofast import perturb
from zofast.kernels import gaussian as gaussian_kernels
from zofast.kernels import lowrank as lowrank_kernels

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# The interpreter and the pure-torch reference are slow on 2 CPU cores: they get smaller shapes.
SHAPES = {
    "cpp": [(1823, 781), (1, 4099), (4099, 1), (3, 5, 7, 2)],
    "triton": [(183, 79), (1, 257), (257, 1), (3, 5, 7, 2)],
    "torch": [(61, 37), (1, 130), (3, 4, 5)],
}
CASES = [(b, s) for b, shapes in SHAPES.items() if b in CPU_BACKENDS for s in shapes]


def weights(shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen).to(dtype)


def assert_close_to(result, reference64, dtype, terms, message):
    """|result - reference| within one rounding to `dtype` plus float32 rounding of each fma.
    A narrow dtype is rounded to nearest, half an ulp (<= eps / 2 relative); float32 results keep
    the relative slack of the fmas' own roundings."""
    eps = torch.finfo(dtype).eps / (1 if dtype == torch.float32 else 2)
    bound = eps * reference64.abs() + (terms + 1) * torch.finfo(torch.float32).eps * terms
    bound = bound + torch.finfo(dtype).tiny
    err = (result.double() - reference64).abs()
    assert torch.all(err <= bound), f"{message}: max err {err.max().item():.3g}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend,shape", CASES)
def test_gaussian_matches_materialised_noise(backend, shape, dtype, fresh_seed):
    w = weights(shape, dtype, fresh_seed % 2**32)
    seeds, scales = [fresh_seed, 2**64 - 1 - fresh_seed], [0.25, -0.125]
    expected = w.double()
    for seed, scale in zip(seeds, scales, strict=True):
        expected = expected + scale * perturb.gaussian_noise(shape, seed, backend=backend).double()
    out = perturb.gaussian_(w.clone(), seeds, scales, backend=backend)
    assert_close_to(out, expected, dtype, 2, f"seed {fresh_seed}")


@pytest.mark.parametrize("rank", [1, 16])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend,shape", [c for c in CASES if min(c[1][0], c[1][-1]) >= 1])
def test_lowrank_matches_materialised_product(backend, shape, dtype, rank, fresh_seed):
    m, n = perturb.matrix_shape(shape)
    rank = min(rank, m, n)
    w = weights(shape, dtype, fresh_seed % 2**32)
    u, v = perturb.lowrank_factors(shape, fresh_seed, fresh_seed + 1, rank, backend=backend)
    expected = w.double().reshape(m, n) + 0.5 * (u.double() @ v.double().T)
    out = perturb.lowrank_(w.clone(), fresh_seed, fresh_seed + 1, rank, 0.5, backend=backend)
    assert out.shape == w.shape
    assert_close_to(out.reshape(m, n), expected, dtype, rank, f"seed {fresh_seed}")


def bf16_steps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in bf16 rounding steps (ulps) between two bf16 tensors."""
    ia, ib = (x.view(torch.int16).long() for x in (a, b))
    ia, ib = (torch.where(i < 0, -(i & 0x7FFF), i) for i in (ia, ib))
    return int((ia - ib).abs().max())


@pytest.mark.parametrize("backend", CPU_BACKENDS[:-1])
def test_backends_agree_with_reference(backend):
    w = weights((45, 67), torch.bfloat16, 3)
    ops = [
        lambda x, b: perturb.gaussian_(x, [1, 2], [1e-2, -3e-2], backend=b),
        lambda x, b: perturb.lowrank_(x, 5, 6, 3, 1e-2, backend=b),
    ]
    for op in ops:
        out, ref = op(w.clone(), backend), op(w.clone(), "torch")
        # Each backend rounds its float32 result once, to nearest even (tests/test_rounding.py),
        # so the bf16 results agree wherever the float32 ones do. Normals may differ in their
        # last bits between libms (test_rng), which moves a result across a rounding boundary
        # now and then: at most one bf16 step apart.
        same = op(w.float(), backend) == op(w.float(), "torch")
        assert torch.equal(out[same], ref[same])
        assert bf16_steps(out, ref) <= 1


def test_noise_is_fully_written_over_poison():
    for backend in CPU_BACKENDS:
        out = torch.full((37, 29), float("nan"))
        perturb.gaussian_noise((37, 29), 9, offset=5, backend=backend, out=out)
        assert torch.isfinite(out).all(), backend


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_in_place_ops_touch_exactly_w(backend):
    # w is the middle of a NaN-poisoned buffer: every element of w changes, nothing around it does.
    buffer = torch.full((3 * 1000,), float("nan"))
    w = buffer[1000:2000].view(40, 25)
    w.zero_()
    perturb.gaussian_(w, 3, 1.0, backend=backend)
    perturb.lowrank_(w, 4, 5, 2, 1.0, backend=backend)
    assert torch.isfinite(w).all() and (w != 0).all()
    assert torch.isnan(buffer[:1000]).all() and torch.isnan(buffer[2000:]).all()


@pytest.mark.skipif(not TRITON_ON_CPU, reason="Triton on CPU tensors: its interpreter")
def test_block_configurations_give_identical_results():
    w = weights((131, 97), torch.float32, 0)
    seeds = torch.tensor([12345, -7], dtype=torch.int64)
    scales = torch.tensor([0.5, 0.25])
    a = gaussian_kernels.gaussian_triton(w.clone().view(-1), seeds, scales, 3, block=64)
    b = gaussian_kernels.gaussian_triton(w.clone().view(-1), seeds, scales, 3, block=512)
    assert torch.equal(a, b)
    u = torch.randn(2, 4, 131)
    v = torch.randn(2, 4, 97)
    c = lowrank_kernels.lowrank_triton(w.clone(), u, v, block_m=16, block_n=32)
    d = lowrank_kernels.lowrank_triton(w.clone(), u, v, block_m=64, block_n=128)
    assert torch.equal(c, d)
    assert torch.equal(c, lowrank_kernels.lowrank_ref(w, u, v))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_rows_are_global_indices(backend):
    full = perturb.lowrank_(torch.zeros(30, 20), 7, 8, 3, 1.0, backend=backend)
    top = perturb.lowrank_(torch.zeros(12, 20), 7, 8, 3, 1.0, backend=backend)
    assert torch.equal(full[:12], top)
    shard = perturb.lowrank_(torch.zeros(18, 20), 7, 8, 3, 1.0, row_offset=12, backend=backend)
    assert torch.equal(full[12:], shard)
    cols = perturb.lowrank_(torch.zeros(30, 5), 7, 8, 3, 1.0, col_offset=15, backend=backend)
    assert torch.equal(full[:, 15:], cols)
    flat = perturb.gaussian_(torch.zeros(600), 9, 1.0, backend=backend)
    part = perturb.gaussian_(torch.zeros(250), 9, 1.0, offset=301, backend=backend)
    assert torch.equal(flat[301:551], part)


def test_higher_rank_tensors_are_viewed_as_matrices():
    conv = perturb.lowrank_(torch.zeros(8, 3, 5, 5), 1, 2, 2, 1.0)
    flat = perturb.lowrank_(torch.zeros(8, 75), 1, 2, 2, 1.0)
    assert torch.equal(conv.reshape(8, 75), flat)


@pytest.mark.parametrize("rank", [1, 4, 16])
def test_lowrank_delta_has_rank_r(rank):
    w = perturb.lowrank_(torch.zeros(64, 48), 11, 12, rank, 1.0)
    sv = torch.linalg.svdvals(w.double())
    # r singular values well above float32 rounding, the rest at its level.
    assert sv[rank - 1] > 1e-3 * sv[0] and sv[rank] < 1e-5 * sv[0]


@pytest.mark.parametrize("backend", CPU_BACKENDS[:-1])
def test_fp32_apply_then_revert(backend):
    w = weights((257, 129), torch.float32, 1)
    out = perturb.gaussian_(w.clone(), 3, 1e-3, backend=backend)
    out = perturb.gaussian_(out, 3, -1e-3, backend=backend)
    # Two roundings of values near |w|: at most one ULP of |w| + 1e-3·|z| each.
    assert (out - w).abs().max() <= 2 * torch.finfo(torch.float32).eps * (w.abs().max() + 0.01)
    low = perturb.lowrank_(w.clone(), 4, 5, 2, 1e-3, backend=backend)
    low = perturb.lowrank_(low, 4, 5, 2, -1e-3, backend=backend)
    assert (low - w).abs().max() <= 2 * torch.finfo(torch.float32).eps * (w.abs().max() + 0.01)


def test_terms_sharing_v_are_merged_and_equal_the_sum():
    w = weights((50, 40), torch.float64, 2).float()
    fused = perturb.lowrank_(w.clone(), [1, 2], [9, 9], 2, [0.5, -0.25])
    u1, v = perturb.lowrank_factors((50, 40), 1, 9, 2)
    u2, _ = perturb.lowrank_factors((50, 40), 2, 9, 2)
    expected = w.double() + (0.5 * u1.double() - 0.25 * u2.double()) @ v.double().T
    assert (fused.double() - expected).abs().max() < 1e-5


def test_outer_add_matches_matmul():
    w = weights((33, 21), torch.float32, 4)
    left, right = torch.randn(33, 3), torch.randn(21, 3)
    out = perturb.outer_add_(w.clone(), left, right)
    assert torch.allclose(out, w + left @ right.T, atol=1e-5)


BAD_INPUTS = [
    (lambda: torch.zeros(4, 4, dtype=torch.int32), {}, TypeError, "w must be float32"),
    (lambda: torch.zeros(4, 4, dtype=torch.bool), {}, TypeError, "w must be float32"),
    (lambda: torch.zeros(4, 6).T, {}, ValueError, "contiguous"),
    (lambda: torch.zeros(1, 6).expand(4, 6), {}, ValueError, "contiguous"),
    (lambda: torch.zeros(4, 6, device="meta"), {}, ValueError, "meta"),
    (lambda: torch.zeros(0, 6), {}, ValueError, "empty"),
    (lambda: torch.zeros(4, 6), {"rank": 0}, ValueError, "rank"),
    (lambda: torch.zeros(4, 6), {"rank": 5}, ValueError, "rank"),
    (lambda: torch.zeros(4, 6), {"rank": 2.0}, TypeError, "rank"),
    (lambda: torch.zeros(4, 6), {"seed": -1}, ValueError, "seed"),
    (lambda: torch.zeros(4, 6), {"seed": 2**64}, ValueError, "seed"),
    (lambda: torch.zeros(4, 6), {"seed": True}, TypeError, "seed"),
    (lambda: torch.zeros(4, 6), {"scale": float("nan")}, ValueError, "scale"),
    (lambda: torch.zeros(4, 6), {"scale": float("inf")}, ValueError, "scale"),
    (lambda: torch.zeros(4, 6), {"scale": [1.0, 2.0]}, ValueError, "scale"),
    (lambda: torch.zeros(4, 6), {"offset": -3}, ValueError, "offset"),
    (lambda: torch.zeros(4, 6), {"offset": 2**63 - 8}, ValueError, "past 2\\*\\*63"),
    (lambda: torch.zeros(4, 6), {"backend": "cuda"}, ValueError, "backend"),
    # Finite in float64, used in float32: 1e39 would write inf, 1e-50 nothing, 10**400 overflow.
    (lambda: torch.zeros(4, 6), {"scale": 1e39}, ValueError, "scale = 1e\\+39 overflows float32"),
    (lambda: torch.zeros(4, 6), {"scale": 10**400}, ValueError, "overflows float32"),
    (lambda: torch.zeros(4, 6), {"scale": 1e-50}, ValueError, "underflows to 0 in float32"),
]


BAD_CASES = [
    (op, *case)
    for op in ("gaussian_", "lowrank_")
    for case in BAD_INPUTS
    if not (op == "gaussian_" and "rank" in case[1])  # gaussian_ takes no rank
]


@pytest.mark.parametrize("op,make,kwargs,error,match", BAD_CASES)
def test_bad_input_is_rejected_and_w_untouched(op, make, kwargs, error, match):
    w = make()
    before = w.clone() if w.device.type != "meta" else None
    seed = kwargs.get("seed", 1)
    args = dict(scale=kwargs.get("scale", 1.0), backend=kwargs.get("backend", "auto"))
    if op == "gaussian_":
        if "offset" in kwargs:
            args["offset"] = kwargs["offset"]
        call = lambda: perturb.gaussian_(w, seed, **args)  # noqa: E731
    else:
        if "offset" in kwargs:
            args["row_offset"] = kwargs["offset"]
        call = lambda: perturb.lowrank_(w, seed, 2, kwargs.get("rank", 2), **args)  # noqa: E731
    with pytest.raises(error, match=match):
        call()
    if before is not None:
        assert torch.equal(w, before)


def test_triton_backend_without_triton_is_refused_before_writing(monkeypatch):
    from zofast.kernels import _triton

    monkeypatch.setattr(_triton, "HAS_TRITON", False)
    w = weights((8, 6), torch.float32, 1)
    before = w.clone()
    for call in (
        lambda: perturb.gaussian_(w, 1, 1.0, backend="triton"),
        lambda: perturb.lowrank_(w, 1, 2, 2, 1.0, backend="triton"),
    ):
        with pytest.raises(RuntimeError, match="needs the triton package"):
            call()
    assert torch.equal(w, before)


def test_gaussian_noise_bad_arguments():
    for kwargs, error, match in [
        ({"shape": (3, -1)}, ValueError, "non-negative integer sizes"),
        ({"shape": 7}, TypeError, "shape must be a sequence"),
        ({"dtype": torch.int32}, TypeError, "floating"),
        ({"out": [0.0] * 12}, TypeError, "out must be a torch.Tensor"),
        ({"offset": 2**63 - 4}, ValueError, "past 2\\*\\*63"),
    ]:
        with pytest.raises(error, match=match):
            perturb.gaussian_noise(**{"shape": (3, 4), "seed": 1, **kwargs})


def test_one_dimensional_tensors_take_full_rank_noise_only():
    w = torch.zeros(98432)
    with pytest.raises(ValueError, match="2 dims"):
        perturb.lowrank_(w, 1, 2, 1, 1.0)
    assert (w == 0).all()
    perturb.gaussian_(w, 1, 1.0)
    assert torch.equal(w, perturb.gaussian_noise((98432,), 1))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fused_factors_equal_materialised_factors(backend):
    # lowrank_ generates its factors its own way (Triton: one launch for every term); they must
    # be exactly the factors lowrank_factors materialises, scaled once in float32.
    w = weights((37, 23), torch.float32, 5)
    fused = perturb.lowrank_(
        w.clone(), [3, 4], [5, 6], 3, [0.5, -2.0], row_offset=9, col_offset=2, backend=backend
    )
    expected = w.clone()
    for u_seed, v_seed, scale in ((3, 5, 0.5), (4, 6, -2.0)):
        u, v = perturb.lowrank_factors(
            (37, 23), u_seed, v_seed, 3, row_offset=9, col_offset=2, backend=backend
        )
        perturb.outer_add_(expected, u * scale, v, backend=backend)
    assert torch.equal(fused, expected)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_device_tensor_seeds_equal_integer_seeds(backend):
    w = weights((29, 31), torch.bfloat16, 6)
    seeds = [2**64 - 3, 17]
    as_tensor = torch.tensor([s - 2**64 if s >= 2**63 else s for s in seeds])
    scales = [1e-2, -3e-2]
    a = perturb.lowrank_(w.clone(), seeds, [5, 6], 2, scales, backend=backend)
    b = perturb.lowrank_(
        w.clone(), as_tensor, torch.tensor([5, 6]), 2, torch.tensor(scales), backend=backend
    )
    assert torch.equal(a, b)
    c = perturb.gaussian_(w.clone(), seeds, scales, backend=backend)
    d = perturb.gaussian_(w.clone(), as_tensor, torch.tensor(scales), backend=backend)
    assert torch.equal(c, d)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_one_device_v_seed_is_shared_and_merged_like_equal_integer_seeds(backend):
    w = weights((21, 34), torch.float32, 7)
    a = perturb.lowrank_(w.clone(), [3, 4], [9, 9], 2, [0.5, -0.25], backend=backend)
    b = perturb.lowrank_(
        w.clone(),
        torch.tensor([3, 4]),
        torch.tensor([9]),
        2,
        torch.tensor([0.5, -0.25]),
        backend=backend,
    )
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="v_seed"):
        perturb.lowrank_(
            w,
            torch.tensor([3, 4, 5]),
            torch.tensor([9, 9]),
            2,
            torch.tensor([0.5, -0.25, 1.0]),
            backend=backend,
        )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_repeated_seed_terms_equal_one_call_per_term(backend, fresh_seed):
    """Terms on the same seed as the previous term (MeZO's restore + update) reuse its normals
    in the Triton kernels: float32 results equal one single-term call per term, bit for bit
    (in float32 every term is one fma rounded to float32 either way)."""
    w = weights((37, 29), torch.float32, fresh_seed % 2**32)
    a = fresh_seed
    # Neighbours that differ from the previous seed in the low word only, or the high word only.
    seeds = [a, a, 2**64 - 1 - a, a ^ 1, a ^ 1, a ^ 1 ^ 2**40]
    scales = [0.5, -0.25, 0.125, 1.0, -2.0, 0.75]
    fused = perturb.gaussian_(w.clone(), seeds, scales, backend=backend)
    one_by_one = w.clone()
    for seed, scale in zip(seeds, scales, strict=True):
        perturb.gaussian_(one_by_one, seed, scale, backend=backend)
    assert torch.equal(fused, one_by_one)
