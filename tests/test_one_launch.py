"""Eager Triton passes in one launch (kernels/lowrank_seeded.py; gaussian_'s kernel reading its
terms as arguments): bit for bit the two-launch path from staged tables and the pure-torch apply
of the same factors, with no device copy for a few terms."""

import pytest
import torch
from helpers_backends import TRITON_ON_CPU

from zofast import perturb, perturb_args
from zofast.kernels import lowrank, lowrank_seeded

# On a GPU machine the same tests compile and run the kernels there (Triton's interpreter runs them
# on the CPU elsewhere): the one-launch path stays off by default until they pass on a GPU.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    DEVICE == "cpu" and not TRITON_ON_CPU, reason="needs Triton's interpreter or a GPU"
)


def randn(*shape):
    return torch.randn(*shape, device=DEVICE)


BIG = [2**64 - 1, 2**63, 2**63 + 12345, 0]  # seeds ≥ 2^63 travel as negative int64 patterns


@pytest.fixture(autouse=True)
def one_launch(monkeypatch):
    """The one-launch path on (the default; tests that compare turn it off and on again)."""
    monkeypatch.setattr(perturb, "_ONE_LAUNCH", True)


def both_paths(monkeypatch, call):
    """call() with the one-launch path, then with the factor + apply launches (staged tables)."""
    one = call()
    monkeypatch.setattr(perturb, "_ONE_LAUNCH", False)
    two = call()
    monkeypatch.setattr(perturb, "_ONE_LAUNCH", True)
    return one, two


def factors_reference(w, u_seeds, v_seeds, scales, rank, **options):
    """The two-kernel path's factors (Triton's normals), merged as lowrank_ merges them, applied
    by the pure-torch reference."""
    seeds, scales_t = perturb._device_terms(u_seeds + v_seeds, scales, w.device)
    m, n = w.shape
    u, v = lowrank.factors_triton(
        seeds, scales_t, m, n, rank, options.get("row_offset", 0), options.get("col_offset", 0)
    )
    u, v = perturb._merge_shared_v(u, v, v_seeds)
    return lowrank.lowrank_ref(w, u, v, **options)


