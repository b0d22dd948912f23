"""The random streams: known answers, bit-exact integers and uniforms across backends, normals
within a few ULP, statistics, run seeds, and bad input."""

import math

import pytest
import torch
from helpers_backends import CPU_BACKENDS

from zofast import rng
from zofast.perturb import gaussian_noise

BACKENDS = CPU_BACKENDS

# Random123's known-answer vectors for philox4x32-10: (counter, key) -> output.
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in units in the last place between float32 tensors of one sign pattern."""
    ia = a.view(torch.int32).long()
    ib = b.view(torch.int32).long()
    ia = torch.where(ia < 0, -(ia & 0x7FFFFFFF), ia)
    ib = torch.where(ib < 0, -(ib & 0x7FFFFFFF), ib)
    return int((ia - ib).abs().max())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("counter,key,expected", KNOWN_ANSWERS)
def test_known_answers(backend, counter, key, expected):
    out = rng.philox4x32(torch.tensor([counter], dtype=torch.int64), key, backend=backend)
    assert out[0].tolist() == list(expected)


def test_integers_bit_exact_across_backends(fresh_seed):
    gen = torch.Generator().manual_seed(fresh_seed)
    counters = torch.randint(0, 2**32, (4099, 4), generator=gen, dtype=torch.int64)
    key = tuple(torch.randint(0, 2**32, (2,), generator=gen, dtype=torch.int64).tolist())
    outs = [rng.philox4x32(counters, key, backend=b) for b in BACKENDS]
    for backend, out in zip(BACKENDS[1:], outs[1:], strict=True):
        assert torch.equal(outs[0], out), f"{backend} (seed {fresh_seed})"


def test_uniforms_exact_normals_within_4_ulp(fresh_seed):
    gen = torch.Generator().manual_seed(fresh_seed)
    seed = int(torch.randint(0, 2**62, (1,), generator=gen)) * 4 + 3  # spans both key words
    offsets = torch.randint(0, 2**50, (5003,), generator=gen, dtype=torch.int64)
    offsets[:7] = torch.tensor([0, 1, 2, 3, 2**32 - 1, 2**32, 2**62])
    uniforms = [rng.uniform(seed, offsets, backend=b) for b in BACKENDS]
    normals = [rng.normal(seed, offsets, backend=b) for b in BACKENDS]
    for b, u, z in zip(BACKENDS[1:], uniforms[1:], normals[1:], strict=True):
        assert torch.equal(u, uniforms[0]), f"{b} uniforms differ (seed {fresh_seed})"
        assert ulp_distance(z, normals[0]) <= 4, f"{b} normals > 4 ULP (seed {fresh_seed})"
    assert uniforms[0].min() >= 0 and uniforms[0].max() < 1


def test_normal_is_lane_of_block():
    # normal(seed, i) is lane i % 4 of block i // 4, whatever the offset of the first element.
    index = torch.arange(40, dtype=torch.int64)
    full = rng.normal(11, index)
    for start in (0, 1, 3, 6):
        assert torch.equal(gaussian_noise((40 - start,), 11, offset=start), full[start:])


def test_moments_and_tails():
    n = 1_000_000
    z = gaussian_noise((n,), seed=2024, dtype=torch.float64)
    mean, var = z.mean().item(), z.var().item()
    skew = ((z - mean) ** 3).mean().item() / var**1.5
    kurt = ((z - mean) ** 4).mean().item() / var**2
    assert abs(mean) < 5 / math.sqrt(n)
    assert abs(var - 1) < 5 * math.sqrt(2 / n)
    assert abs(skew) < 5 * math.sqrt(6 / n)
    assert abs(kurt - 3) < 5 * math.sqrt(24 / n)
    beyond_3 = (z.abs() > 3).double().mean().item()
    assert abs(beyond_3 - 0.0026998) < 5 * math.sqrt(0.0027 / n)
    # The 1e-7 clamp cuts tails near sqrt(-2 ln 1e-7) = 5.68 sigma.
    assert z.abs().max().item() <= 5.68


@pytest.mark.parametrize("other", [1, 2**32, 2**63, 2**64 - 1])
def test_distinct_seeds_uncorrelated(other):
    n = 200_000
    a = gaussian_noise((n,), seed=0, dtype=torch.float64)
    b = gaussian_noise((n,), seed=other, dtype=torch.float64)
    corr = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
    assert abs(corr) < 5 / math.sqrt(n)
    shifted = torch.corrcoef(torch.stack([a[1:], a[:-1]]))[0, 1].item()
    assert abs(shifted) < 5 / math.sqrt(n)


def test_run_seeds_deterministic_and_distinct():
    seeds = rng.RunSeeds(2**64 - 1)
    again = rng.RunSeeds.from_dict(seeds.to_dict())
    drawn = {
        (step, role): seeds.seeds(step, 10, role) for step in (0, 1, 2**40) for role in rng.ROLES
    }
    for (step, role), values in drawn.items():
        assert values == again.seeds(step, 10, role)
        assert all(0 <= v < 2**64 for v in values)
    everything = [v for values in drawn.values() for v in values]
    assert len(set(everything)) == len(everything)
    assert seeds.seed(2, 7, "u") == seeds.seeds(2, 8, "u")[7]
    assert rng.RunSeeds(0).seeds(0, 4, "u") != rng.RunSeeds(1).seeds(0, 4, "u")


@pytest.mark.parametrize("seed", [-1, 2**64, 1.5, True, "3"])
def test_bad_seeds(seed):
    with pytest.raises((TypeError, ValueError), match="seed"):
        rng.normal(seed, torch.arange(4))


def test_bad_philox_input():
    with pytest.raises(ValueError, match="counters"):
        rng.philox4x32(torch.full((2, 4), 2**32, dtype=torch.int64), (0, 0))
    with pytest.raises(TypeError, match="counters"):
        rng.philox4x32(torch.zeros(2, 4, dtype=torch.int32), (0, 0))
    with pytest.raises(ValueError, match="key"):
        rng.philox4x32(torch.zeros(2, 4, dtype=torch.int64), (2**32, 0))
    with pytest.raises(ValueError, match="offsets"):
        rng.normal(1, torch.tensor([-1]))
    with pytest.raises(ValueError, match="backend"):
        rng.normal(1, torch.arange(3), backend="cuda")
    with pytest.raises(ValueError, match="role"):
        rng.RunSeeds(1).seeds(0, 3, "momentum")
