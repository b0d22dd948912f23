"""DFO-LoRA's options: one documented field each, checked when the config is made.

Example:
    >>> DFOLoRAConfig(rank=2, intrinsic_dim=40, popsize=6).targets
    ('query', 'key')
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from zofast.dfo.arch import TARGET_NAMES
from zofast.dfo.fireworks import DEFAULT_OPTIONS as FWA_DEFAULT_OPTIONS
from zofast.dfo.population import MODES
from zofast.optim.checks import positive
from zofast.rng import as_seed

__all__ = ["DFOLoRAConfig", "OPTIMIZERS", "INITS", "DEFAULT_ALPHA", "SEARCH_KEYS", "RUNTIME_KEYS"]

OPTIMIZERS = ("cma", "fwa")
"""Optimizer names, in the order that fixes their index ``o`` in the seed derivation."""

INITS = ("hidden", "random")
"""Projection initialisations (:mod:`zofast.dfo.lora`)."""

DEFAULT_ALPHA = 0.05
"""``alpha`` of the projection scale: factor entries start with std ``alpha·σ_l``.

Chosen on dev accuracy with MiniLM-L6 (SST-2, RTE, TREC; data seeds 13 and 21; DFO-LoRA
alternating, budget 8000) among 2, 1, 0.5, 0.25, 0.1, 0.05: mean best-dev accuracy 65.3, 66.5,
67.4, 71.9, 71.2, 71.9 %; 0.05 ties 0.25 and reaches lower training losses (e.g. TREC 0.16 vs
0.27). Larger values make the first candidates' ``(x·A)·B`` dominate ``x·W`` and the search
mostly undoes that damage."""

SEARCH_KEYS = (
    "rank",
    "intrinsic_dim",
    "targets",
    "popsize",
    "sigma",
    "optimizers",
    "init",
    "seed",
    "alpha",
    "cma_diagonal",
    "cma_options",
    "fwa_options",
)
"""The options that define a search (a checkpoint's ``config``; fixed when it is resumed)."""

RUNTIME_KEYS = ("mode", "max_candidates", "cache_projections", "length_buckets")
"""The options that only change how fast it runs (``DFOLoRA.load`` may override them)."""


def check_int(value: Any, name: str, minimum: int) -> int:
    """``value`` as an int, or a ValueError naming ``name`` (bools are refused).

    Example:
        >>> check_int(3, "rank", 1)
        3
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


@dataclass
class DFOLoRAConfig:
    """Every option of :class:`~zofast.dfo.lora.DFOLoRA`, normalised and checked on creation.

    The first twelve fields define the search (:data:`SEARCH_KEYS`, saved in checkpoints); the
    last four only how it is run (:data:`RUNTIME_KEYS`).

    Raises:
        ValueError: on an invalid option, naming it.

    Example:
        >>> DFOLoRAConfig(optimizers="cma").optimizers
        ('cma',)
    """

    rank: int = 4
    """``r`` of every ``A`` (``D_in × r``) and ``B`` (``r × D_out``): the authors' rank."""
    intrinsic_dim: int = 500
    """``d``, numbers searched per layer (at least ``2·len(targets)``): the authors' 500."""
    targets: Sequence[str] = ("query", "key")
    """Projections that get updates, a subset of ``("query", "key", "value")`` (stored in that
    order): the paper's query and key."""
    popsize: int = 20
    """Candidates per generation (>= 2): the authors' 20."""
    sigma: float = 1.0
    """Initial step size of the optimizers; the projection scale divides by it, so the first
    generation's factors do not depend on it."""
    optimizers: Sequence[str] = ("cma", "fwa")
    """``("cma", "fwa")`` alternates by round (the paper's method); ``("cma",)`` or ``("fwa",)``
    runs one alone."""
    init: str = "hidden"
    """``"hidden"`` (BBTv2-style scales from the hidden states) or ``"random"`` (the paper's
    ablation, every layer scale 1)."""
    seed: int = 0
    """Run seed (uint64) of projections and optimizers."""
    alpha: float = DEFAULT_ALPHA
    """``alpha`` of the projection scale (:data:`DEFAULT_ALPHA` says how it was chosen)."""
    cma_diagonal: bool = True
    """pycma's ``CMA_diagonal``: separable CMA-ES, 150× faster at d = 500 and all a layer's few
    generations can learn."""
    cma_options: Mapping[str, Any] | None = None
    """More pycma options (override the defaults; JSON values, so that checkpoints record
    them)."""
    fwa_options: Mapping[str, Any] | None = None
    """More :class:`~zofast.dfo.fireworks.Fireworks` options (not ``seed`` or ``popsize``)."""
    mode: str = "auto"
    """Evaluation mode of :class:`~zofast.dfo.population.PopulationEvaluator`: auto picks the
    fastest exact one."""
    max_candidates: int | None = None
    """Candidates per batched forward (None: the whole generation, the fastest when it fits)."""
    cache_projections: bool | None = None
    """Keep every layer's projections (True), only the searched layer's (False), or decide by
    :data:`~zofast.dfo.lora.layer.PROJECTION_CACHE_BYTES` (None)."""
    length_buckets: int = 1
    """Split the training set into this many batches of similar length (less padding; helps
    on CPU, one batch is best on a GPU)."""

    def __post_init__(self) -> None:
        self.rank = check_int(self.rank, "rank", 1)
        self.intrinsic_dim = check_int(self.intrinsic_dim, "intrinsic_dim", 1)
        self.popsize = check_int(self.popsize, "popsize", 2)
        targets = self.targets
        if isinstance(targets, str):
            targets = (targets,)
        targets = tuple(targets)
        if not targets or len(set(targets)) != len(targets):
            raise ValueError(f"targets must be distinct names from {TARGET_NAMES}, got {targets}")
        unknown = [t for t in targets if t not in TARGET_NAMES]
        if unknown:
            raise ValueError(f"unknown target(s) {unknown}; choose from {TARGET_NAMES}")
        self.targets = tuple(t for t in TARGET_NAMES if t in targets)
        n_chunks = 2 * len(self.targets)
        if self.intrinsic_dim < n_chunks:
            raise ValueError(
                f"intrinsic_dim ({self.intrinsic_dim}) must be >= {n_chunks}: one number at "
                f"least for each of the {n_chunks} factors (A and B of {', '.join(self.targets)})"
            )
        self.sigma = positive(self.sigma, "sigma")
        optimizers = self.optimizers
        if isinstance(optimizers, str):
            optimizers = (optimizers,)
        optimizers = tuple(optimizers)
        if not optimizers or any(o not in OPTIMIZERS for o in optimizers):
            raise ValueError(
                f"optimizers must be a non-empty sequence of {OPTIMIZERS}, got {optimizers!r}"
            )
        self.optimizers = optimizers
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        try:
            self.seed = as_seed(self.seed)
        except (TypeError, ValueError) as err:
            raise ValueError(f"seed must be an int in 0..2**64-1, got {self.seed!r}") from err
        self.alpha = positive(self.alpha, "alpha")
        self.cma_diagonal = bool(self.cma_diagonal)
        self.cma_options = dict(self.cma_options or {})
        self.fwa_options = dict(self.fwa_options or {})
        bad = sorted(set(self.fwa_options) - (set(FWA_DEFAULT_OPTIONS) - {"seed", "popsize"}))
        if bad:
            raise ValueError(f"fwa_options: unknown or reserved option(s) {bad}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.max_candidates is not None:
            self.max_candidates = check_int(self.max_candidates, "max_candidates", 1)
        self.length_buckets = check_int(self.length_buckets, "length_buckets", 1)

    @property
    def num_chunks(self) -> int:
        """Chunks of a layer's search vector: ``A`` and ``B`` of every target."""
        return 2 * len(self.targets)
