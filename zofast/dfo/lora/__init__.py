"""DFO-LoRA: derivative-free search of low-rank query/key updates (arXiv 2403.01754).

Files (PEFT's tuner layout, plus the search and its state):

* ``config.py``: :class:`DFOLoRAConfig`, one documented field per option, checked on creation;
* ``layer.py``: one layer's maths, search vector → projections → factors ``A``, ``B``
  (the hooks that add ``(x·A)·B`` are :class:`zofast.dfo.arch.LowRankHooks`);
* ``model.py``: :class:`DFOLoRA`, which finds the targets, attaches the hooks (once per model)
  and applies search vectors;
* ``search.py``: the CMA-ES / Fireworks alternation over layers and its loop (``fit``);
* ``checkpoint.py``: state and resume (``save`` / ``load``);
* ``export.py``: the applied modules as a PEFT LoRA adapter.

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
(``bench/suites/test_dfo_population.py``). The incumbents' factors ``A`` and ``B`` (a ``d_c``-th of
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

from zofast.dfo.lora.config import DEFAULT_ALPHA, INITS, OPTIMIZERS, DFOLoRAConfig
from zofast.dfo.lora.layer import PROJECTION_CACHE_BYTES
from zofast.dfo.lora.model import DFOLoRA
from zofast.dfo.lora.search import DFOResult

__all__ = [
    "DFOLoRA",
    "DFOLoRAConfig",
    "DFOResult",
    "OPTIMIZERS",
    "INITS",
    "DEFAULT_ALPHA",
    "PROJECTION_CACHE_BYTES",
]
