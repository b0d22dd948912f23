"""Fireworks Algorithm (FWA) with a :class:`cma.CMAEvolutionStrategy`-shaped interface.

DFO-LoRA (arXiv 2403.01754) alternates CMA-ES and FWA on each layer's search vector, so
:class:`Fireworks` mirrors pycma: ``ask()`` / ``tell(X, F)`` / ``inject(solutions)`` /
``stop()`` / ``result`` / ``countevals`` / ``countiter`` / ``sigma``, and every generation has
exactly ``popsize`` candidates so that a batched evaluator can score one generation in one batch.

Variant
-------
EFWA operators (Zheng, Janecek & Tan, "Enhanced Fireworks Algorithm", CEC 2013) with the
dynFWA core-firework amplitude (Zheng, Janecek, Li & Tan, "Dynamic Search in Fireworks
Algorithm", CEC 2014):

* explosion: a spark of firework ``x_i`` moves each coordinate with probability 1/2 by its own
  offset ``A_i * U(-1, 1)`` (EFWA, per-dimension offsets);
* spark counts ``s_i ∝ (y_max - f_i + eps)`` clamped to ``[round(a*m), round(b*m)]`` (FWA,
  Tan & Zhu 2010), then rescaled (largest remainder) so that they sum to the generation's
  spark budget ``m`` exactly (with pycma-sized budgets ``round(a*m)`` is often 0, so a poor
  firework may get no sparks; it still moves through Gaussian sparks and selection);
* non-core amplitudes ``A_i = Â (f_i - y_min + eps) / (Σ_j (f_j - y_min) + eps)`` floored by
  EFWA's minimal amplitude ``A_min(t) = A_init - (A_init - A_final) / E_max *
  sqrt((2 E_max - t) t)`` with ``t`` the evaluations so far and ``E_max = maxfevals``;
* core firework (the best firework): dynFWA amplitude, multiplied by ``C_a = 1.2`` when the
  best spark of the generation beats the best firework and by ``C_r = 0.9`` otherwise (left
  unchanged when no firework has a finite value; injected solutions do not count as sparks);
* Gaussian sparks (EFWA): ``x + z ⊙ (x_best - x) e`` with ``x`` a random non-core firework,
  ``z`` a Bernoulli(1/2) coordinate mask, ``e ~ N(0, 1)`` one scalar per spark, ``x_best`` the
  core firework (with a single firework they would not move, so none are generated);
* out-of-bounds coordinates are re-drawn uniformly within the bounds (EFWA);
* elitism-random selection (EFWA): the best of fireworks and candidates is kept, the other
  ``n_fireworks - 1`` are drawn uniformly at random without replacement from the rest.

Why dynFWA for the core firework: EFWA's amplitude of the best firework is ``Â * eps / (...)``,
i.e. it collapses to ``A_min(t)``, a schedule fixed by ``maxfevals`` that knows nothing about
the landscape scale. In high dimension with a small budget, and without bounds to give ``Â`` a
meaning, this schedule is either far too large or far too small. dynFWA's success-based rule
(like the 1/5th rule of evolution strategies) adapts the step size to the landscape, which is
what a local refiner of an incumbent handed over by CMA-ES needs. Measured on a shifted 500-d
sphere from ``x0 = 0`` with ``sigma0 = 1`` and default options: f drops by 1.7x / 8x after
5,000 / 20,000 evaluations with the dynFWA core, by 1.1x / 1.1x with EFWA's amplitude.
``eps`` is the float64 machine epsilon, as in FWA's "smallest constant in the computer".

Scaling with ``sigma0``
-----------------------
Amplitudes are half-widths of uniform offsets. ``Â = sqrt(3) * sigma0 * amp_hat`` so that with
``amp_hat = 1`` a moved coordinate of a core spark has standard deviation ``sigma0`` at the
start, like a CMA-ES sample of step size ``sigma0``. ``A_init`` and ``A_final`` are expressed
as fractions of ``Â``. :attr:`Fireworks.sigma` is the current core amplitude divided by
``sqrt(3)``, so it starts at ``sigma0`` and is comparable to ``CMAEvolutionStrategy.sigma``.

Generation layout
-----------------
``ask()`` returns ``popsize`` candidates in this order: injected solutions (see
:meth:`Fireworks.inject`), the fireworks when they are (re-)evaluated, explosion sparks grouped
by firework (core firework first), Gaussian sparks. With ``reevaluate=True`` (default) the
fireworks are evaluated again in every generation, so all values of one ``tell`` come from the
same evaluation (the same minibatch when the loss is stochastic) and stale lucky values cannot
keep a firework alive. With ``reevaluate=False`` fireworks are evaluated once (generation 0)
and the whole budget goes to sparks, which suits deterministic objectives. In generation 0
fitness is unknown: the fireworks are ``x0`` and ``n_fireworks - 1`` points
``x0 + sigma0 * N(0, I)``, they share the sparks equally at the core amplitude, and there are
no Gaussian sparks.

Non-finite fitness (NaN, +inf, -inf) is treated as the worst possible value: such a candidate
is never the best one unless all are non-finite, and it never becomes ``result.fbest``. The one
exception is the re-evaluation of a firework (``reevaluate=True``): a non-finite value there
keeps the firework's previous value, so that one failed evaluation (e.g. an overflow on one
minibatch) does not throw away the incumbent.

Options (``inopts`` keys) and their defaults
--------------------------------------------
``seed`` (None)
    Integer seed of a ``numpy.random.Generator(PCG64(seed))``; no global RNG state is used.
    ``None`` draws fresh OS entropy, stored in :attr:`Fireworks.seed` so that the run can be
    reproduced.
``popsize`` (``4 + floor(3 ln N)``, pycma's default)
    Candidates per generation (injected + fireworks + explosion + Gaussian sparks).
``bounds`` (None)
    ``[lower, upper]``, each a scalar or an array of length N (None for +-inf). Every coordinate
    must be bounded on both sides or on neither, because out-of-bounds coordinates are re-drawn
    uniformly between the bounds. ``x0`` and injected solutions are clipped into the bounds.
``maxfevals``, ``maxiter`` (inf), ``ftarget`` (-inf)
    Termination criteria as in pycma. ``maxfevals`` is also ``E_max`` of ``A_min(t)``; when it is
    infinite, ``A_min(t) = A_init``.
``tolx`` (1e-11), ``tolfun`` (1e-11), ``tolfacupx`` (1e3)
    pycma's defaults: stop when ``sigma < tolx``; when the fitness range of the last generation
    and of the best values of the last ``10 + ceil(30 N / popsize)`` generations are below
    ``tolfun``; when ``sigma > tolfacupx * sigma0``.
``n_fireworks`` (1 if ``popsize < 10`` else 2)
    Number of fireworks. EFWA and dynFWA use 5 fireworks and ~50-150 sparks per generation; with
    pycma-sized generations (~10-25) and budgets of a few thousand evaluations, measured best
    was one or two fireworks (more spend the budget on re-evaluation and poor fireworks).
``n_gaussian`` (1 if ``n_fireworks > 1`` else 0)
    Gaussian sparks per generation. EFWA uses one per firework (5 with 5 fireworks); dynFWA drops
    them. One keeps the operator at a small cost.
``spark_min_frac`` (0.04), ``spark_max_frac`` (0.8)
    ``a`` and ``b`` of the spark-count clamp (Tan & Zhu 2010, kept by EFWA).
``amp_hat`` (1.0)
    ``Â`` in units of ``sqrt(3) * sigma0``; also the initial core amplitude. EFWA sets
    ``Â = 0.2 (X_max - X_min)``, the same fraction of the range that pycma recommends for
    ``sigma0``.
``amp_init`` (0.1), ``amp_final`` (0.005)
    ``A_init`` and ``A_final`` as fractions of ``Â``; EFWA's ``0.02`` and ``0.001`` of the range
    divided by its ``Â = 0.2`` of the range.
``amp_increase`` (1.2), ``amp_decrease`` (0.9)
    dynFWA's ``C_a`` and ``C_r``.
``reevaluate`` (True)
    Evaluate the fireworks again in every generation (see above).

Example:
    >>> import numpy as np
    >>> from zofast.dfo.fireworks import Fireworks
    >>> es = Fireworks(np.zeros(5), 0.5, {"seed": 1, "maxfevals": 2000})
    >>> while not es.stop():
    ...     X = es.ask()
    ...     es.tell(X, [float(np.sum((x - 1.0) ** 2)) for x in X])
    >>> bool(es.result.fbest < 1e-3)
    True
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, NamedTuple

import numpy as np

__all__ = ["Fireworks", "FireworksResult", "DEFAULT_OPTIONS"]

_EPS = float(np.finfo(float).eps)
_SQRT3 = math.sqrt(3.0)

DEFAULT_OPTIONS: Mapping[str, Any] = MappingProxyType(
    {
        "seed": None,
        "popsize": None,
        "bounds": None,
        "maxfevals": math.inf,
        "maxiter": math.inf,
        "ftarget": -math.inf,
        "tolx": 1e-11,
        "tolfun": 1e-11,
        "tolfacupx": 1e3,
        "n_fireworks": None,
        "n_gaussian": None,
        "spark_min_frac": 0.04,
        "spark_max_frac": 0.8,
        "amp_hat": 1.0,
        "amp_init": 0.1,
        "amp_final": 0.005,
        "amp_increase": 1.2,
        "amp_decrease": 0.9,
        "reevaluate": True,
    }
)


class FireworksResult(NamedTuple):
    """Result of a :class:`Fireworks` run, with the field names of pycma's result.

    Attributes:
        xbest: Best evaluated solution so far (None before the first ``tell``).
        fbest: Its fitness (``inf`` before the first finite value).
        evals_best: Evaluation count at which ``xbest`` was evaluated.
        evaluations: Number of evaluations so far.
        iterations: Number of completed generations (``tell`` calls).
        xfavorite: Current core firework (the incumbent of the search).
        stds: Per-coordinate step size of the core firework, ``sigma * ones(N)``.
        stop: The termination dict of :meth:`Fireworks.stop`.
    """

    xbest: np.ndarray | None
    fbest: float
    evals_best: int
    evaluations: int
    iterations: int
    xfavorite: np.ndarray
    stds: np.ndarray
    stop: dict[str, Any]


def _as_bound(value: Any, n: int, name: str) -> np.ndarray:
    """Broadcast one side of ``bounds`` to a float array of length ``n``."""
    if value is None:
        return np.full(n, -math.inf if name == "lower" else math.inf)
    arr = np.asarray(value, dtype=float)
    if arr.ndim == 0:
        arr = np.full(n, float(arr))
    if arr.shape != (n,):
        raise ValueError(
            f"bounds: {name} bound must be a scalar or have length {n}, got {arr.shape}"
        )
    if np.isnan(arr).any():
        raise ValueError(f"bounds: {name} bound contains NaN")
    return arr


def _real(value: Any, name: str) -> float:
    """``float(value)`` that is not NaN, or a ValueError naming the option."""
    try:
        out = float(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a real number, got {value!r}") from err
    if math.isnan(out):
        raise ValueError(f"{name} must not be NaN")
    return out


class Fireworks:
    """EFWA/dynFWA Fireworks Algorithm with the ask/tell interface of pycma.

    Args:
        x0: Initial solution (1-d array-like of length N >= 1, finite, clipped into the
            bounds); it is the first firework and the first candidate evaluated after any
            injected solutions.
        sigma0: Initial step size (> 0), in the sense of CMA-ES: see the module docstring.
        inopts: Options dict; keys and defaults in :data:`DEFAULT_OPTIONS` and the module
            docstring. Unknown keys raise ValueError.

    Raises:
        ValueError: On a non-finite or empty ``x0``, ``sigma0 <= 0``, an unknown option, or an
            invalid option value (the message names the option).

    Example:
        >>> import numpy as np
        >>> es = Fireworks(np.zeros(3), 1.0, {"seed": 0, "popsize": 8, "bounds": [-2, 2]})
        >>> X = es.ask()
        >>> len(X), X[0].shape
        (8, (3,))
        >>> es.tell(X, [float(x @ x) for x in X])
        >>> es.countevals, es.countiter
        (8, 1)
    """

    def __init__(self, x0: Any, sigma0: float, inopts: dict[str, Any] | None = None):
        try:
            x0 = np.array(x0, dtype=float)
        except (TypeError, ValueError) as err:
            raise ValueError(f"x0 must be a 1-d array-like of numbers, got {x0!r}") from err
        if x0.ndim > 1:
            raise ValueError(f"x0 must be 1-d, got shape {x0.shape}")
        x0 = x0.reshape(-1)
        if x0.size == 0:
            raise ValueError("x0 must not be empty")
        if not np.isfinite(x0).all():
            raise ValueError("x0 must be finite")
        try:
            sigma0 = float(sigma0)
        except (TypeError, ValueError) as err:
            raise ValueError(f"sigma0 must be a positive number, got {sigma0!r}") from err
        if not (math.isfinite(sigma0) and sigma0 > 0):
            raise ValueError(f"sigma0 must be a positive finite number, got {sigma0!r}")
        inopts = dict(inopts or {})
        unknown = sorted(set(inopts) - set(DEFAULT_OPTIONS))
        if unknown:
            raise ValueError(f"inopts: unknown option(s) {unknown}")
        opts = {**DEFAULT_OPTIONS, **inopts}
        self.N = n = int(x0.size)
        self.sigma0 = sigma0

        seed = opts["seed"]
        if seed is None:
            seed = int(np.random.SeedSequence().entropy)
        elif isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative int or None, got {seed!r}")
        self.seed = int(seed)
        self._rng = np.random.Generator(np.random.PCG64(self.seed))

        popsize = opts["popsize"]
        if popsize is None:
            popsize = 4 + int(3 * math.log(n))
        if isinstance(popsize, bool) or not isinstance(popsize, (int, np.integer)):
            raise ValueError(f"popsize must be an int, got {popsize!r}")
        if popsize < 2:
            raise ValueError(f"popsize must be >= 2, got {popsize}")
        self.popsize = int(popsize)

        n_fw = opts["n_fireworks"]
        if n_fw is None:
            n_fw = 1 if self.popsize < 10 else 2
        if isinstance(n_fw, bool) or not isinstance(n_fw, (int, np.integer)) or n_fw < 1:
            raise ValueError(f"n_fireworks must be an int >= 1, got {n_fw!r}")
        n_gauss = opts["n_gaussian"]
        if n_gauss is None:
            n_gauss = 1 if n_fw > 1 else 0
        if isinstance(n_gauss, bool) or not isinstance(n_gauss, (int, np.integer)) or n_gauss < 0:
            raise ValueError(f"n_gaussian must be an int >= 0, got {n_gauss!r}")
        self.reevaluate = bool(opts["reevaluate"])
        if self.popsize < n_fw + 1:
            raise ValueError(
                f"popsize ({self.popsize}) must exceed n_fireworks ({n_fw}): generation 0 "
                "evaluates every firework and at least one spark"
            )
        if self.reevaluate and self.popsize < n_fw + n_gauss + 1:
            raise ValueError(
                f"popsize ({self.popsize}) must be >= n_fireworks + n_gaussian + 1 "
                f"({n_fw + n_gauss + 1}) when reevaluate=True"
            )
        self.n_fireworks = int(n_fw)
        self.n_gaussian = int(n_gauss)

        bounds = opts["bounds"]
        if bounds is None:
            bounds = [None, None]
        if not isinstance(bounds, (list, tuple)) or len(bounds) != 2:
            raise ValueError(f"bounds must be None or [lower, upper], got {bounds!r}")
        self._lb = _as_bound(bounds[0], n, "lower")
        self._ub = _as_bound(bounds[1], n, "upper")
        if not (self._lb < self._ub).all():
            raise ValueError("bounds: lower must be < upper in every coordinate")
        both = np.isfinite(self._lb) & np.isfinite(self._ub)
        if (both != (np.isfinite(self._lb) | np.isfinite(self._ub))).any():
            raise ValueError("bounds: each coordinate must be bounded on both sides or neither")
        self._bounded = bool(both.any())
        # finite stand-ins so that unbounded coordinates never produce inf - inf
        self._lb_fin = np.where(both, self._lb, 0.0)
        self._width = np.where(both, self._ub - self._lb, 0.0)

        for key in ("spark_min_frac", "spark_max_frac"):
            opts[key] = _real(opts[key], key)
            if not 0.0 <= opts[key] <= 1.0:
                raise ValueError(f"{key} must be in [0, 1], got {opts[key]!r}")
        if opts["spark_min_frac"] > opts["spark_max_frac"]:
            raise ValueError("spark_min_frac must be <= spark_max_frac")
        positive = ("amp_hat", "amp_init", "amp_final", "amp_increase", "amp_decrease")
        for key in (*positive, "maxfevals", "maxiter", "tolx", "tolfun", "tolfacupx"):
            opts[key] = _real(opts[key], key)
            if not opts[key] > 0:
                raise ValueError(f"{key} must be > 0, got {opts[key]!r}")
        if opts["amp_final"] > opts["amp_init"]:
            raise ValueError("amp_final must be <= amp_init")
        opts["ftarget"] = _real(opts["ftarget"], "ftarget")
        self.opts = opts

        self._amp_hat = _SQRT3 * sigma0 * float(opts["amp_hat"])
        self._amp_core = self._amp_hat
        x0 = self._clip(x0)
        extra = x0 + sigma0 * self._rng.standard_normal((self.n_fireworks - 1, n))
        self._fw = np.vstack([x0[None, :], self._map_into_bounds(extra)])
        self._fw_f: np.ndarray | None = None
        self._injected: list[np.ndarray] = []
        self._pending: dict[str, Any] | None = None
        self._last_f = np.array([])
        self._hist: deque[float] = deque(maxlen=10 + math.ceil(30 * n / self.popsize))

        self.countevals = 0
        self.countiter = 0
        self._xbest: np.ndarray | None = None
        self._fbest = math.inf
        self._evals_best = 0

    @property
    def sigma(self) -> float:
        """Current step size: core-firework amplitude / sqrt(3); equals ``sigma0`` at start."""
        return self._amp_core / _SQRT3

    @property
    def result(self) -> FireworksResult:
        """Current :class:`FireworksResult` (pycma field names)."""
        xbest = None if self._xbest is None else self._xbest.copy()
        return FireworksResult(
            xbest=xbest,
            fbest=self._fbest,
            evals_best=self._evals_best,
            evaluations=self.countevals,
            iterations=self.countiter,
            xfavorite=self._fw[0].copy(),
            stds=np.full(self.N, self.sigma),
            stop=self.stop(),
        )

    def _clip(self, x: np.ndarray) -> np.ndarray:
        return np.clip(x, self._lb, self._ub) if self._bounded else x

    def _map_into_bounds(self, pts: np.ndarray) -> np.ndarray:
        """EFWA mapping: out-of-bounds coordinates are re-drawn uniformly within bounds."""
        if not self._bounded or pts.size == 0:
            return pts
        out = (pts < self._lb) | (pts > self._ub)
        if out.any():
            u = self._rng.random(pts.shape)
            pts = np.where(out, self._lb_fin + u * self._width, pts)
        return pts

    def _coordinate_mask(self, k: int) -> np.ndarray:
        """Bernoulli(1/2) coordinate masks with at least one coordinate per row."""
        mask = self._rng.random((k, self.N)) < 0.5
        empty = ~mask.any(axis=1)
        if empty.any():
            mask[np.flatnonzero(empty), self._rng.integers(0, self.N, int(empty.sum()))] = True
        return mask

    def _amp_min(self) -> float:
        """EFWA minimal amplitude ``A_min(t)`` with ``t`` the evaluations so far."""
        a_init = self._amp_hat * float(self.opts["amp_init"])
        a_final = self._amp_hat * float(self.opts["amp_final"])
        e_max = float(self.opts["maxfevals"])
        if not math.isfinite(e_max):
            return a_init
        t = min(float(self.countevals), e_max)
        return a_init - (a_init - a_final) / e_max * math.sqrt((2 * e_max - t) * t)

    @staticmethod
    def _finite_surrogate(f: np.ndarray) -> np.ndarray:
        """Replace non-finite values by a finite value worse than every finite one."""
        finite = np.isfinite(f)
        if finite.all():
            return f
        if not finite.any():
            return np.zeros_like(f)
        lo, hi = f[finite].min(), f[finite].max()
        return np.where(finite, f, hi + (hi - lo) + 1.0)

    def _spark_counts(self, f: np.ndarray, budget: int) -> np.ndarray:
        """FWA spark counts clamped to ``[round(a m), round(b m)]`` and summing to ``budget``."""
        n = f.size
        if n == 1 or budget == 0:
            return np.full(n, budget) if n == 1 else np.zeros(n, dtype=int)
        g = self._finite_surrogate(f)
        y_max = g.max()
        share = budget * (y_max - g + _EPS) / ((y_max - g).sum() + _EPS)
        lo = round(float(self.opts["spark_min_frac"]) * budget)
        hi = round(float(self.opts["spark_max_frac"]) * budget)
        share = np.clip(np.rint(share), lo, hi)
        if share.sum() <= 0:
            share = np.ones(n)
        quota = share * budget / share.sum()
        counts = np.floor(quota).astype(int)
        rest = budget - int(counts.sum())
        if rest > 0:
            order = np.argsort(-(quota - counts), kind="stable")
            counts[order[:rest]] += 1
        return counts

    def _amplitudes(self, f: np.ndarray) -> np.ndarray:
        """EFWA amplitudes with the ``A_min(t)`` floor; dynFWA amplitude for the core (index 0)."""
        g = self._finite_surrogate(f)
        y_min = g.min()
        amps = self._amp_hat * (g - y_min + _EPS) / ((g - y_min).sum() + _EPS)
        amps = np.maximum(amps, self._amp_min())
        amps[0] = self._amp_core
        return amps

    def inject(self, solutions: Iterable[Any], force: bool | None = None) -> None:
        """Queue solutions to be evaluated as the first candidates of the next ``ask``.

        As in pycma, injected solutions replace the first candidates of the next generation; they
        take slots from the explosion sparks (fireworks are still re-evaluated), and solutions
        beyond ``popsize - (fireworks asked)`` wait for the following generation. They enter
        selection like any candidate, so a better injected incumbent becomes the core firework.
        Coordinates outside the bounds are clipped.

        Args:
            solutions: Array-likes of length N (None entries are skipped); nothing is queued
                if one of them is invalid.
            force: Accepted for pycma compatibility and ignored: solutions are always used as
                given (pycma's ``force=True``).

        Raises:
            ValueError: If a solution has the wrong length or is not finite.

        Example:
            >>> import numpy as np
            >>> es = Fireworks(np.zeros(4), 1.0, {"seed": 0})
            >>> es.inject([np.ones(4)])
            >>> bool((es.ask()[0] == 1.0).all())
            True
        """
        del force
        queued = []
        for sol in solutions:
            if sol is None:
                continue
            try:
                x = np.array(sol, dtype=float).reshape(-1)
            except (TypeError, ValueError) as err:
                raise ValueError(f"solutions: not a numeric array-like: {sol!r}") from err
            if x.size != self.N:
                raise ValueError(
                    f"solutions: each solution must have length {self.N}, got {x.size}"
                )
            if not np.isfinite(x).all():
                raise ValueError("solutions: injected solutions must be finite")
            queued.append(self._clip(x))
        self._injected.extend(queued)

    def ask(self) -> list[np.ndarray]:
        """Sample the next generation.

        Returns:
            A list of ``popsize`` float arrays of shape ``(N,)``, all within the bounds: injected
            solutions, then (re-evaluated) fireworks, explosion sparks and Gaussian sparks.

        Raises:
            RuntimeError: If the previous generation has not been told yet.

        Example:
            >>> import numpy as np
            >>> es = Fireworks(np.zeros(4), 1.0, {"seed": 0, "popsize": 6})
            >>> len(es.ask())
            6
        """
        if self._pending is not None:
            raise RuntimeError("ask() called twice without tell() in between")
        first = self._fw_f is None
        ask_fw = first or self.reevaluate
        n_fw_asked = self.n_fireworks if ask_fw else 0
        n_inj = min(len(self._injected), self.popsize - n_fw_asked)
        injected = np.array(self._injected[:n_inj]).reshape(n_inj, self.N)
        del self._injected[:n_inj]

        rest = self.popsize - n_fw_asked - n_inj
        use_gauss = not first and self.n_fireworks > 1
        n_gauss = min(self.n_gaussian, max(0, rest - 1)) if use_gauss else 0
        n_expl = rest - n_gauss

        if first:
            counts = np.full(self.n_fireworks, n_expl // self.n_fireworks)
            counts[: n_expl % self.n_fireworks] += 1
            amps = np.full(self.n_fireworks, self._amp_core)
        else:
            counts = self._spark_counts(self._fw_f, n_expl)
            amps = self._amplitudes(self._fw_f)
        parents = np.repeat(self._fw, counts, axis=0)
        offsets = self._rng.uniform(-1.0, 1.0, (n_expl, self.N))
        offsets *= np.repeat(amps, counts)[:, None]
        sparks = parents + self._coordinate_mask(n_expl) * offsets

        if n_gauss:
            idx = self._rng.integers(1, self.n_fireworks, n_gauss)
            base = self._fw[idx]
            e = self._rng.standard_normal(n_gauss)[:, None]
            gauss = base + self._coordinate_mask(n_gauss) * (self._fw[0] - base) * e
        else:
            gauss = np.empty((0, self.N))
        new = self._map_into_bounds(np.vstack([sparks, gauss]))

        fw_rows = self._fw if ask_fw else np.empty((0, self.N))
        X = np.vstack([injected, fw_rows, new])
        self._pending = {"n_inj": n_inj, "n_fw": n_fw_asked, "n_sparks": n_expl + n_gauss}
        return [x.copy() for x in X]

    def tell(self, solutions: Sequence[Any], function_values: Sequence[Any]) -> None:
        """Pass the fitness of the asked generation, select fireworks and adapt amplitudes.

        Args:
            solutions: The list returned by ``ask()`` or a compatible sequence (same length,
                each of length N, finite); the given points are used, so a caller may repair
                them.
            function_values: One fitness per solution (to be minimised); NaN and +-inf are
                treated as the worst value.

        Raises:
            RuntimeError: If ``ask()`` was not called before.
            ValueError: If the lengths do not match the asked generation or ``solutions`` is
                malformed.

        Example:
            >>> import numpy as np
            >>> es = Fireworks(np.zeros(2), 1.0, {"seed": 0, "popsize": 4})
            >>> X = es.ask()
            >>> es.tell(X, [float("nan")] + [float(x @ x) for x in X[1:]])
            >>> es.result.evaluations
            4
        """
        if self._pending is None:
            raise RuntimeError("tell() called without a preceding ask()")
        lam = self._pending["n_inj"] + self._pending["n_fw"] + self._pending["n_sparks"]
        if len(solutions) != lam:
            raise ValueError(f"solutions: expected {lam} solutions, got {len(solutions)}")
        if len(function_values) != lam:
            raise ValueError(f"function_values: expected {lam} values, got {len(function_values)}")
        try:
            X = np.array([np.asarray(x, dtype=float).reshape(-1) for x in solutions])
        except ValueError as err:
            raise ValueError(f"solutions: each solution must have length {self.N}") from err
        if X.shape != (lam, self.N):
            raise ValueError(f"solutions: each solution must have length {self.N}")
        if not np.isfinite(X).all():
            raise ValueError("solutions: must be finite")
        try:
            F = np.array([float(v) for v in function_values])
        except (TypeError, ValueError) as err:
            raise ValueError("function_values: must be real numbers") from err
        F = np.where(np.isfinite(F), F, math.inf)
        pending, self._pending = self._pending, None

        self.countevals += lam
        self.countiter += 1
        i_best = int(np.argmin(F))
        if F[i_best] < self._fbest:
            self._fbest = float(F[i_best])
            self._xbest = X[i_best].copy()
            self._evals_best = self.countevals - lam + i_best + 1
        self._last_f = F
        if math.isfinite(F[i_best]):
            self._hist.append(float(F[i_best]))

        n_inj, n_fw = pending["n_inj"], pending["n_fw"]
        spark_f = F[n_inj + n_fw :]
        if n_fw and self._fw_f is not None:
            # a failed re-evaluation must not throw away a firework that was finite before
            F = F.copy()
            fresh = F[n_inj : n_inj + n_fw]
            F[n_inj : n_inj + n_fw] = np.where(np.isfinite(fresh), fresh, self._fw_f)
        fw_f = F[n_inj : n_inj + n_fw] if n_fw else self._fw_f
        # a non-finite firework value carries no information on the step size
        if spark_f.size and math.isfinite(fw_f.min()):
            improved = spark_f.min() < fw_f.min()
            factor = self.opts["amp_increase"] if improved else self.opts["amp_decrease"]
            self._amp_core *= float(factor)

        if n_fw:
            pool_x, pool_f = X, F
        else:
            pool_x, pool_f = np.vstack([self._fw, X]), np.concatenate([self._fw_f, F])
        elite = int(np.argmin(pool_f))
        others = np.delete(np.arange(pool_f.size), elite)
        k = min(self.n_fireworks - 1, others.size)
        chosen = self._rng.choice(others, size=k, replace=False) if k else others[:0]
        keep = np.concatenate([[elite], chosen]).astype(int)
        self._fw = pool_x[keep].copy()
        self._fw_f = pool_f[keep].copy()

    def get_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The search state between generations, as JSON values and float64 arrays (no pickle).

        Together with the constructor arguments (``x0``, ``sigma0``, the options, ``seed``
        included) it is everything that :meth:`ask` and :meth:`tell` read: the fireworks and
        their values, the core amplitude, pending injections, counters, best solution, the
        ``tolfun`` history and the random generator's state. A restored instance continues
        exactly as the saved one would have.

        Returns:
            ``(scalars, arrays)``: a JSON-able dict and a dict of numpy arrays.

        Raises:
            RuntimeError: between :meth:`ask` and :meth:`tell`.

        Example:
            >>> scalars, arrays = es.get_state()
            >>> twin = Fireworks(x0, sigma0, opts); twin.set_state(scalars, arrays)
        """
        if self._pending is not None:
            raise RuntimeError("get_state between ask() and tell(): tell first")
        scalars = {
            "rng": self._rng.bit_generator.state,
            "amp_core": self._amp_core,
            "countevals": self.countevals,
            "countiter": self.countiter,
            "fbest": None if math.isinf(self._fbest) else self._fbest,
            "evals_best": self._evals_best,
            "hist": list(self._hist),
            "n_injected": len(self._injected),
        }
        arrays = {"fw": self._fw, "last_f": self._last_f}
        if self._fw_f is not None:
            arrays["fw_f"] = self._fw_f
        if self._xbest is not None:
            arrays["xbest"] = self._xbest
        if self._injected:
            arrays["injected"] = np.stack(self._injected)
        return scalars, {k: np.array(v, dtype=np.float64) for k, v in arrays.items()}

    def set_state(self, scalars: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        """Restore what :meth:`get_state` returned (on an instance built with the same arguments).

        Args:
            scalars, arrays: as returned by :meth:`get_state` (after a JSON/safetensors round
                trip: non-finite fitness values are stored as ``inf`` in the arrays).

        Raises:
            ValueError: if the arrays do not fit this instance's dimension.

        Example:
            >>> twin.set_state(*es.get_state())
        """
        fw = np.array(arrays["fw"], dtype=float)
        if fw.ndim != 2 or fw.shape[1] != self.N:
            raise ValueError(f"fireworks state of shape {fw.shape} does not fit N = {self.N}")
        self._rng.bit_generator.state = scalars["rng"]
        self._amp_core = float(scalars["amp_core"])
        self.countevals = int(scalars["countevals"])
        self.countiter = int(scalars["countiter"])
        fbest = scalars["fbest"]
        self._fbest = math.inf if fbest is None else float(fbest)
        self._evals_best = int(scalars["evals_best"])
        self._hist.clear()
        self._hist.extend(float(v) for v in scalars["hist"])
        self._fw = fw
        self._fw_f = np.array(arrays["fw_f"], dtype=float) if "fw_f" in arrays else None
        self._last_f = np.array(arrays["last_f"], dtype=float)
        self._xbest = np.array(arrays["xbest"], dtype=float) if "xbest" in arrays else None
        n_inj = int(scalars["n_injected"])
        self._injected = [np.array(x, dtype=float) for x in arrays["injected"]] if n_inj else []
        self._pending = None

    def stop(self) -> dict[str, Any]:
        """Termination criteria that are met, as ``{name: threshold}``; empty if none, as pycma.

        Returns:
            Dict with any of ``maxfevals``, ``maxiter``, ``ftarget``, ``tolx``, ``tolfacupx``,
            ``tolfun``.

        Example:
            >>> import numpy as np
            >>> Fireworks(np.zeros(2), 1.0, {"seed": 0}).stop()
            {}
        """
        o = self.opts
        out: dict[str, Any] = {}
        if self.countevals >= o["maxfevals"]:
            out["maxfevals"] = o["maxfevals"]
        if self.countiter >= o["maxiter"]:
            out["maxiter"] = o["maxiter"]
        if self._fbest <= o["ftarget"]:
            out["ftarget"] = o["ftarget"]
        if self.sigma < o["tolx"]:
            out["tolx"] = o["tolx"]
        if self.sigma > o["tolfacupx"] * self.sigma0:
            out["tolfacupx"] = o["tolfacupx"]
        if self.countiter and self._hist:
            cur = self._last_f[np.isfinite(self._last_f)]
            if (
                cur.size
                and cur.max() - cur.min() < o["tolfun"]
                and max(self._hist) - min(self._hist) < o["tolfun"]
            ):
                out["tolfun"] = o["tolfun"]
        return out