CASES = [  # shape, rank, dtype, u seeds, v seeds, scales, options
    ((37, 29), 1, torch.bfloat16, [5], [BIG[0]], [1e-2], {}),
    ((20, 45), 2, torch.float16, [BIG[1], 6], [9, 13], [1e-2, -3e-3], {"row_offset": 3}),
    ((9, 133), 3, torch.float32, [5, 6, 7], [9, 9, 9], [0.5, -0.25, 2.0], {"w_scale": 0.999}),
    ((33, 17), 4, torch.bfloat16, [1], [2], [0.1], {"round_seed": BIG[2], "col_offset": 6}),
    ((5, 66), 5, torch.float16, [1, 2], [BIG[3], BIG[3]], [1e-2, 2e-2], {"round_seed": 7}),
    (
        (17, 35),
        6,
        torch.bfloat16,
        [1, 2, 3],
        [9, 13, 9],
        [1e-2, -2e-2, 0.3],
        {"round_seed": BIG[0], "w_scale": 1.5, "row_offset": 5, "col_offset": 7},
    ),
    ((40, 8), 7, torch.float32, [3, 4], [5, 6], [1.0, -1.0], {"row_offset": 1, "col_offset": 1}),
    ((8, 300), 8, torch.bfloat16, [BIG[1]], [BIG[2]], [1e-3], {"round_seed": 3, "w_scale": 0.5}),
    (  # five terms: seeds and scales through one staged table, groups out of order
        (13, 21),
        2,
        torch.float16,
        [1, 2, 3, 4, 5],
        [9, 13, 9, 13, 8],
        [1e-2, -2e-2, 0.3, 1.0, 2.0],
        {"round_seed": 11, "w_scale": 0.9},
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[f"rank{c[1]}-{len(c[3])}terms" for c in CASES])
def test_one_launch_equals_two_launches_and_reference(monkeypatch, case):
    shape, rank, dtype, u_seeds, v_seeds, scales, options = case
    w = randn(shape).to(dtype)

    def call():
        return perturb.lowrank_(
            w.clone(), u_seeds, v_seeds, rank, scales, backend="triton", **options
        )

    one, two = both_paths(monkeypatch, call)
    assert torch.equal(one, two)
    assert torch.equal(one, factors_reference(w, u_seeds, v_seeds, scales, rank, **options))


def test_tiles_give_the_same_bits():
    w = randn(45, 300).to(torch.bfloat16)
    seeds, scales = [5, 6, BIG[0], 9], [1e-2, -2e-2]
    options = dict(round_seed=BIG[1], w_scale=0.999, row_offset=3, col_offset=6)
    results = [
        lowrank_seeded.lowrank_seeded_triton(w.clone(), seeds, scales, 3, 0, bm, bn, **options)
        for bm, bn in [(32, 128), (8, 512), (16, 64), (64, 32)]
    ]
    assert all(torch.equal(results[0], r) for r in results[1:])


def test_out_of_place_writes_every_element_and_leaves_w():
    w = randn(37, 29).to(torch.bfloat16)
    before = w.clone()
    out = torch.full_like(w, float("nan"))
    perturb.lowrank_(w, [1, 2], [3, 3], 3, [1.0, 0.5], out=out, round_seed=4, backend="triton")
    assert torch.isfinite(out).all() and torch.equal(w, before)
    expected = perturb.lowrank_(
        w.clone(), [1, 2], [3, 3], 3, [1.0, 0.5], round_seed=4, backend="triton"
    )
    assert torch.equal(out, expected)
    out = torch.full_like(w, float("nan"))
    perturb.gaussian_(w, [1, 2], [1.0, 0.5], out=out, w_scale=0.5, backend="triton")
    assert torch.isfinite(out).all() and torch.equal(w, before)


def test_in_place_touches_exactly_w():
    buffer = torch.full((3 * 500,), float("nan"), device=DEVICE)
    w = buffer[500:1000].view(20, 25)
    w.zero_()
    perturb.lowrank_(w, 4, 5, 2, 1.0, backend="triton")
    perturb.gaussian_(w, 3, 1.0, backend="triton")
    assert torch.isfinite(w).all() and (w != 0).all()
    assert torch.isnan(buffer[:500]).all() and torch.isnan(buffer[1000:]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gaussian_arguments_equal_tables(monkeypatch, dtype):
    w = randn(11, 37).to(dtype)
    for seeds, scales, options in [
        ([BIG[0]], [1e-2], {}),
        ([1, 1, BIG[1], 5], [0.1, -0.2, 0.3, 1.0], {"round_seed": BIG[2], "w_scale": 1.5}),
        ([1, 2, 3, 4, 5], [1.0] * 5, {"offset": 7, "round_seed": 3}),
    ]:
        one, two = both_paths(
            monkeypatch,
            lambda s=seeds, c=scales, o=options: perturb.gaussian_(
                w.clone(), s, c, backend="triton", **o
            ),
        )
        assert torch.equal(one, two)


def spy_device_terms(monkeypatch):
    calls = []
    real = perturb._device_terms

    def spy(ints, floats, device):
        calls.append(len(ints))
        return real(ints, floats, device)

    monkeypatch.setattr(perturb, "_device_terms", spy)
    return calls


def test_few_terms_copy_nothing_more_take_one_table(monkeypatch):
    calls = spy_device_terms(monkeypatch)
    w = randn(16, 24).to(torch.bfloat16)
    options = dict(round_seed=BIG[0], w_scale=0.999, backend="triton")
    perturb.lowrank_(w, [1, 2, 3, 4], [5, 5, 6, 7], 2, [1.0] * 4, **options)
    perturb.gaussian_(w, [1, 2, 3, 4], [1.0] * 4, **options)
    assert calls == []
    perturb.lowrank_(w, [1, 2, 3, 4, 5], [5, 5, 6, 7, 8], 2, [1.0] * 5, **options)
    perturb.gaussian_(w, [1, 2, 3, 4, 5], [1.0] * 5, **options)
    assert calls == [11, 6]  # 2·5 seeds and the round seed; 5 seeds and the round seed


def test_group_terms_orders_by_first_v_seed():
    u, v, s, same_v = lowrank_seeded.group_terms([1, 2, 3, 4], [9, 8, 9, 8], [0.1, 0.2, 0.3, 0.4])
    assert (u, v, s, same_v) == ([1, 3, 2, 4], [9, 9, 8, 8], [0.1, 0.3, 0.2, 0.4], 0b1010)
    assert lowrank_seeded.group_terms([1, 2], [3, 4], [1.0, 2.0]) == ([1, 2], [3, 4], [1.0, 2.0], 0)


def test_seed_words_are_int32_patterns():
    from zofast.kernels.philox import seed_words

    words = seed_words([0, 2**64 - 1, 2**63, 0x89ABCDEF_12345678])
    assert words == (0, 0, -1, -1, 0, -(2**31), 0x12345678, 0x89ABCDEF - 2**32)
    assert all(-(2**31) <= x < 2**31 for x in words)


@pytest.mark.parametrize("case", CASES[1:6], ids=[f"rank{c[1]}" for c in CASES[1:6]])
def test_reference_is_the_torch_backend_and_near_triton(case):
    """lowrank_seeded_ref gives the torch backend's bits; Triton's normals may differ from
    torch's in their last bits (libm), so bf16 results are at most one rounding step apart."""
    shape, rank, dtype, u_seeds, v_seeds, scales, options = case
    w = randn(shape).to(dtype)
    scales = [perturb_args.as_float32(s, "scale") for s in scales]
    ref = lowrank_seeded.lowrank_seeded_ref(w, u_seeds, v_seeds, scales, rank, **options)
    backend = perturb.lowrank_(
        w.clone(), u_seeds, v_seeds, rank, scales, backend="torch", **options
    )
    assert torch.equal(ref, backend)
    w16 = w.to(torch.bfloat16)
    ref16 = lowrank_seeded.lowrank_seeded_ref(w16, u_seeds, v_seeds, scales, rank, **options)
    got = perturb.lowrank_(w16, u_seeds, v_seeds, rank, scales, backend="triton", **options)
    # Distance in bf16 steps: the int16 patterns made monotonic in the value.
    ia, ib = (x.view(torch.int16).int() for x in (got, ref16))
    ia, ib = (torch.where(i < 0, -(i & 0x7FFF), i) for i in (ia, ib))
    assert (ia - ib).abs().max() <= 1 and (ia == ib).float().mean() > 0.95
