"""Tests of the Fireworks Algorithm (zofast.dfo.fireworks)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from zofast.dfo.fireworks import Fireworks, FireworksResult


def sphere(X: np.ndarray, shift: np.ndarray) -> np.ndarray:
    return ((X - shift) ** 2).sum(axis=1)


def rastrigin(X: np.ndarray, shift: np.ndarray) -> np.ndarray:
    Z = X - shift
    return 10.0 * Z.shape[1] + (Z**2 - 10.0 * np.cos(2 * np.pi * Z)).sum(axis=1)


def ackley(X: np.ndarray, shift: np.ndarray) -> np.ndarray:
    Z = X - shift
    n = Z.shape[1]
    a = -20.0 * np.exp(-0.2 * np.sqrt((Z**2).sum(axis=1) / n))
    return a - np.exp(np.cos(2 * np.pi * Z).sum(axis=1) / n) + 20.0 + math.e


def optimize(es, fun, shift=None, max_gens: int | None = None) -> list[np.ndarray]:
    """Run ask/tell until stop (or max_gens); return every asked generation as an array."""
    gens = []
    while not es.stop() and (max_gens is None or len(gens) < max_gens):
        X = es.ask()
        arr = np.array(X)
        gens.append(arr)
        es.tell(X, list(fun(arr, shift) if shift is not None else fun(arr)))
    return gens


def test_shifted_sphere_30d_reduction():
    n = 30
    shift = np.random.default_rng(0).uniform(-5, 5, n)
    x0 = np.zeros(n)
    f0 = float(sphere(x0[None], shift)[0])
    es = Fireworks(x0, 2.0, {"seed": 1, "maxfevals": 30_000})
    optimize(es, sphere, shift)
    factor = f0 / es.result.fbest
    assert es.result.evaluations <= 30_000
    assert factor >= 1e3, f"sphere-30 reduced f by only {factor:.3g} (f0={f0:.3g})"


@pytest.mark.parametrize(
    ("fun", "half_width", "n"),
    [(rastrigin, 5.12, 10), (ackley, 32.768, 10), (rastrigin, 5.12, 30), (ackley, 32.768, 30)],
    ids=["rastrigin-10", "ackley-10", "rastrigin-30", "ackley-30"],
)
def test_beats_random_search(fun, half_width, n):
    budget, seeds = 1000 * n, range(5)
    fwa, rnd = [], []
    for seed in seeds:
        shift = np.random.default_rng(100 + seed).uniform(-5, 5, n)
        opts = {"seed": seed, "maxfevals": budget, "bounds": [-half_width, half_width]}
        es = Fireworks(np.zeros(n), 2 * half_width / 5, opts)
        optimize(es, fun, shift)
        fwa.append(es.result.fbest)
        # same count as FWA used (tolx/tolfun may stop it before maxfevals)
        evals = es.result.evaluations
        X = np.random.default_rng(seed).uniform(-half_width, half_width, (evals, n))
        rnd.append(float(fun(X, shift).min()))
    med_fwa, med_rnd = float(np.median(fwa)), float(np.median(rnd))
    assert med_fwa < 0.5 * med_rnd, (
        f"{fun.__name__}-{n}: median best FWA {med_fwa:.4g} vs random search {med_rnd:.4g}"
    )


def _seeded_run(seed: int, **extra):
    shift = np.random.default_rng(7).uniform(-3, 3, 8)
    opts = {"seed": seed, "maxfevals": 600, "bounds": [-4, 4], "popsize": 12, **extra}
    es = Fireworks(np.zeros(8), 1.0, opts)
    es.inject([np.full(8, 0.5)])
    gens = optimize(es, rastrigin, shift)
    return es.result, gens


@pytest.mark.parametrize("reevaluate", [True, False])
def test_seeded_runs_reproducible(reevaluate):
    r1, g1 = _seeded_run(3, reevaluate=reevaluate)
    r2, g2 = _seeded_run(3, reevaluate=reevaluate)
    r3, g3 = _seeded_run(4, reevaluate=reevaluate)
    assert np.array_equal(r1.xbest, r2.xbest) and r1.fbest == r2.fbest
    assert all(np.array_equal(a, b) for a, b in zip(g1, g2, strict=True))
    assert not np.array_equal(r1.xbest, r3.xbest)
    assert not np.array_equal(g1[0], g3[0])


def test_seed_none_draws_and_records_a_seed():
    es = Fireworks(np.zeros(3), 1.0)
    assert isinstance(es.seed, int)
    X = es.ask()
    again = Fireworks(np.zeros(3), 1.0, {"seed": es.seed}).ask()
    assert all(np.array_equal(a, b) for a, b in zip(X, again, strict=True))


def test_ask_returns_popsize_candidates_and_x0_first():
    x0 = np.arange(5.0)
    es = Fireworks(x0, 0.3, {"seed": 0, "popsize": 9})
    X = es.ask()
    assert isinstance(X, list) and len(X) == 9
    assert all(isinstance(x, np.ndarray) and x.shape == (5,) and x.dtype == float for x in X)
    assert np.array_equal(X[0], x0)
    X[0][:] = 99.0  # a caller mutating a candidate must not move the firework
    assert np.array_equal(es.result.xfavorite, x0)


def test_default_popsize_matches_pycma():
    for n in (1, 10, 500):
        assert Fireworks(np.zeros(n), 1.0, {"seed": 0}).popsize == 4 + int(3 * math.log(n))


@pytest.mark.parametrize("reevaluate", [True, False])
def test_generation_size_is_always_popsize(reevaluate):
    es = Fireworks(np.zeros(6), 1.0, {"seed": 0, "popsize": 10, "reevaluate": reevaluate})
    rng = np.random.default_rng(0)
    for gen in range(40):
        es.inject(list(rng.normal(size=(gen % 13, 6))))
        X = es.ask()
        assert len(X) == 10
        es.tell(X, list(sphere(np.array(X), np.ones(6))))
    assert es.countevals == 400 and es.countiter == 40


def test_reevaluate_puts_fireworks_first():
    es = Fireworks(np.zeros(4), 1.0, {"seed": 2, "popsize": 10, "n_fireworks": 3})
    for _ in range(5):
        X = es.ask()
        es.tell(X, list(sphere(np.array(X), np.ones(4))))
    fw = es._fw.copy()
    X = es.ask()
    assert np.array_equal(np.array(X[:3]), fw)
    assert np.array_equal(X[0], es.result.xfavorite)


def test_ask_tell_order_errors():
    es = Fireworks(np.zeros(3), 1.0, {"seed": 0})
    with pytest.raises(RuntimeError, match="without a preceding ask"):
        es.tell([np.zeros(3)], [0.0])
    es.ask()
    with pytest.raises(RuntimeError, match="twice"):
        es.ask()


def test_tell_validates_lengths_and_values():
    es = Fireworks(np.zeros(3), 1.0, {"seed": 0, "popsize": 6})
    X = es.ask()
    F = list(sphere(np.array(X), np.zeros(3)))
    with pytest.raises(ValueError, match="solutions"):
        es.tell(X[:-1], F)
    with pytest.raises(ValueError, match="function_values"):
        es.tell(X, F[:-1])
    with pytest.raises(ValueError, match="solutions"):
        es.tell([x[:2] for x in X], F)
    with pytest.raises(ValueError, match="solutions"):
        es.tell([x * np.nan for x in X], F)
    with pytest.raises(ValueError, match="function_values"):
        es.tell(X, ["a"] * 6)
    es.tell(np.array(X), np.array(F))  # arrays are compatible with lists
    assert es.countevals == 6


def test_non_finite_fitness_is_worst():
    es = Fireworks(np.zeros(3), 1.0, {"seed": 0, "popsize": 6})
    X = es.ask()
    F = [math.nan, -math.inf, math.inf, 5.0, math.nan, 7.0]
    es.tell(X, F)
    assert es.result.fbest == 5.0
    assert np.array_equal(es.result.xbest, X[3])
    assert es.result.evals_best == 4
    assert np.array_equal(es.result.xfavorite, X[3])


def test_converges_with_sporadic_nan():
    shift = np.full(5, 1.5)

    rng = np.random.default_rng(0)

    def noisy_sphere(X, s):
        f = sphere(X, s)
        f[rng.random(len(f)) < 0.3] = np.nan
        return f

    es = Fireworks(np.zeros(5), 1.0, {"seed": 0, "maxfevals": 3000})
    optimize(es, noisy_sphere, shift)
    assert math.isfinite(es.result.fbest) and es.result.fbest < 1e-3


def test_failed_reevaluation_keeps_the_firework():
    es = Fireworks(np.zeros(3), 1.0, {"seed": 0, "popsize": 6, "n_fireworks": 1})
    X = es.ask()
    es.tell(X, [0.0] + [1.0] * 5)
    X = es.ask()
    assert np.array_equal(X[0], np.zeros(3))
    es.tell(X, [math.nan] + [2.0] * 5)
    assert np.array_equal(es.result.xfavorite, np.zeros(3))
    assert es.sigma == pytest.approx(0.9 * 0.9)


def test_all_nan_generation_does_not_crash():
    es = Fireworks(np.zeros(4), 1.0, {"seed": 0, "popsize": 8})
    for _ in range(3):
        X = es.ask()
        es.tell(X, [math.nan] * len(X))
    assert es.result.xbest is None and es.result.fbest == math.inf
    X = es.ask()
    assert len(X) == 8 and np.isfinite(np.array(X)).all()


def test_inject_replaces_first_candidates():
    es = Fireworks(np.zeros(4), 1.0, {"seed": 0, "popsize": 8})
    a, b = np.full(4, 2.0), np.full(4, -3.0)
    es.inject([a, None, b], force=True)
    X = es.ask()
    assert len(X) == 8
    assert np.array_equal(X[0], a) and np.array_equal(X[1], b)
    assert np.array_equal(X[2], np.zeros(4))  # the firework x0 still follows
    es.tell(X, list(sphere(np.array(X), np.full(4, 2.0))))
    assert np.array_equal(es.result.xbest, a) and es.result.fbest == 0.0
    assert np.array_equal(es.result.xfavorite, a)


def test_inject_overflow_waits_for_next_generation():
    es = Fireworks(np.zeros(2), 1.0, {"seed": 0, "popsize": 5, "n_fireworks": 1})
    sols = [np.full(2, float(i)) for i in range(7)]
    es.inject(sols)
    X = es.ask()
    assert len(X) == 5 and all(np.array_equal(X[i], sols[i]) for i in range(4))
    es.tell(X, [float(x @ x) for x in X])
    X = es.ask()
    assert np.array_equal(X[0], sols[4]) and np.array_equal(X[2], sols[6])
    assert len(X) == 5


def test_inject_validates_and_clips():
    es = Fireworks(np.zeros(3), 1.0, {"seed": 0, "bounds": [-1, 1]})
    with pytest.raises(ValueError, match="length 3"):
        es.inject([np.zeros(4)])
    with pytest.raises(ValueError, match="finite"):
        es.inject([np.full(3, 0.25), np.array([0.0, np.inf, 0.0])])
    es.inject([np.array([5.0, -5.0, 0.5])])
    X = es.ask()
    assert np.array_equal(X[0], [1.0, -1.0, 0.5])
    assert not any(np.array_equal(x, np.full(3, 0.25)) for x in X)  # rejected call queued nothing


def test_handover_with_pycma():
    cma = pytest.importorskip("cma")
    shift = np.linspace(-1, 1, 6)
    es_cma = cma.CMAEvolutionStrategy(np.zeros(6), 0.5, {"seed": 1, "verbose": -9})
    optimize(es_cma, sphere, shift, max_gens=20)
    fw = Fireworks(es_cma.result.xbest, es_cma.sigma, {"seed": 1, "popsize": es_cma.popsize})
    fw.inject([es_cma.result.xbest])
    optimize(fw, sphere, shift, max_gens=20)
    assert fw.result.fbest <= es_cma.result.fbest
    es_cma.inject([fw.result.xbest], force=True)
    assert np.allclose(es_cma.ask()[0], fw.result.xbest)


def test_result_mirrors_pycma_fields():
    assert FireworksResult._fields == (
        "xbest",
        "fbest",
        "evals_best",
        "evaluations",
        "iterations",
        "xfavorite",
        "stds",
        "stop",
    )
    es = Fireworks(np.zeros(3), 0.7, {"seed": 0, "popsize": 6})
    r = es.result
    assert r.xbest is None and r.fbest == math.inf and r.evaluations == 0 and r.iterations == 0
    assert es.sigma == pytest.approx(0.7) and np.allclose(r.stds, 0.7)
    X = es.ask()
    F = list(sphere(np.array(X), np.ones(3)))
    es.tell(X, F)
    r = es.result
    assert r.fbest == min(F) and r.evaluations == 6 and r.iterations == 1
    assert r.evals_best == int(np.argmin(F)) + 1


def test_stop_empty_then_maxfevals_and_maxiter():
    es = Fireworks(np.zeros(3), 1.0, {"seed": 0, "popsize": 6, "maxfevals": 30})
    assert es.stop() == {}
    gens = optimize(es, sphere, np.ones(3))
    assert len(gens) == 5 and es.stop() == {"maxfevals": 30}
    es = Fireworks(np.zeros(3), 1.0, {"seed": 0, "maxiter": 4})
    assert len(optimize(es, sphere, np.ones(3))) == 4 and "maxiter" in es.stop()


def test_stop_tolx_when_amplitude_collapses():
    # started at the optimum, no spark can improve: the core amplitude shrinks by 0.9 per step
    es = Fireworks(np.zeros(3), 1.0, {"seed": 0, "tolfun": 1e-300, "n_fireworks": 1})
    gens = optimize(es, sphere, np.zeros(3), max_gens=1000)
    assert "tolx" in es.stop() and es.sigma < 1e-11
    assert len(gens) == math.ceil(math.log(1e-11) / math.log(0.9))


def test_stop_tolfun_on_flat_function_and_ftarget():
    es = Fireworks(np.zeros(3), 1.0, {"seed": 0})
    optimize(es, lambda X: np.ones(len(X)), max_gens=50)
    assert es.countiter == 1 and "tolfun" in es.stop()
    es = Fireworks(np.zeros(3), 1.0, {"seed": 0, "ftarget": 1e-2})
    optimize(es, sphere, np.ones(3), max_gens=1000)
    assert es.stop() == {"ftarget": 1e-2} and es.result.fbest <= 1e-2


def test_stop_tolfacupx_on_unbounded_linear_function():
    es = Fireworks(np.zeros(4), 1.0, {"seed": 0})
    optimize(es, lambda X: X.sum(axis=1), max_gens=1000)
    assert "tolfacupx" in es.stop() and es.sigma > 1e3


@pytest.mark.parametrize(
    "bounds",
    [
        [-1.0, 2.0],
        [np.linspace(-3, 0, 6), np.linspace(1, 4, 6)],
        [np.array([-1, -1, -np.inf, -1, -np.inf, -1]), np.array([1, 1, np.inf, 1, np.inf, 1])],
    ],
    ids=["scalar", "array", "mixed"],
)
@pytest.mark.parametrize("reevaluate", [True, False])
def test_candidates_respect_bounds(bounds, reevaluate):
    lb = np.broadcast_to(np.asarray(bounds[0], dtype=float), (6,))
    ub = np.broadcast_to(np.asarray(bounds[1], dtype=float), (6,))
    opts = {"seed": 5, "bounds": bounds, "maxfevals": 3000, "reevaluate": reevaluate}
    es = Fireworks(np.full(6, 10.0), 3.0, opts)  # x0 outside: clipped
    es.inject([np.full(6, -10.0)])
    gens = optimize(es, sphere, np.full(6, 50.0))  # optimum outside pulls sparks out
    allx = np.vstack(gens)
    assert np.isfinite(allx).all()
    assert (allx >= lb).all() and (allx <= ub).all()
    free = np.isinf(lb)
    if free.any():
        assert allx[:, free].max() > 10.0  # unbounded coordinates are not mapped


@pytest.mark.parametrize(
    ("x0", "sigma0", "opts", "match"),
    [
        (np.zeros(3), 1.0, {"popsize": 1}, "popsize"),
        (np.zeros(3), 1.0, {"popsize": 0}, "popsize"),
        (np.zeros(3), 1.0, {"popsize": 4.5}, "popsize"),
        (np.zeros(3), 1.0, {"popsize": 5, "n_fireworks": 5}, "popsize"),
        (np.zeros(3), 1.0, {"n_fireworks": 0}, "n_fireworks"),
        (np.zeros(3), 1.0, {"n_gaussian": -1}, "n_gaussian"),
        (np.zeros(3), 1.0, {"bounds": [1.0, -1.0]}, "bounds"),
        (np.zeros(3), 1.0, {"bounds": [0.0, 0.0]}, "bounds"),
        (np.zeros(3), 1.0, {"bounds": [np.zeros(2), np.ones(2)]}, "bounds"),
        (np.zeros(3), 1.0, {"bounds": [-1.0]}, "bounds"),
        (np.zeros(3), 1.0, {"bounds": 5.0}, "bounds"),
        (np.zeros(3), 1.0, {"bounds": [None, 1.0]}, "bounds"),
        (np.zeros(3), 1.0, {"bounds": [np.nan, 1.0]}, "bounds"),
        (np.array([0.0, np.nan, 0.0]), 1.0, {}, "x0"),
        (np.array([0.0, np.inf, 0.0]), 1.0, {}, "x0"),
        (np.zeros((2, 2)), 1.0, {}, "x0"),
        (np.zeros(0), 1.0, {}, "x0"),
        (["a", "b"], 1.0, {}, "x0"),
        (np.zeros(3), 0.0, {}, "sigma0"),
        (np.zeros(3), -1.0, {}, "sigma0"),
        (np.zeros(3), math.nan, {}, "sigma0"),
        (np.zeros(3), 1.0, {"seed": -1}, "seed"),
        (np.zeros(3), 1.0, {"seed": 1.5}, "seed"),
        (np.zeros(3), 1.0, {"maxfevals": 0}, "maxfevals"),
        (np.zeros(3), 1.0, {"amp_decrease": -0.9}, "amp_decrease"),
        (np.zeros(3), 1.0, {"spark_max_frac": 2.0}, "spark_max_frac"),
        (np.zeros(3), 1.0, {"popsiz": 5}, "popsiz"),
    ],
)
def test_bad_input_raises_value_error_naming_argument(x0, sigma0, opts, match):
    with pytest.raises(ValueError, match=match):
        Fireworks(x0, sigma0, opts)


def test_spark_counts_sum_to_budget_and_favour_better_fireworks():
    es = Fireworks(np.zeros(2), 1.0, {"seed": 0, "n_fireworks": 4, "popsize": 40})
    rng = np.random.default_rng(0)
    for budget in (0, 1, 7, 20, 35):
        f = rng.normal(size=4)
        counts = es._spark_counts(f, budget)
        assert counts.sum() == budget and (counts >= 0).all()
        assert (np.diff(counts[np.argsort(f)]) <= 0).all()
    counts = es._spark_counts(np.array([0.0, np.nan, np.inf, 1.0]), 30)
    assert counts.sum() == 30 and counts[0] == counts.max()


def test_minimal_amplitude_schedule():
    es = Fireworks(np.zeros(2), 1.0, {"seed": 0, "maxfevals": 1000})
    a_hat = math.sqrt(3.0)
    assert es._amp_min() == pytest.approx(0.1 * a_hat)
    es.countevals = 1000
    assert es._amp_min() == pytest.approx(0.005 * a_hat)
    es.countevals = 500
    expected = 0.1 * a_hat - (0.095 * a_hat) / 1000 * math.sqrt(1500 * 500)
    assert es._amp_min() == pytest.approx(expected)


@pytest.mark.parametrize("reevaluate", [False, True])
def test_state_round_trip_continues_identically(reevaluate):
    import json

    shift = np.linspace(-1, 1, 8)
    opts = {"seed": 11, "popsize": 12, "reevaluate": reevaluate, "bounds": [-3, 3]}
    es = Fireworks(np.zeros(8), 0.8, opts)
    optimize(es, rastrigin, shift, max_gens=6)
    es.inject([np.full(8, 0.5)])  # a pending injection travels with the state
    scalars, arrays = es.get_state()
    scalars = json.loads(json.dumps(scalars, allow_nan=False))
    twin = Fireworks(np.zeros(8), 0.8, opts)
    twin.set_state(scalars, {k: v.copy() for k, v in arrays.items()})
    assert twin.result.fbest == es.result.fbest and twin.sigma == es.sigma
    a = optimize(es, rastrigin, shift, max_gens=15)
    b = optimize(twin, rastrigin, shift, max_gens=15)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert twin.countevals == es.countevals and twin.stop() == es.stop()
    es.ask()
    with pytest.raises(RuntimeError, match="tell first"):
        es.get_state()
    with pytest.raises(ValueError, match="does not fit"):
        Fireworks(np.zeros(3), 0.8, opts).set_state(scalars, arrays)
