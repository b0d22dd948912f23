"""DFO-LoRA: derivative-free search of low-rank query/key updates (arXiv 2403.01754).

Modules
-------
Every attention layer ``l`` gets, for each target projection ``t`` (default query and key),
``y_t = x·W_t + (x·A_t)·B_t`` with ``A_t`` of shape ``(D_in, r)`` and ``B_t`` of shape
``(r, D_out)`` (:mod:`zofast.dfo.arch` applies them with forward hooks; GPT-2's fused ``c_attn``
gets the update in its Q and K column slices only). Constructing :class:`DFOLoRA` attaches them
with every search vector at zero: the hooks are inactive and the model's outputs are bit for bit
the original ones.

Search space and projections
----------------------------
Layer ``l`` has a search vector ``z_l`` of ``d = intrinsic_dim`` numbers, split into
``2·len(targets)`` chunks in the order ``A_Q, B_Q, A_K, B_K (, A_V, B_V)`` (sizes as
``numpy.array_split``: ``d = 500`` with query and key gives 4 × 125, as the authors' code). Chunk
``c`` of length ``d_c`` maps to its factor by a fixed random matrix ``M_{l,c}`` of shape
``(n_c, d_c)``, ``n_c = D_in·r`` for an ``A`` (row-major ``(D_in, r)``) and ``r·D_out`` for a
``B``::

    factor = s_{l,c} · M_{l,c} · z_{l,c},   M_{l,c}[i, j] = normal(seed_{l,c}, i·d_c + j)

with ``normal`` the :mod:`zofast.rng` stream, ``seed_{l,c} = RunSeeds(seed).seed(l, c,
"search")`` (:func:`zofast.perturb.gaussian_noise`), and the scale (BBTv2's formula,
``std = α·σ̂/(√d·σ)``, with the chunk length as ``d``)::

    s_{l,c} = alpha · σ_l / (sqrt(d_c) · sigma)

so that at the first generation (``z ~ sigma·N(0, I)``) the entries of every factor have
standard deviation about ``alpha · σ_l``. ``σ_l`` depends on ``init``:

* ``"hidden"`` (default, BBTv2 style): ``σ_0`` is the clipped std (:func:`clipped_std`: three
  times clip to ``μ ± 3σ``, then the std) of the word-embedding matrix, and ``σ_l`` for
  ``l ≥ 1`` the clipped std of the hidden states entering layer ``l`` on the real tokens of the
  training batch at the start of the first :meth:`DFOLoRA.fit` (search vectors at zero then).
* ``"random"`` (the paper's ablation): ``σ_l = 1`` for every layer, no data.

Memory trade of the projections: ``M`` is never stored in checkpoints (only the seeds and the
``σ_l``) and is regenerated on the model's device when needed. In memory, all projections are
kept when they fit in ``PROJECTION_CACHE_BYTES`` (``cache_projections=None``): RoBERTa-large
with d = 500, r = 4 needs 24 × 4 × 4096 × 125 × 4 B = 196 MB. Above that (GPT-2-large: 368 MB,
7B models: several GB) only the layer being searched is kept and a layer's matrices are
regenerated at each visit: one generation per layer per round, so one regeneration (about
``D·r·d`` normals when ``D_in = D_out = D``) per generation. That costs ~27 ms per 0.5 M
normals on 2 CPU cores and is included in the benchmark's GPT-2-large figures on the H200
(``bench/test_dfo_population.py``). The incumbents' factors ``A`` and ``B`` (a ``d_c``-th of
the projections' size) are always kept.

Search
------
Every ``z_l`` starts at 0. A round visits layers ``0 .. L-1`` in order, one generation of
``popsize`` candidates per layer per round; the candidates of layer ``l`` are evaluated with all
other layers at their incumbents, in one population-batched forward
(:class:`~zofast.dfo.population.PopulationEvaluator`). The loss is the mean cross-entropy of the
label logits (:class:`~zofast.scoring.Scorer`) over the whole training set, which is
deterministic, so the model's current loss ``f`` is known exactly: a layer's incumbent is
replaced by the best candidate of its generation only if that candidate's loss is below ``f``,
and ``f`` never increases. The loss of the starting point (all zeros) is evaluated once, at the
start of the first fit.

Alternation of CMA-ES and FWA (``optimizers=("cma", "fwa")``): every layer owns one optimizer
of each kind, all of dimension ``d``; round ``k`` uses ``optimizers[k % len(optimizers)]`` for
every layer, so with the default CMA-ES runs rounds 0, 2, 4, ... and FWA rounds 1, 3, 5, ....
An optimizer is created the first time it is used, at the layer's incumbent then, with step
size ``sigma``. Hand-over: whenever a layer's incumbent was found by another optimizer (or set
otherwise) since an optimizer last saw it, the incumbent is injected into that optimizer before
its next ``ask`` (pycma ``inject(..., force=True)``; :meth:`Fireworks.inject`), so the first
candidate of its generation is the incumbent. ``("cma",)`` and ``("fwa",)`` run one kind only.
An optimizer that meets one of its termination criteria is dropped and re-created at the
incumbent with step size ``sigma`` the next time it is used. (pycma warns "elements of z2[k] are
larger than 55" when an injected solution lies more than 7 standard deviations from its mean in
some coordinate, as a hand-over from FWA can, and trims that update itself; the warning is
silenced.)

CMA-ES is pycma's ``CMAEvolutionStrategy`` with ``popsize`` candidates, ``CMA_diagonal`` as
``cma_diagonal`` (default True: separable CMA-ES; ask+tell at d = 500, popsize 20 measured at
1 ms diagonal vs 150 ms full covariance on 2 CPU cores, and each layer gets only
``budget / (popsize·L)`` generations, too few to learn a full covariance). pycma's ``seed``
option re-seeds numpy's global generator; instead each CMA-ES gets its own
``numpy.random.Generator(PCG64(s))`` through pycma's ``randn`` option and ``seed=nan`` (pycma then
leaves the global generator alone). Seeds: ``s = RunSeeds(seed).seed(l, 8 + o + 2·k, "search")``
for optimizer ``o`` (0 = cma, 1 = fwa) of layer ``l`` in its ``k``-th incarnation (FWA gets
its seed the same way; a seed of 0 is replaced by 1, so no optimizer is ever seeded with 0, the
value pycma reads as "seed from the clock"). Chunk indices are below 8, so projection and
optimizer seeds never coincide.

Budget and selection
--------------------
The budget counts forward passes over the training set, the papers' "API calls": one candidate
evaluated on the training set is one call (the starting point counts as one). Generations run
while a whole one fits in the budget. Dev accuracy (and loss) is measured every ``eval_every``
calls, at the start and at the end; the snapshot with the best dev accuracy (ties: lower dev
loss, then earlier) is applied to the model when :meth:`DFOLoRA.fit` returns, and is what
:meth:`DFOLoRA.export_peft` writes. Dev evaluations are not counted as calls.

Checkpoints and resume
----------------------
:meth:`DFOLoRA.save` writes ``dfo_lora.json`` (configuration, architecture, ``σ_l``, round and
layer position, calls, current loss, step sizes, restart counters, hand-over flags, dev history,
and the optimizers' scalar state) and ``dfo_lora.safetensors`` (the incumbents, the best-dev
snapshot, the applied vectors and the optimizers' array state, float64): no pickle. Every live
optimizer is saved with its constructor arguments (seed, ``x0``, step size) and its state between
generations: for CMA-ES the numeric attributes of pycma's strategy and its helper objects
(mean, step size, evolution paths, covariance or diagonal scaling, counters, best solution,
stopping histories; :mod:`zofast.dfo.state`) and its random generator's state; for FWA
:meth:`Fireworks.get_state`. :meth:`DFOLoRA.load` rebuilds each optimizer with the same
arguments and writes its state back, so :meth:`DFOLoRA.fit` after a load continues the search
exactly as an uninterrupted run would (tested: same incumbents and losses). A checkpoint written
before optimizer states were saved (no ``optimizers`` entry) still loads: its optimizers are
re-created lazily at the incumbents with the saved step sizes and the restart counter in their
seeds incremented (reproducible, not identical to an uninterrupted run).

Example:
    >>> from zofast.models import load_model, default_model_path
    >>> from zofast.data import load_kshot
    >>> data = load_kshot("../shared/data/k-shot/SST-2/16-42", "sst-2")
    >>> dfo = DFOLoRA(load_model(default_model_path()), seed=1)
    >>> result = dfo.fit(data["train"], data["dev"], budget=2000, task="sst-2")
    >>> dfo.export_peft("runs/sst2-adapter")
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from zofast.data import Example
from zofast.dfo.arch import TARGET_NAMES, Architecture, LowRankHooks, find_architecture
from zofast.dfo.fireworks import DEFAULT_OPTIONS as FWA_DEFAULT_OPTIONS
from zofast.dfo.fireworks import Fireworks
from zofast.dfo.population import MODES, PopulationEvaluator, clipped_std
from zofast.dfo.state import cma_state, set_cma_state
from zofast.models import LoadedModel
from zofast.perturb import gaussian_noise
from zofast.rng import RunSeeds, as_seed
from zofast.scoring import Batch, Scorer
from zofast.tasks import Task

__all__ = ["DFOLoRA", "DFOResult", "OPTIMIZERS", "INITS", "DEFAULT_ALPHA"]

OPTIMIZERS = ("cma", "fwa")
"""Optimizer names, in the order that fixes their index ``o`` in the seed derivation."""

INITS = ("hidden", "random")
"""Projection initialisations (module docstring)."""

DEFAULT_ALPHA = 0.05
"""``alpha`` of the projection scale: factor entries start with std ``alpha·σ_l``.

