"""The multi-tensor pass (zofast.kernels.multi, the engine of GraphedPass) against one Triton
gaussian_ / lowrank_ call per tensor: bit-identical, on odd shapes, mixed dtypes and ranks (the
C++ backend's normals may differ from Triton's in the last ulp, so the reference is Triton's)."""

import pytest
import torch

from zofast import perturb
from zofast.rng import to_signed64

pytestmark = pytest.mark.triton

# (shape, rank): odd sizes, a 1-row and a 1-column matrix, a ≥3-D tensor, vectors, a scalar-ish.
TENSORS = [
    ((37, 53), 2),
    ((5,), 0),
    ((130, 261), 3),
    ((3, 4, 5), 2),
    ((1, 7), 1),
    ((9, 1), 1),
    ((2051,), 0),
    ((1,), 0),
    ((67, 45), 3),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _setup(seed: int, n_terms: int, device: str):
    gen = torch.Generator().manual_seed(seed % 2**32)
    tensors = [
        torch.randn(shape, generator=gen).to(DTYPES[i % 3]).to(device)
        for i, (shape, _) in enumerate(TENSORS)
    ]
    ranks = [rank for _, rank in TENSORS]
    seeds = [
        [(seed + 7919 * (i * (n_terms + 1) + t)) % 2**64 for t in range(n_terms + 1)]
        for i in range(len(tensors))
    ]
    scales = torch.randn(len(tensors), n_terms, generator=gen).tolist()
    return tensors, ranks, seeds, scales


def _per_tensor(tensors, ranks, seeds, scales, n_terms, v_split=0):
    """One Triton call per tensor on copies; with v_split, terms from v_split on take the row's
    second v seed."""
    out = [w.clone() for w in tensors]
    for w, rank, row, scale in zip(out, ranks, seeds, scales, strict=True):
        if rank:
            v = row[n_terms:]
            v_seeds = [v[1] if v_split and t >= v_split else v[0] for t in range(n_terms)]
            perturb.lowrank_(w, row[:n_terms], v_seeds, rank, scale, backend="triton")
        else:
            perturb.gaussian_(w, row[:n_terms], scale, backend="triton")
    return out


def _tables(seeds, scales, device):
    """A plan's device tables: int64 seed rows (uint64 bit patterns), float32 scales."""
    seeds_t = torch.tensor([[to_signed64(s) for s in row] for row in seeds], device=device)
    return seeds_t, torch.tensor(scales, dtype=torch.float32, device=device)


@pytest.mark.parametrize("n_terms,v_split", [(1, 0), (3, 0), (3, 1), (3, 2)])
def test_multi_pass_equals_one_call_per_tensor(n_terms, v_split, fresh_seed):
    """Bit for bit; with v_split (a V-refresh pass: terms before it on one V, the others on a
    second) lowrank_ takes those two v seeds per tensor (full-rank tensors ignore them)."""
    from zofast.kernels.multi import MultiPass

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tensors, ranks, seeds, scales = _setup(fresh_seed, n_terms, device)
    if v_split:
        seeds = [row + [(row[-1] + 104729) % 2**64] for row in seeds]  # a second v seed
    expected = _per_tensor(tensors, ranks, seeds, scales, n_terms, v_split)
    plan = MultiPass(tensors, ranks, n_terms, tile=(16, 32), v_split=v_split)
    plan._u.fill_(float("nan"))  # every factor entry a launch reads must have been written
    plan._v.fill_(float("nan"))
    plan.launch(*_tables(seeds, scales, device))
    for i, (got, want) in enumerate(zip(tensors, expected, strict=True)):
        assert torch.equal(got, want), f"tensor {i} {TENSORS[i]}, seed {fresh_seed}"


@pytest.mark.parametrize(
    "n_terms,v_split,stochastic,scaled",
    [(1, 0, True, False), (2, 0, False, True), (3, 1, True, True)],
)
def test_multi_pass_options_equal_eager_calls(n_terms, v_split, stochastic, scaled, fresh_seed):
    """stochastic: each seeds row ends with the tensor's round seed; scaled: each scales row
    ends with its weight scale. Bit for bit one lowrank_ / gaussian_ per tensor with that
    round_seed / w_scale (float32 tensors: the round seed has no effect)."""
    from zofast.kernels.multi import MultiPass

    device = "cuda" if torch.cuda.is_available() else "cpu"
    keep = [i for i, (shape, _) in enumerate(TENSORS) if shape != (130, 261)]  # interpreter time
    tensors, ranks, seeds, scales = (
        [x[i] for i in keep] for x in _setup(fresh_seed, n_terms, device)
    )
    if v_split:
        seeds = [row + [(row[-1] + 104729) % 2**64] for row in seeds]
    round_seeds = [(2**64 - 1 - fresh_seed - 31 * i) % 2**64 for i in range(len(tensors))]
    w_scales = [1 - 1e-3 * (i + 1) for i in range(len(tensors))]
    expected = [w.clone() for w in tensors]
    for i, (w, rank, row, scale) in enumerate(zip(expected, ranks, seeds, scales, strict=True)):
        extra = dict(backend="triton")
        if stochastic:
            extra["round_seed"] = round_seeds[i]
        if scaled:
            extra["w_scale"] = w_scales[i]
        if rank:
            v = row[n_terms:]
            v_seeds = [v[1] if v_split and t >= v_split else v[0] for t in range(n_terms)]
            perturb.lowrank_(w, row[:n_terms], v_seeds, rank, scale, **extra)
        else:
            perturb.gaussian_(w, row[:n_terms], scale, **extra)
    if stochastic:
        seeds = [row + [r] for row, r in zip(seeds, round_seeds, strict=True)]
    if scaled:
        scales = [row + [a] for row, a in zip(scales, w_scales, strict=True)]
    plan = MultiPass(
        tensors,
        ranks,
        n_terms,
        tile=(16, 32),
        v_split=v_split,
        stochastic=stochastic,
        scaled=scaled,
    )
    plan._u.fill_(float("nan"))
    plan._v.fill_(float("nan"))
    plan.launch(*_tables(seeds, scales, device))
    for i, (got, want) in enumerate(zip(tensors, expected, strict=True)):
        assert torch.equal(got, want), f"tensor {i} {TENSORS[keep[i]]}, seed {fresh_seed}"


def test_multi_pass_narrow_tensors_take_the_float32_results_rounded_once(fresh_seed):
    """bf16 / fp16 tensors end as the same pass over float32 copies, rounded once by torch (the
    interpreter's own float32 -> bf16 conversion truncates: kernels.philox.narrow)."""
    from zofast.kernels.multi import MultiPass

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tensors, ranks, seeds, scales = _setup(fresh_seed, 2, device)
    wide = [w.float() for w in tensors]
    seeds_t, scales_t = _tables(seeds, scales, device)
    MultiPass(tensors, ranks, 2, tile=(16, 32)).launch(seeds_t, scales_t)
    MultiPass(wide, ranks, 2, tile=(16, 32)).launch(seeds_t, scales_t)
    for i, (got, want) in enumerate(zip(tensors, wide, strict=True)):
        as_int = torch.int16 if got.element_size() == 2 else torch.int32
        assert torch.equal(got.view(as_int), want.to(got.dtype).view(as_int)), (
            f"tensor {i} {TENSORS[i]} {got.dtype}, seed {fresh_seed}"
        )


def test_multi_pass_repeated_seed_terms_equal_one_pass_per_term(fresh_seed):
    """Full-rank terms on the previous term's seed reuse its normals: on float32 tensors a pass
    with seeds (a, a, b) equals three one-term passes bit for bit."""
    from zofast.kernels.multi import MultiPass

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tensors, ranks, seeds, scales = _setup(fresh_seed, 3, device)
    tensors = [w.float() for w in tensors]
    seeds = [[row[0], row[0], row[1], row[3]] for row in seeds]
    one_by_one = [w.clone() for w in tensors]
    for t in range(3):
        rows = [[row[t], row[3]] for row in seeds]
        term = _tables(rows, [[row[t]] for row in scales], device)
        MultiPass(one_by_one, ranks, 1, tile=(16, 32)).launch(*term)
    MultiPass(tensors, ranks, 3, tile=(16, 32)).launch(*_tables(seeds, scales, device))
    for i, rank in enumerate(ranks):
        if not rank:  # low-rank terms merge their u's first: not a sum of one-term passes
            assert torch.equal(tensors[i], one_by_one[i]), f"tensor {i}, seed {fresh_seed}"


def test_multi_pass_replays_with_new_seeds(fresh_seed):
    """The plan reads seeds and scales from the tables at every launch (graph-replay form)."""
    from zofast.kernels.multi import MultiPass

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tensors, ranks, seeds, scales = _setup(fresh_seed, 2, device)
    expected = _per_tensor(tensors, ranks, seeds, scales, 2)
    seeds_t = torch.zeros(len(tensors), 3, dtype=torch.int64, device=device)
    scales_t = torch.zeros(len(tensors), 2, dtype=torch.float32, device=device)
    plan = MultiPass(tensors, ranks, 2, tile=(16, 32))
    before = [w.clone() for w in tensors]
    plan.launch(seeds_t, scales_t)  # zero scales: nothing moves
    assert all(torch.equal(a, b) for a, b in zip(tensors, before, strict=True))
    for table, values in zip((seeds_t, scales_t), _tables(seeds, scales, device), strict=True):
        table.copy_(values)
    plan.launch(seeds_t, scales_t)
    assert all(torch.equal(a, b) for a, b in zip(tensors, expected, strict=True))


def test_multi_factors_equal_lowrank_factors(fresh_seed):
    """MultiPass.factors with one term of scale 1 gives lowrank_factors' (U, V) bit for bit
    (what LOZO's virtual mode draws per step for all its matrices at once)."""
    from zofast.kernels.multi import MultiPass

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tensors, ranks, seeds, _ = _setup(fresh_seed, 1, device)
    plan = MultiPass(tensors, ranks, 1, factors_only=True)
    got = plan.factors(*_tables(seeds, [[1.0]] * len(tensors), device))
    for w, rank, row, pair in zip(tensors, ranks, seeds, got, strict=True):
        if not rank:
            assert pair is None
            continue
        want = perturb.lowrank_factors(
            w.shape, row[0], row[1], rank, device=device, backend="triton"
        )
        assert torch.equal(pair[0], want[0]) and torch.equal(pair[1], want[1])