Chosen on dev accuracy with MiniLM-L6 (SST-2, RTE, TREC; data seeds 13 and 21; DFO-LoRA
alternating, budget 8000) among 2, 1, 0.5, 0.25, 0.1, 0.05: mean best-dev accuracy 65.3, 66.5,
67.4, 71.9, 71.2, 71.9 %; 0.05 ties 0.25 and reaches lower training losses (e.g. TREC 0.16 vs
0.27). Larger values make the first candidates' ``(x·A)·B`` dominate ``x·W`` and the search
mostly undoes that damage."""

PROJECTION_CACHE_BYTES = 256 * 2**20
"""Keep every layer's projections in memory when they take at most this many bytes."""

OPTIMIZER_SEED_OFFSET = 8
"""First ``tensor`` index of optimizer seeds in ``RunSeeds.seed`` (chunk indices are below)."""

DEV_BATCH = 64
"""Examples per forward when measuring dev accuracy."""

FORMAT = "zofast.dfo_lora"
"""``format`` field of a checkpoint's JSON."""

VERSION = 1
"""``version`` field of a checkpoint's JSON."""

_SEARCH_KEYS = (
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
_RUNTIME_KEYS = ("mode", "max_candidates", "cache_projections", "length_buckets")


@dataclass
class DFOResult:
    """What :meth:`DFOLoRA.fit` reports.

    Attributes:
        calls: forward passes over the training set used so far (whole search).
        generations: generations so far.
        rounds: completed rounds (visits of every layer).
        train_loss: current training loss of the incumbents.
        best_dev_acc: dev accuracy of the applied snapshot (``None`` without dev examples).
        best_dev_loss: its dev loss.
        best_calls: calls at which that snapshot was taken.
        elapsed: seconds of search (whole search).
        mode: the evaluator's mode (``"replay"``, ``"full"`` or ``"sequential"``).
        history: the dev evaluations, dicts with ``calls``, ``dev_acc``, ``dev_loss``, ``loss``.
    """

    calls: int
    generations: int
    rounds: int
    train_loss: float
    best_dev_acc: float | None
    best_dev_loss: float | None
    best_calls: int | None
    elapsed: float
    mode: str
    history: list[dict] = field(default_factory=list)


def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _chunk_sizes(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


class DFOLoRA:
    """Derivative-free low-rank adaptation of the attention projections of a transformer.

    Args:
        model: a :class:`~zofast.models.LoadedModel` or a transformers model (then pass a
            ``scorer`` to :meth:`fit`). The hooks go on its modules; its weights never change.
        rank: ``r`` of every ``A`` (``D_in × r``) and ``B`` (``r × D_out``).
        intrinsic_dim: ``d``, numbers searched per layer (at least ``2·len(targets)``).
        targets: projections that get updates, a subset of ``("query", "key", "value")``.
        popsize: candidates per generation (>= 2).
        sigma: initial step size of the optimizers.
        optimizers: ``("cma", "fwa")`` alternates by round; ``("cma",)`` or ``("fwa",)`` alone.
        init: ``"hidden"`` or ``"random"`` projection scales (module docstring).
        seed: run seed (uint64) of projections and optimizers.
        alpha: ``alpha`` of the projection scale.
        cma_diagonal: pycma's ``CMA_diagonal`` (separable CMA-ES when True).
        cma_options: more pycma options (override the defaults set here; JSON values, so that
            :meth:`save` can record them).
        fwa_options: more :class:`~zofast.dfo.fireworks.Fireworks` options (not ``seed`` or
            ``popsize``).
        mode: evaluation mode of :class:`~zofast.dfo.population.PopulationEvaluator`.
        max_candidates: candidates per batched forward (None: the whole generation).
        cache_projections: keep every layer's projections (True), only the searched layer's
            (False), or decide by ``PROJECTION_CACHE_BYTES`` (None).
        length_buckets: split the training set into this many batches of similar length
            (less padding; helps on CPU, one batch is best on a GPU).

    Raises:
        ValueError: on an invalid argument or a model without recognised attention layers; the
            model is then left untouched (no hooks attached).

    Example:
        >>> dfo = DFOLoRA(load_model(default_model_path()), popsize=10, seed=3)
        >>> res = dfo.fit(train, dev, budget=1000, task="sst-2", progress=False)
        >>> res.train_loss <= res.history[0]["loss"]
        True
    """

    def __init__(
        self,
        model: LoadedModel | nn.Module,
        rank: int = 4,
        intrinsic_dim: int = 500,
        targets: Sequence[str] = ("query", "key"),
        popsize: int = 20,
        sigma: float = 1.0,
        optimizers: Sequence[str] = ("cma", "fwa"),
        init: str = "hidden",
        seed: int = 0,
        *,
        alpha: float = DEFAULT_ALPHA,
        cma_diagonal: bool = True,
        cma_options: Mapping[str, Any] | None = None,
        fwa_options: Mapping[str, Any] | None = None,
        mode: str = "auto",
        max_candidates: int | None = None,
        cache_projections: bool | None = None,
        length_buckets: int = 1,
    ):
        self.rank = _check_int(rank, "rank", 1)
        self.intrinsic_dim = _check_int(intrinsic_dim, "intrinsic_dim", 1)
        self.popsize = _check_int(popsize, "popsize", 2)
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
        try:
            self.sigma = float(sigma)
        except (TypeError, ValueError) as err:
            raise ValueError(f"sigma must be a positive number, got {sigma!r}") from err
        if not (math.isfinite(self.sigma) and self.sigma > 0):
            raise ValueError(f"sigma must be a positive finite number, got {sigma!r}")
        if isinstance(optimizers, str):
            optimizers = (optimizers,)
        optimizers = tuple(optimizers)
        if not optimizers or any(o not in OPTIMIZERS for o in optimizers):
            raise ValueError(
                f"optimizers must be a non-empty sequence of {OPTIMIZERS}, got {optimizers!r}"
            )
        self.optimizers = optimizers
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        self.init = init
        try:
            self.seed = as_seed(seed)
        except (TypeError, ValueError) as err:
            raise ValueError(f"seed must be an int in 0..2**64-1, got {seed!r}") from err
        try:
            self.alpha = float(alpha)
        except (TypeError, ValueError) as err:
            raise ValueError(f"alpha must be a positive number, got {alpha!r}") from err
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha must be a positive finite number, got {alpha!r}")
        self.cma_diagonal = bool(cma_diagonal)
        self.cma_options = dict(cma_options or {})
        self.fwa_options = dict(fwa_options or {})
        bad = sorted(set(self.fwa_options) - (set(FWA_DEFAULT_OPTIONS) - {"seed", "popsize"}))
        if bad:
            raise ValueError(f"fwa_options: unknown or reserved option(s) {bad}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        if max_candidates is not None:
            max_candidates = _check_int(max_candidates, "max_candidates", 1)
        self.max_candidates = max_candidates
        self.cache_projections = cache_projections
        self.length_buckets = _check_int(length_buckets, "length_buckets", 1)

        if isinstance(model, LoadedModel):
            self.loaded: LoadedModel | None = model
            self.model = model.model
        elif isinstance(model, nn.Module):
            self.loaded = None
            self.model = model
        else:
            raise ValueError(
                f"model must be a LoadedModel or a torch.nn.Module, got {type(model).__name__}"
            )
        self.arch: Architecture = find_architecture(self.model)
        param = next((p for p in self.model.parameters() if p.is_floating_point()), None)
        if param is None:
            raise ValueError("the model has no floating-point parameters")
        self.device = param.device
        self.dtype = param.dtype

        self.num_layers = self.arch.num_layers
        self.chunk_sizes = _chunk_sizes(self.intrinsic_dim, n_chunks)
        self._chunk_offsets = np.concatenate([[0], np.cumsum(self.chunk_sizes)]).tolist()
        self._seeds = RunSeeds(self.seed)
        self._proj: dict[tuple[int, int], torch.Tensor] = {}
        self._proj_bytes = 4 * sum(
            self._chunk_rows(layer, c) * self.chunk_sizes[c]
            for layer in range(self.num_layers)
            for c in range(n_chunks)
        )
        self.layer_stds: np.ndarray | None = np.ones(self.num_layers) if init == "random" else None

        shape = (self.num_layers, self.intrinsic_dim)
        self._z = np.zeros(shape)
        self._applied = np.zeros(shape)
        self._best: dict[str, Any] | None = None
        self._round = 0
        self._layer_pos = 0
        self._generation = 0
        self._calls = 0
        self._f_cur: float | None = None
        self._elapsed = 0.0
        n_opt = len(OPTIMIZERS)
        self._restarts = np.zeros((self.num_layers, n_opt), dtype=np.int64)
        self._sigmas = np.full((self.num_layers, n_opt), np.nan)
        self._synced = np.zeros((self.num_layers, n_opt), dtype=bool)
        self._es: dict[tuple[int, int], Any] = {}
        self._created: dict[tuple[int, int], tuple[int, float, np.ndarray]] = {}
        self._rngs: dict[tuple[int, int], np.random.Generator] = {}
        self.history: list[dict] = []
        self.evaluator: PopulationEvaluator | None = None

        self.hooks = LowRankHooks(self.model, self.arch, self.targets)

    # ------------------------------------------------------------------------- properties
    @property
    def z(self) -> np.ndarray:
        """The search vectors applied to the model now, ``(num_layers, intrinsic_dim)``."""
        return self._applied.copy()

    @property
    def incumbents(self) -> np.ndarray:
        """The search state: each layer's best vector so far, ``(num_layers, intrinsic_dim)``."""
        return self._z.copy()

    @property
    def calls(self) -> int:
        """Forward passes over the training set used so far."""
        return self._calls

    @property
    def train_loss(self) -> float | None:
        """Training loss of the incumbents (``None`` before the first fit)."""
        return self._f_cur

    # ------------------------------------------------------------------------ projections
    def _target_of_chunk(self, c: int):
        return self.targets[c // 2], c % 2

    def _chunk_rows(self, layer: int, c: int) -> int:
        name, factor = self._target_of_chunk(c)
        t = self.arch.targets[layer][name]
        return (t.in_features if factor == 0 else t.out_features) * self.rank

    def _keep_all_projections(self) -> bool:
        if self.cache_projections is None:
            return self._proj_bytes <= PROJECTION_CACHE_BYTES
        return bool(self.cache_projections)

    def projection(self, layer: int, chunk: int) -> torch.Tensor:
        """The unscaled random projection ``M_{layer,chunk}`` (float32, model's device).

        Regenerated from ``RunSeeds(seed).seed(layer, chunk, "search")`` unless cached (module
        docstring).

        Args:
            layer: layer index.
            chunk: chunk index (``A_Q, B_Q, A_K, B_K, ...``).

        Returns:
            ``(n_c, d_c)`` float32 tensor of standard normals.

        Example:
            >>> dfo.projection(0, 0).shape  # D = 384, r = 4, d = 500
            torch.Size([1536, 125])
        """
        key = (layer, chunk)
        cached = self._proj.get(key)
        if cached is not None:
            return cached
        if not self._keep_all_projections() and any(k[0] != layer for k in self._proj):
            self._proj = {}
        seed = self._seeds.seed(layer, chunk, "search")
        shape = (self._chunk_rows(layer, chunk), self.chunk_sizes[chunk])
        m = gaussian_noise(shape, seed, device=self.device)
        self._proj[key] = m
        return m

    def _scales(self, layer: int) -> list[float]:
        if self.layer_stds is None:
            raise RuntimeError(
                "init='hidden' projections are scaled from the training data: call fit() first "
                "(or use init='random')"
            )
        sd = float(self.layer_stds[layer])
        return [self.alpha * sd / (math.sqrt(n) * self.sigma) for n in self.chunk_sizes]

    def factors(
        self, layer: int, z: np.ndarray, dtype: torch.dtype | None = None
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``A`` and ``B`` of every target for a batch of search vectors of one layer.

        Args:
            layer: layer index.
            z: ``(P, intrinsic_dim)`` search vectors.
            dtype: dtype of the result (default: the model's).

        Returns:
            ``{name: (A, B)}`` with ``A`` ``(P, D_in, r)`` and ``B`` ``(P, r, D_out)`` on the
            model's device.

        Example:
            >>> A, B = dfo.factors(0, np.zeros((2, 500)))["query"]
            >>> A.shape, B.shape
            (torch.Size([2, 384, 4]), torch.Size([2, 4, 384]))
        """
        z = np.asarray(z, dtype=np.float64)
        if z.ndim != 2 or z.shape[1] != self.intrinsic_dim:
            raise ValueError(f"z must have shape (P, {self.intrinsic_dim}), got {z.shape}")
        scales = self._scales(layer)
        zt = torch.as_tensor(z, dtype=torch.float32, device=self.device)
        out: dict[str, list[torch.Tensor]] = {}
        p = zt.shape[0]
        for c in range(len(self.chunk_sizes)):
            name, factor = self._target_of_chunk(c)
            t = self.arch.targets[layer][name]
            lo, hi = self._chunk_offsets[c], self._chunk_offsets[c + 1]
            w = (zt[:, lo:hi] @ self.projection(layer, c).T) * scales[c]
            if factor == 0:
                w = w.view(p, t.in_features, self.rank)
            else:
                w = w.view(p, self.rank, t.out_features)
            out.setdefault(name, []).append(w.to(dtype or self.dtype))
        return {name: (ab[0], ab[1]) for name, ab in out.items()}

    def _apply_layer(self, layer: int, z: np.ndarray) -> None:
        z = np.asarray(z, dtype=np.float64)
        if not np.any(z):
            self.hooks.set_layer(layer, None)
        else:
            mats = self.factors(layer, z[None])
            self.hooks.set_layer(layer, {k: (a[0], b[0]) for k, (a, b) in mats.items()})
        self._applied[layer] = z

    def _apply_all(self, zs: np.ndarray) -> None:
        for layer in range(self.num_layers):
            if not np.array_equal(self._applied[layer], zs[layer]) or (
                np.any(zs[layer]) and self.hooks.get_layer(layer) is None
            ):
                self._apply_layer(layer, zs[layer])

    def set_z(self, z: np.ndarray) -> None:
        """Set every layer's search vector: applied to the model and taken as the incumbents.

        The current training loss is forgotten (it is measured again when a fit starts).

        Args:
            z: ``(num_layers, intrinsic_dim)`` array.

        Example:
            >>> dfo.set_z(np.zeros((dfo.num_layers, dfo.intrinsic_dim)))  # the original model
        """
        z = np.array(z, dtype=np.float64)
        if z.shape != self._z.shape:
            raise ValueError(f"z must have shape {self._z.shape}, got {z.shape}")
        if not np.isfinite(z).all():
            raise ValueError("z must be finite")
        with torch.no_grad():
            for layer in range(self.num_layers):
                self._apply_layer(layer, z[layer])
        self._z = z.copy()
        self._f_cur = None
        self._synced[:] = False

    def remove(self) -> None:
        """Detach the modules: the model computes exactly what it did before construction.

        Example:
            >>> dfo.remove()
        """
        self.hooks.remove()
        self.evaluator = None

    # ---------------------------------------------------------------------- optimizers
    def _optimizer_seed(self, layer: int, o: int) -> int:
        k = int(self._restarts[layer, o])
        s = self._seeds.seed(layer, OPTIMIZER_SEED_OFFSET + o + len(OPTIMIZERS) * k, "search")
        return s or 1

    def _optimizer(self, layer: int, o: int, created: tuple | None = None):
        key = (layer, o)
        es = self._es.get(key)
        if es is not None:
            return es
        if created is None:
            seed = self._optimizer_seed(layer, o)
            sigma0 = float(self._sigmas[layer, o])
            if not (math.isfinite(sigma0) and sigma0 > 0):
                sigma0 = self.sigma
            x0 = self._z[layer].copy()
        else:
            seed, sigma0, x0 = created
        self._created[key] = (seed, sigma0, x0.copy())
        if OPTIMIZERS[o] == "cma":
            import cma

            rng = np.random.Generator(np.random.PCG64(seed))
            opts = {
                "popsize": self.popsize,
                "seed": np.nan,
                "randn": lambda *shape: rng.standard_normal(shape),
                "CMA_diagonal": self.cma_diagonal,
                "verbose": -9,
                "verb_disp": 0,
                "verb_log": 0,
            }
            opts.update(self.cma_options)
            es = cma.CMAEvolutionStrategy(x0, sigma0, opts)
            self._rngs[key] = rng
        else:
            es = Fireworks(x0, sigma0, {**self.fwa_options, "seed": seed, "popsize": self.popsize})
        self._es[key] = es
        self._synced[layer, o] = True
        return es

    # -------------------------------------------------------------------------- fitting
    def _scorer(self, task: Task | str | None, scorer: Scorer | None) -> Scorer:
        if scorer is not None:
            if getattr(scorer, "model", None) is not self.model:
                raise ValueError("scorer must wrap the model DFOLoRA was built on")
            return scorer
        if task is None:
            raise ValueError("fit needs task= (a Task or a built-in task name) or scorer=")
        if self.loaded is None:
            raise ValueError(
                "DFOLoRA was built on a bare model: pass scorer=Scorer(LoadedModel(...), task)"
            )
        return Scorer(self.loaded, task)

    def _encode(self, scorer: Scorer, examples: list[Example], parts: int) -> list[Batch]:
        parts = max(1, min(parts, len(examples)))
        if parts == 1:
            return [scorer.encode(examples)]
        full = scorer.encode(examples)
        lengths = full.attention_mask[: full.num_examples].sum(dim=1).tolist()
        order = sorted(range(len(examples)), key=lambda i: (lengths[i], i))
        sizes = _chunk_sizes(len(examples), parts)
        out, start = [], 0
        for size in sizes:
            out.append(scorer.encode([examples[i] for i in order[start : start + size]]))
            start += size
        return out

    def _evaluate(self, layer: int, zs: np.ndarray) -> np.ndarray:
        step = self.max_candidates or len(zs)
        out = []
        for s in range(0, len(zs), step):
            out.append(self.evaluator.losses(layer, self.factors(layer, zs[s : s + step])))
        losses = torch.cat(out).double().cpu().numpy()
        return np.where(np.isfinite(losses), losses, np.inf)

    def _dev_eval(self, scorer: Scorer, dev_batches: list[Batch]) -> tuple[float, float]:
        correct, total, loss_sum = 0, 0, 0.0
        for batch in dev_batches:
            logits = scorer.logits(batch)
            correct += int((logits.argmax(dim=1) == batch.labels).sum())
            loss_sum += float(F.cross_entropy(logits, batch.labels, reduction="sum"))
            total += batch.num_examples
        return correct / total, loss_sum / total

    def _record_dev(self, acc: float, loss: float) -> None:
        entry = {
            "calls": self._calls,
            "round": self._round,
            "dev_acc": acc,
            "dev_loss": loss,
            "loss": self._f_cur,
        }
        self.history.append(entry)
        best = self._best
        if best is None or (acc, -loss) > (best["dev_acc"], -best["dev_loss"]):
            self._best = {
                "z": self._z.copy(),
                "dev_acc": acc,
                "dev_loss": loss,
                "calls": self._calls,
                "round": self._round,
            }

    def _generation_step(self) -> dict[str, Any]:
        layer = self._layer_pos
        o_name = self.optimizers[self._round % len(self.optimizers)]
        o = OPTIMIZERS.index(o_name)
        es = self._optimizer(layer, o)
        if not self._synced[layer, o]:
            es.inject([self._z[layer].copy()], force=True)
            self._synced[layer, o] = True
        xs = es.ask()
        zs = np.asarray(xs, dtype=np.float64)
        losses = self._evaluate(layer, zs)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="elements of z2", category=UserWarning)
            es.tell(xs, losses.tolist())
        self._calls += len(xs)
        self._generation += 1
        i = int(np.argmin(losses))
        if losses[i] < self._f_cur:
            self._z[layer] = zs[i]
            self._f_cur = float(losses[i])
            self._apply_layer(layer, zs[i])
            self._synced[layer, :] = False
            self._synced[layer, o] = True
        self._sigmas[layer, o] = float(es.sigma)
        if es.stop():
            del self._es[(layer, o)]
            self._created.pop((layer, o), None)
            self._rngs.pop((layer, o), None)
            self._restarts[layer, o] += 1
            self._sigmas[layer, o] = np.nan
        finite = losses[np.isfinite(losses)]
        info = {
            "round": self._round,
            "layer": layer,
            "optimizer": o_name,
            "gen_best": float(finite.min()) if finite.size else None,
            "gen_mean": float(finite.mean()) if finite.size else None,
            "sigma": float(es.sigma),
        }
        self._layer_pos += 1
        if self._layer_pos == self.num_layers:
            self._layer_pos = 0
            self._round += 1
        return info

    def fit(
        self,
        train_examples: Sequence[Example],
        dev_examples: Sequence[Example] | None = None,
        budget: int = 8000,
        eval_every: int | None = None,
        log: str | Path | None = None,
        *,
        task: Task | str | None = None,
        scorer: Scorer | None = None,
        progress: bool = True,
    ) -> DFOResult:
        """Search (or continue searching) until ``budget`` calls are used.

        Args:
            train_examples: the training set (all of it is one call per candidate).
            dev_examples: examples that pick the snapshot applied at the end (optional).
            budget: total calls of the whole search (a resumed search counts earlier calls).
            eval_every: calls between dev evaluations (default: one round, ``popsize·L``).
            log: JSONL file: one object per generation with ``step`` (generation), ``calls``,
                ``round``, ``layer``, ``optimizer``, ``loss`` (current training loss),
                ``gen_best``, ``gen_mean``, ``sigma``, ``dev_acc`` and ``dev_loss`` (null when
                not measured after that generation) and ``elapsed`` (seconds); a first line with
                ``step`` 0 has the starting point. Appended to when the search is resumed.
            task: a :class:`~zofast.tasks.Task` or built-in name (with a LoadedModel).
            scorer: a :class:`~zofast.scoring.Scorer` of this model instead of ``task``.
            progress: show a tqdm progress bar (in calls).

        Returns:
            A :class:`DFOResult`.

        Raises:
            ValueError: if ``budget`` is smaller than one generation (``popsize``), on empty
                training examples, a bad ``eval_every``, or no task/scorer.

        Example:
            >>> res = dfo.fit(train, dev, budget=8000, task="sst-2", log="runs/dfo.jsonl")
            >>> res.best_dev_acc
            0.8125
        """
        from tqdm.auto import tqdm

        budget = _check_int(budget, "budget", 1)
        if budget < self.popsize:
            raise ValueError(
                f"budget ({budget}) is smaller than one generation (popsize {self.popsize})"
            )
        if eval_every is None:
            eval_every = self.popsize * self.num_layers
        eval_every = _check_int(eval_every, "eval_every", 1)
        train = list(train_examples)
        if not train:
            raise ValueError("fit needs at least one training example")
        dev = list(dev_examples) if dev_examples is not None else []
        scorer = self._scorer(task, scorer)
        self.model.eval()
        start = time.perf_counter()
        elapsed0 = self._elapsed

        def elapsed() -> float:
            return elapsed0 + time.perf_counter() - start

        fresh = self._generation == 0 and self._f_cur is None
        log_file = None
        if log is not None:
            Path(log).parent.mkdir(parents=True, exist_ok=True)
            log_file = open(log, "w" if fresh else "a", encoding="utf-8")  # noqa: SIM115
        bar = tqdm(
            total=budget,
            initial=min(self._calls, budget),
            disable=not progress,
            desc="DFO-LoRA",
            unit="call",
        )
        try:
            with torch.no_grad():
                batches = self._encode(scorer, train, self.length_buckets)
                dev_batches = [
                    scorer.encode(dev[i : i + DEV_BATCH]) for i in range(0, len(dev), DEV_BATCH)
                ]
                if self.layer_stds is not None:
                    self._apply_all(self._z)
                self.evaluator = PopulationEvaluator(
                    scorer,
                    self.arch,
                    self.hooks,
                    batches,
                    mode=self.mode,
                    record_inputs=self.layer_stds is None,
                )
                if self.layer_stds is None:
                    self._init_layer_stds(self.evaluator)
                    self._apply_all(self._z)
                if self._f_cur is None:
                    self._f_cur = self.evaluator.current_loss()
                    self._calls += 1
                    bar.update(1)

                def write(record: dict) -> None:
                    if log_file is not None:
                        log_file.write(json.dumps(record, allow_nan=False) + "\n")
                        log_file.flush()

                last_eval = self.history[-1]["calls"] if self.history else None
                dev_acc = dev_loss = None
                if dev and last_eval != self._calls:
                    dev_acc, dev_loss = self._dev_eval(scorer, dev_batches)
                    self._record_dev(dev_acc, dev_loss)
                if fresh:
                    write(
                        {
                            "step": 0,
                            "calls": self._calls,
                            "round": 0,
                            "layer": None,
                            "optimizer": None,
                            "loss": self._f_cur,
                            "gen_best": None,
                            "gen_mean": None,
                            "sigma": None,
                            "dev_acc": dev_acc,
                            "dev_loss": dev_loss,
                            "elapsed": elapsed(),
                        }
                    )
                while self._calls + self.popsize <= budget:
                    before = self._calls
                    info = self._generation_step()
                    bar.update(self._calls - before)
                    dev_acc = dev_loss = None
                    due = self._calls // eval_every > before // eval_every
                    last = self._calls + self.popsize > budget
                    if dev and (due or last):
                        dev_acc, dev_loss = self._dev_eval(scorer, dev_batches)
                        self._record_dev(dev_acc, dev_loss)
                    write(
                        {
                            "step": self._generation,
                            "calls": self._calls,
                            **{k: info[k] for k in ("round", "layer", "optimizer")},
                            "loss": self._f_cur,
                            **{k: info[k] for k in ("gen_best", "gen_mean", "sigma")},
                            "dev_acc": dev_acc,
                            "dev_loss": dev_loss,
                            "elapsed": elapsed(),
                        }
                    )
                    postfix = {"loss": f"{self._f_cur:.4f}"}
                    if self._best is not None:
                        postfix["dev"] = f"{self._best['dev_acc']:.3f}"
                    bar.set_postfix(postfix, refresh=False)
                self._elapsed = elapsed()
                chosen = self._best["z"] if self._best is not None else self._z
                self._apply_all(chosen)
        finally:
            bar.close()
            if log_file is not None:
                log_file.close()
        return self.result()

    def _init_layer_stds(self, evaluator: PopulationEvaluator) -> None:
        stds = evaluator.input_stds()
        emb = self.model.get_input_embeddings()
        if emb is None or not isinstance(getattr(emb, "weight", None), torch.Tensor):
            raise ValueError("init='hidden' needs the model's input word embeddings")
        stds[0] = clipped_std(emb.weight)
        out = np.array(stds, dtype=np.float64)
        if not (np.isfinite(out).all() and (out > 0).all()):
            raise ValueError(f"init='hidden': degenerate hidden-state stds {out.tolist()}")
        self.layer_stds = out

    def result(self) -> DFOResult:
        """The current :class:`DFOResult` (what the last :meth:`fit` returned, or a loaded one).

        Returns:
            A :class:`DFOResult`.

        Example:
            >>> dfo.result().calls
            7981
        """
        best = self._best
        return DFOResult(
            calls=self._calls,
            generations=self._generation,
            rounds=self._round,
            train_loss=self._f_cur if self._f_cur is not None else math.nan,
            best_dev_acc=None if best is None else best["dev_acc"],
            best_dev_loss=None if best is None else best["dev_loss"],
            best_calls=None if best is None else best["calls"],
            elapsed=self._elapsed,
            mode=self.evaluator.mode if self.evaluator is not None else self.mode,
            history=[dict(h) for h in self.history],
        )

    # ------------------------------------------------------------------------ export
    def _float_factors(self, layer: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        z = self._applied[layer]
        if not np.any(z):
            out = {}
            for name in self.targets:
                t = self.arch.targets[layer][name]
                out[name] = (
                    torch.zeros(t.in_features, self.rank),
                    torch.zeros(self.rank, t.out_features),
                )
            return out
        mats = self.factors(layer, z[None], dtype=torch.float32)
        return {k: (a[0].cpu(), b[0].cpu()) for k, (a, b) in mats.items()}

    def export_peft(self, path: str | Path, base_model_name_or_path: str | None = None) -> Path:
        """Write the applied modules as a PEFT LoRA adapter (loadable by ``PeftModel``).

        ``adapter_config.json`` + ``adapter_model.safetensors`` (float32), one LoRA per target
        module, ``lora_alpha = r`` (scaling 1), no dropout, no bias. A separate projection gets
        ``lora_A.weight = Aᵀ`` ``(r, D_in)`` and ``lora_B.weight = Bᵀ`` ``(D_out, r)``. GPT-2's
        fused ``c_attn`` (``fan_in_fan_out=True``) gets one LoRA of rank ``r·len(targets)``:
        ``lora_A`` stacks the targets' ``Aᵀ``, and ``lora_B`` (``3D × r·len(targets)``) holds each
        target's ``Bᵀ`` in its own output slice and rank columns, zeros elsewhere (the V slice
        stays zero when V is not a target). Module names are full paths in the model, so that
        ``PeftModel.from_pretrained(unmodified_model, path)`` reproduces the tuned logits.

        Args:
            path: output folder (created).
            base_model_name_or_path: recorded in the config (default: the model's name).

        Returns:
            The folder.

        Example:
            >>> dfo.export_peft("runs/adapter")
            >>> peft_model = peft.PeftModel.from_pretrained(fresh_model, "runs/adapter")
        """
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        weights: dict[str, torch.Tensor] = {}
        modules: list[str] = []
        fused = False
        named = dict(self.model.named_modules())
        for layer in range(self.num_layers):
            mats = self._float_factors(layer)
            groups: dict[str, list] = {}
            for name in self.targets:
                t = self.arch.targets[layer][name]
                groups.setdefault(t.module_name, []).append(t)
            for module_name, ts in groups.items():
                prefix = f"base_model.model.{module_name}"
                if ts[0].fused:
                    fused = True
                    width = named[module_name].weight.shape[1]
                    a = torch.cat([mats[t.name][0] for t in ts], dim=1).T.contiguous()
                    b = torch.zeros(width, self.rank * len(ts))
                    for j, t in enumerate(ts):
                        start, stop = t.out_slice
                        b[start:stop, j * self.rank : (j + 1) * self.rank] = mats[t.name][1].T
                else:
                    a = mats[ts[0].name][0].T.contiguous()
                    b = mats[ts[0].name][1].T.contiguous()
                weights[f"{prefix}.lora_A.weight"] = a
                weights[f"{prefix}.lora_B.weight"] = b
                modules.append(module_name)
        r = self.rank * (len(self.targets) if fused else 1)
        name = base_model_name_or_path
        if name is None:
            name = self.loaded.name if self.loaded is not None else None
            name = name or getattr(getattr(self.model, "config", None), "_name_or_path", None)
        config = {
            "peft_type": "LORA",
            "task_type": None,
            "base_model_name_or_path": name,
            "r": r,
            "lora_alpha": r,
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": fused,
            "target_modules": modules,
            "inference_mode": True,
            "init_lora_weights": True,
            "use_rslora": False,
            "use_dora": False,
            "rank_pattern": {},
            "alpha_pattern": {},
            "modules_to_save": None,
        }
        save_file(weights, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
        (path / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        return path

    # ------------------------------------------------------------------- checkpoints
    def _config(self) -> dict[str, Any]:
        cfg = {k: getattr(self, k) for k in _SEARCH_KEYS}
        cfg["targets"] = list(self.targets)
        cfg["optimizers"] = list(self.optimizers)
        return cfg

    def save(self, path: str | Path) -> Path:
        """Write the search state: ``dfo_lora.json`` and ``dfo_lora.safetensors`` (no pickle).

        Args:
            path: folder (created).

        Returns:
            The folder.

        Example:
            >>> dfo.save("runs/dfo-ckpt")
        """
        from safetensors.numpy import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        best = self._best
        state = {
            "format": FORMAT,
            "version": VERSION,
            "config": self._config(),
            "runtime": {k: getattr(self, k) for k in _RUNTIME_KEYS},
            "architecture": {
                "family": self.arch.family,
                "num_layers": self.num_layers,
                "targets": self.arch.describe(self.targets),
            },
            "model_name": self.loaded.name if self.loaded is not None else None,
            "layer_stds": None if self.layer_stds is None else self.layer_stds.tolist(),
            "state": {
                "round": self._round,
                "layer": self._layer_pos,
                "generation": self._generation,
                "calls": self._calls,
                "loss": self._f_cur,
                "elapsed": self._elapsed,
                "restarts": self._restarts.tolist(),
                "sigmas": [[None if math.isnan(s) else s for s in row] for row in self._sigmas],
                "best": None if best is None else {k: v for k, v in best.items() if k != "z"},
                "history": self.history,
            },
        }
        arrays = {"incumbents": self._z, "applied": self._applied}
        if best is not None:
            arrays["best"] = best["z"]
        optimizers = []
        for (layer, o), es in sorted(self._es.items()):
            seed, sigma0, x0 = self._created[(layer, o)]
            prefix = f"optimizer.{layer}.{o}."
            if OPTIMIZERS[o] == "cma":
                tags, opt_arrays = cma_state(es)
                extra = {"tags": tags, "rng": self._rngs[(layer, o)].bit_generator.state}
            else:
                scalars, opt_arrays = es.get_state()
                extra = {"scalars": scalars}
            arrays[prefix + "x0"] = x0
            arrays.update({prefix + "state." + k: v for k, v in opt_arrays.items()})
            optimizers.append(
                {
                    "layer": layer,
                    "optimizer": OPTIMIZERS[o],
                    "seed": seed,
                    "sigma0": sigma0,
                    **extra,
                }
            )
        state["state"]["optimizers"] = optimizers
        state["state"]["synced"] = self._synced.tolist()
        save_file(
            {k: np.ascontiguousarray(v) for k, v in arrays.items()},
            str(path / "dfo_lora.safetensors"),
        )
        (path / "dfo_lora.json").write_text(json.dumps(state, indent=1, allow_nan=False) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path, model: LoadedModel | nn.Module, **runtime: Any) -> DFOLoRA:
        """Rebuild a search saved by :meth:`save` on ``model`` (same architecture).

        The applied vectors are applied (``init="hidden"`` scales come from the checkpoint);
        :meth:`fit` continues the search where it stopped, optimizer states included (module
        docstring).

        Args:
            path: the folder.
            model: the model (a fresh copy of the one searched).
            **runtime: overrides of ``mode``, ``max_candidates``, ``cache_projections``,
                ``length_buckets``.

        Returns:
            A :class:`DFOLoRA`.

        Raises:
            ValueError: if the checkpoint is not a DFO-LoRA checkpoint or does not match the
                model's architecture.

        Example:
            >>> dfo = DFOLoRA.load("runs/dfo-ckpt", load_model(default_model_path()))
            >>> dfo.fit(train, dev, budget=8000, task="sst-2")  # continues
        """
        from safetensors.numpy import load_file

        path = Path(path)
        state = json.loads((path / "dfo_lora.json").read_text())
        if state.get("format") != FORMAT or state.get("version") != VERSION:
            raise ValueError(f"{path} is not a {FORMAT} checkpoint of version {VERSION}")
        bad = sorted(set(runtime) - set(_RUNTIME_KEYS))
        if bad:
            raise ValueError(f"only {_RUNTIME_KEYS} can be overridden, got {bad}")
        options = {**state["runtime"], **runtime}
        arch = find_architecture(model.model if isinstance(model, LoadedModel) else model)
        saved = state["architecture"]
        names = tuple(state["config"]["targets"])
        if saved["family"] != arch.family or saved["targets"] != arch.describe(names):
            raise ValueError(
                f"checkpoint {path} was made on a different architecture "
                f"({saved['family']}, {saved['num_layers']} layers)"
            )
        obj = cls(model, **state["config"], **options)
        arrays = load_file(str(path / "dfo_lora.safetensors"))
        if state["layer_stds"] is not None:
            obj.layer_stds = np.array(state["layer_stds"], dtype=np.float64)
        s = state["state"]
        obj._z = arrays["incumbents"].astype(np.float64)
        obj._round, obj._layer_pos = int(s["round"]), int(s["layer"])
        obj._generation, obj._calls = int(s["generation"]), int(s["calls"])
        obj._f_cur = None if s["loss"] is None else float(s["loss"])
        obj._elapsed = float(s["elapsed"])
        saved_optimizers = s.get("optimizers")
        obj._restarts = np.array(s["restarts"], dtype=np.int64)
        if saved_optimizers is None:  # a checkpoint without optimizer states: restart them
            obj._restarts += 1
        obj._sigmas = np.array(
            [[np.nan if v is None else v for v in row] for row in s["sigmas"]], dtype=np.float64
        )
        obj.history = list(s["history"])
        if s["best"] is not None:
            obj._best = {**s["best"], "z": arrays["best"].astype(np.float64)}
        if obj.layer_stds is not None:
            with torch.no_grad():
                for layer in range(obj.num_layers):
                    obj._apply_layer(layer, arrays["applied"][layer])
        for rec in saved_optimizers or ():
            layer, o = int(rec["layer"]), OPTIMIZERS.index(rec["optimizer"])
            prefix = f"optimizer.{layer}.{o}."
            x0 = arrays[prefix + "x0"].astype(np.float64)
            es = obj._optimizer(layer, o, (int(rec["seed"]), float(rec["sigma0"]), x0))
            opt_arrays = {
                k[len(prefix) + 6 :]: v
                for k, v in arrays.items()
                if k.startswith(prefix + "state.")
            }
            if rec["optimizer"] == "cma":
                set_cma_state(es, rec["tags"], opt_arrays)
                obj._rngs[(layer, o)].bit_generator.state = rec["rng"]
            else:
                es.set_state(rec["scalars"], opt_arrays)
        if "synced" in s:
            obj._synced = np.array(s["synced"], dtype=bool)
        return obj
