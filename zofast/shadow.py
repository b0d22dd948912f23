"""Shadow perturbation: the layers compute with W + c·Z while the stored W is never written.

Perturbing bf16 weights in place (W += εZ, forward, W −= 2εZ, forward, W += εZ) rounds W at every
pass, so W random-walks. In shadow mode a step never writes the stored weights; only the update
does. While a forward runs, each trained tensor W is seen as W + c·Z, where Z is the step's noise
(full-rank, or low-rank U·Vᵀ; the engine's contract, see :mod:`zofast.perturb`) and c is +ε during
the first forward, −ε during the second and 0 otherwise (then the hooks do nothing: no allocation,
no launch). Each (module, tensor) pair takes one of four ways, chosen by :func:`plan`:

* ``"temporary"``: a forward pre-hook on the module that owns the parameter (whose ``_parameters``
  holds it; for a child of ``nn.MultiheadAttention``, which reads its children's weights directly,
  the MultiheadAttention) builds tmp = W + c·Z out of place with the engine and swaps it in as the
  parameter's ``.data``; a forward hook registered with ``always_call=True`` swaps the stored
  tensor back (also when the forward raises) and frees tmp. Bit for bit what the module computes
  after an in-place engine perturbation of a copy of W (same engine call on a copy).
* ``"rows"`` (a stock ``nn.Embedding``, see :func:`zofast.virtual.layer_kind`): a forward hook
  adds c·Z[ids] to the output, generating only the looked-up rows (low-rank: c·U[ids]·Vᵀ).
* ``"product"`` (a stock Linear or GPT-2 Conv1D whose weight is tied to an ``nn.Embedding``, e.g.
  an LM head; optionally every such layer above a size): a forward hook adds c·x·Zᵀ (Conv1D:
  c·x·Z); low-rank as (x·V)·(c·U)ᵀ, full-rank with Z generated in chunks of rows.

* ``"preset"`` (small tensors, biases and norms, if :func:`plan` is asked to; on a small model
  every tensor, :func:`zofast.optim.shadow.plan_ways`): no hook; before a
  forward :meth:`ShadowLayers.set_coef` builds every preset's W + c·Z into a copy, all in one
  engine pass, and swaps the copies in for the whole forward (:class:`zofast.shadow_step.Presets`;
  bit for bit a temporary, within rounding of "rows" / "product"). Code that reads such a
  tensor outside its module sees W + c·Z too.

"rows" and "product" equal the layer with weight W + c·Z up to the rounding of the forward (the
perturbation is not rounded to W's dtype first, unlike an in-place perturbation). A tensor that
is already swapped in (tied parameters, nested owners) is not applied a second time.

Memory: "temporary" holds the temporaries of the modules whose forward is in progress, i.e. for
parameters owned by leaf layers one layer's trained tensors at a time (a parameter owned by a
container stays swapped in for the container's whole forward); "rows" the noise of the
looked-up rows, tokens × dim in float32 (and their int64 indices); "product" one block of c·Z
(``CHUNK_NUMEL`` elements in the output's dtype; float32 for a Conv1D, plus a float32
accumulator of the output's size), or the (m + n)·r factors when low-rank.

Limits: code that reads a weight outside its owner's forward (a parent reading a child's
``.weight``, a generation loop reading the embedding matrix, ``layer.forward(...)`` called
directly) sees the stored W; :meth:`ShadowLayers.used` tells the optimizer which tensors a forward
actually perturbed. The swap is invisible to autograd: shadow forwards are for ``no_grad`` /
``inference_mode`` (ZO), not for backward. An exception that is not an ``Exception``
(KeyboardInterrupt) or a forward under ``torch.compile`` can leave a temporary swapped in:
:meth:`ShadowLayers.restore` puts the stored tensors back; call it before writing an update. A
``copy.deepcopy`` of a hooked model shares the original's hooks: detach first.

Example:
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    >>> tensors = [ShadowTensor(i, n, p, rank=0) for i, (n, p) in
    ...            enumerate(model.named_parameters())]
    >>> layers = ShadowLayers(plan(model, tensors)); layers.attach()
    >>> for st in tensors:
    ...     st.set_direction(step=0, seeds=(100 + st.index,)); st.set_coef(1e-3)
    >>> y = model(torch.ones(2, 4))  # computed with W + 1e-3·Z; the stored W is untouched
    >>> layers.remove_hooks()
"""

from __future__ import annotations

import math
import weakref
from functools import partial
from typing import NamedTuple

import numpy as np
import torch

from zofast import offload_prepare, virtual
from zofast._ext import resolve_backend
from zofast.perturb import _device_terms, gaussian_, lowrank_, lowrank_factors
from zofast.perturb_args import check_weight, matrix_shape
from zofast.rng import as_seed, normal
from zofast.shadow_step import (
    DeviceSeeds,
    Presets,
    StepFactors,
    bulk_on,
    to_device,
    transposed,
)

__all__ = ["CHUNK_NUMEL", "WAYS", "ShadowLayers", "ShadowTensor", "Use", "detach", "plan"]

WAYS = ("temporary", "rows", "product", "preset")
# Elements of Z generated at once by a full-rank "product" (16 MiB in bf16): bounded memory, and
# few enough chunks that launches don't dominate (H200, 2048 tokens, a tied 50272×2048 bf16 head:
# 2.23 ms at 2**22, 1.61 at 2**23, 1.62 at 2**24; the plain head takes 0.55 ms).
CHUNK_NUMEL = 1 << 23


class Use(NamedTuple):
    """How one module applies one tensor: `way` in WAYS; `kind` ("linear", "conv1d",
    "embedding", see zofast.virtual.layer_kind) for "rows" / "product", None for "temporary"."""

    module: torch.nn.Module
    way: str
    kind: str | None


class ShadowTensor:
    """One trained tensor of a shadow-mode optimizer: its noise, the step's direction and c.

    Args:
        index: the tensor's flat index in the optimizer.
        name: its name (for messages).
        param: the parameter (contiguous float32 / bfloat16 / float16).
        rank: 0 for full-rank noise (one seed), r ≥ 1 for low-rank U·Vᵀ (u and v seeds; W viewed
            as the matrix of :func:`zofast.perturb.matrix_shape`).

    The optimizer calls :meth:`set_direction` once per step and :meth:`set_coef` around each
    forward; :func:`plan` fills ``uses``.

    Example:
        >>> w = torch.nn.Parameter(torch.zeros(8, 6))
        >>> st = ShadowTensor(0, "w", w, rank=2)
        >>> st.set_direction(step=3, seeds=(11, 12)); st.set_coef(1e-3)
    """

    def __init__(self, index: int, name: str, param: torch.Tensor, rank: int = 0):
        check_weight(param, name)
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise ValueError(f"rank of {name} must be a non-negative integer, got {rank!r}")
        self.index, self.name, self.param, self.rank = index, name, param, rank
        self.uses: list[Use] = []
        self.step: int | None = None
        self.seeds: tuple[int, ...] | None = None
        self.c = 0.0
        self.used = False  # applied by a forward (c ≠ 0) since ShadowLayers.reset_usage()
        self._stored: torch.Tensor | None = None  # the stored tensor while tmp is swapped in
        self._terms: dict = {}  # device -> (seeds, scale) device tensors for the engine
        # Low-rank: the step's (Uᵀ, Vᵀ), (r, m) and (r, n) in W's dtype, for the hooks' maths,
        # made for (step, seeds) = _factors_key (in bulk by zofast.shadow_step.StepFactors).
        self._factors: tuple | None = None
        self._factors_key = None
        if rank:
            m, n = matrix_shape(param.shape)
            if rank > min(m, n):
                raise ValueError(f"rank of {name} must be in 1..{min(m, n)}, got {rank}")

    @property
    def swapped(self) -> bool:
        """Whether a temporary W + c·Z is swapped in as the parameter's data right now."""
        return self._stored is not None

    def set_direction(self, step: int, seeds) -> None:
        """The step's noise: seeds = (seed,) for full-rank, (u_seed, v_seed) for low-rank."""
        seeds = tuple(as_seed(s, f"seeds of {self.name}") for s in seeds)
        if len(seeds) != (2 if self.rank else 1):
            kind = "(u_seed, v_seed)" if self.rank else "(seed,)"
            raise ValueError(f"{self.name} takes seeds {kind}, got {len(seeds)} seeds")
        self.step, self.seeds, self._terms = step, seeds, {}

    def set_coef(self, c: float) -> None:
        """c: +ε, −ε, or 0 (no perturbation); rounded to float32 like the engine's scales."""
        c = float(np.float32(c))
        if not math.isfinite(c):
            raise ValueError(f"c must be finite, got {c}")
        if c and self.seeds is None:
            raise ValueError(f"{self.name}: set_direction before a non-zero set_coef")
        if c != self.c:
            if self._stored is not None:
                raise RuntimeError(
                    f"{self.name} has a temporary swapped in (an interrupted forward): call "
                    "ShadowLayers.restore() first"
                )
            self.c, self._terms = c, {}

    def flush(self) -> None:
        """Nothing is pending in shadow mode (zofast.virtual.detach calls this on the tensors
        of every registered layer set)."""

    def _device_terms(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The engine's seeds (int64) and scale (float32) on `device`, uploaded once per
        direction and c (through pinned memory: no host sync) unless set_terms gave them."""
        terms = self._terms.get(device)
        if terms is None:
            with torch.inference_mode(False):
                terms = self._terms[device] = _device_terms(list(self.seeds), [self.c], device)
        return terms

    def set_terms(self, device: torch.device, seeds: torch.Tensor, scale: torch.Tensor) -> None:
        """The current seeds and c as device tensors (uploaded in bulk for many tensors)."""
        self._terms[device] = (seeds, scale)

    def set_factors(self, Ut: torch.Tensor, Vt: torch.Tensor) -> None:
        """The current direction's (Uᵀ, Vᵀ) (made in bulk for many tensors)."""
        self._factors, self._factors_key = (Ut, Vt), (self.step, self.seeds)

    def factors(self, dtype: torch.dtype, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(Uᵀ, Vᵀ) of the current direction in `dtype`, (r, m) and (r, n): made here if no
        bulk load made them for this direction; on `device` where given (copied there for a
        streamed block, zofast.offload)."""
        if self._factors_key != (self.step, self.seeds):
            with torch.inference_mode(False):  # no inference tensors kept for a later forward
                U, V = lowrank_factors(
                    self.param.shape, *self.seeds, self.rank, device=self.param.device
                )
            self.set_factors(transposed(U, self.param.dtype), transposed(V, self.param.dtype))
        Ut, Vt = self._factors
        if device is not None and Ut.device != device:
            return to_device(Ut.to(dtype), device), to_device(Vt.to(dtype), device)
        return (Ut, Vt) if Ut.dtype == dtype else (Ut.to(dtype), Vt.to(dtype))

    def swap_to(self, tensor: torch.Tensor) -> None:
        """Swap `tensor` (W + c·Z) in as the parameter's data; :meth:`_swap_out` undoes it."""
        self._stored = self.param.data
        self.param.data = tensor
        self.used = True

    def _swap_in(self) -> None:
        self.swap_to(_build_temporary(self, self.param.data))

    def _swap_out(self) -> None:
        if self._stored is not None:
            self.param.data = self._stored
            self._stored = None


def _build_temporary(st: ShadowTensor, w: torch.Tensor) -> torch.Tensor:
    """W + c·Z out of place (w only read), bit for bit what the engine writes into a perturbed
    copy of w."""
    seeds, scale = st._device_terms(w.device)
    tmp = torch.empty_like(w)
    if st.rank:
        return lowrank_(w, seeds[:1], seeds[1:], st.rank, scale, out=tmp)
    if bulk_on(w.device) and w.is_contiguous():
        # The kernel gaussian_ launches, without its checks: w was checked when the tensor was
        # made, the terms are ours (a hook runs for every big tensor of every forward).
        from zofast.kernels.gaussian import gaussian_triton

        return gaussian_triton(w, seeds, scale, 0, out=tmp)
    return gaussian_(w, seeds, scale, out=tmp)


def _noise_rows(st: ShadowTensor, rows: torch.Tensor, n: int) -> torch.Tensor:
    """Z[rows] of full-rank noise with n columns, Z[i, j] = normal(seed, i·n + j): float32
    (len(rows), n), only those rows generated."""
    offsets = rows.to(torch.int64)[:, None] * n + torch.arange(n, device=rows.device)
    if resolve_backend("auto", rows.device) == "triton":
        # The kernel with the device seed: rng.normal would check the offsets and copy the seed
        # on the host, synchronising the stream at every forward.
        from zofast.kernels.philox import sample_triton

        return sample_triton(offsets, st._device_terms(rows.device)[0], normal=True)
    return normal(st.seeds[0], offsets)


def _contiguous(out: torch.Tensor) -> torch.Tensor:
    return out if out.is_contiguous() else out.contiguous()


def _add_rows(st: ShadowTensor, ids: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Embedding (W: vocab × dim), full-rank: y += c·Z[ids], in float32, one rounding."""
    y = _contiguous(out)
    n = st.param.shape[1]
    y.view(-1, n).add_(_noise_rows(st, ids.reshape(-1), n), alpha=st.c)
    return y


def _noise_block(st: ShadowTensor, r0: int, r1: int, n: int, dtype, device) -> torch.Tensor:
    """c·Z[r0:r1] (rows of Z as an n-column matrix) in `dtype`, rounded once: one engine pass
    adding it to zeros, with the seed and c already on the device (no upload per block)."""
    seeds, scale = st._device_terms(device)
    block = torch.zeros(r1 - r0, n, dtype=dtype, device=device)
    return gaussian_(block, seeds, scale, offset=r0 * n)


def _add_product(st: ShadowTensor, kind: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Full-rank y += c·x·Zᵀ (Linear, W: out × in) or c·x·Z (Conv1D, W: in × out), Z generated
    CHUNK_NUMEL elements (whole rows) at a time."""
    y = _contiguous(out)
    m, n = st.param.shape
    step = max(1, CHUNK_NUMEL // n)
    if kind == "linear":  # y[:, r0:r1] += x·(c·Z[r0:r1])ᵀ, in the output's dtype like the forward
        x2, y2 = x.reshape(-1, n).to(y.dtype), y.view(-1, m)
        for r0 in range(0, m, step):
            r1 = min(m, r0 + step)
            y2[:, r0:r1].addmm_(x2, _noise_block(st, r0, r1, n, y.dtype, y.device).T)
        return y
    # conv1d: y += Σ_chunks x[:, r0:r1]·(c·Z[r0:r1]), summed in float32, rounded into y once
    x2 = x.reshape(-1, m).float()
    acc = torch.zeros(x2.shape[0], n, dtype=torch.float32, device=y.device)
    for r0 in range(0, m, step):
        r1 = min(m, r0 + step)
        acc.addmm_(x2[:, r0:r1], _noise_block(st, r0, r1, n, torch.float32, y.device))
    y.view(-1, n).add_(acc)
    return y


def _add_lowrank(st: ShadowTensor, kind: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Low-rank y += c·(the layer applied to U·Vᵀ), Z = U·Vᵀ with W viewed as m×n
    (zofast.virtual.add_lowrank with L = U, R = V)."""
    return virtual.add_lowrank(kind, x, out, *st.factors(out.dtype, out.device), alpha=st.c)


def _output_hook(st: ShadowTensor, use: Use):
    """The forward hook of a "rows" / "product" use: adds c·(the layer applied to Z)."""

    def hook(module, args, kwargs, out):
        if not st.c or st._stored is not None:  # c = 0, or W + c·Z already swapped in
            return None
        st.used = True
        x = virtual._input(args, kwargs).to(out.device)  # a device map's wrapper moves it inside
        if st.rank:
            return _add_lowrank(st, use.kind, x, out)
        if use.way == "rows":
            return _add_rows(st, x, out)
        return _add_product(st, use.kind, x, out)

    return hook


class _Temporaries:
    """One module's pre-hook (swap its tensors' W + c·Z in) and always-called forward hook
    (swap the stored tensors back), with a frame per call in progress (re-entrant calls)."""

    def __init__(self, tensors: list[ShadowTensor]):
        self.tensors = tensors
        self.frames: list[list[ShadowTensor]] = []

    def pre(self, module, args):
        swapped: list[ShadowTensor] = []
        self.frames.append(swapped)  # before any swap: the forward hook undoes a partial one
        for st in self.tensors:
            if st.c and st._stored is None:
                with torch.inference_mode(False), torch.no_grad():
                    st._swap_in()
                swapped.append(st)

    def post(self, module, args, out):
        if self.frames:
            for st in reversed(self.frames.pop()):
                st._swap_out()


def registrations(model: torch.nn.Module, tensors, kind: str) -> tuple[dict, dict]:
    """({id(child): its parent module}, {id(param): [(module, attr), ...]}) for `tensors`
    (objects with ``param`` and ``name``): every module that registers one of them. ValueError
    naming the tensors no module registers (`kind`: "shadow" or "paired", for the message)."""
    wanted = {id(st.param) for st in tensors}
    parents: dict[int, torch.nn.Module] = {}
    registered: dict[int, list] = {}
    for module in model.modules():
        for child in module.children():
            parents.setdefault(id(child), module)
        for attr, p in module._parameters.items():
            if p is not None and id(p) in wanted:
                registered.setdefault(id(p), []).append((module, attr))
    missing = [st.name for st in tensors if id(st.param) not in registered]
    if missing:
        raise ValueError(
            f"no module of the model registers {missing}: a {kind} tensor is applied by the "
            "module that owns it (train only the model's own parameters)"
        )
    return parents, registered


def plan(
    model: torch.nn.Module,
    tensors,
    *,
    product_min_numel: int | None = None,
    preset_max_numel: int | None = None,
    preset_budget: int | None = None,
):
    """Choose how each tensor is applied (sets each tensor's ``uses``; see the module docstring).

    Args:
        model: the module whose forward computes the loss.
        tensors: the :class:`ShadowTensor` objects (distinct parameters).
        product_min_numel: stock Linear / Conv1D weights with at least this many elements take
            "product" even when not tied to an embedding (None: only tied ones). Measured on an
            H200 (bf16, 2048 tokens, time added to the layer's forward): low-rank (r = 2),
            "product" wins at every size tried (8192×2048: +0.03 ms vs +0.21 for "temporary",
            and no temporary), so 0 suits LOZO; full-rank, "temporary" wins (+0.10 ms vs +0.50),
            so None suits MeZO.
        preset_max_numel: tensors that would take "temporary" with at most this many elements
            take "preset" (their copies perturbed together before the forward and swapped in
            for all of it, :class:`zofast.shadow_step.Presets`), smallest first, while the
            copies total at most this many elements or 1 % of the tensors' (None: no "preset").
        preset_budget: the elements the preset copies may total instead (an optimizer whose
            big tensors go another way, e.g. virtual mode's, passes 1 % of all it trains).

    Returns:
        `tensors`, each with ``uses`` = [:class:`Use`, ...] (one per module that registers it).

    Raises:
        ValueError: naming the tensors that no module of `model` registers, or a parameter given
            twice.

    Example:
        >>> emb = torch.nn.Embedding(10, 4)
        >>> [u.way for u in plan(emb, [ShadowTensor(0, "w", emb.weight)])[0].uses]
        ['rows']
    """
    tensors = list(tensors)
    by_id: dict[int, ShadowTensor] = {}
    for st in tensors:
        if by_id.setdefault(id(st.param), st) is not st:
            raise ValueError(f"{st.name} and {by_id[id(st.param)].name} are the same parameter")
    parents, registered = registrations(model, tensors, "shadow")
    for st in tensors:
        found = registered[id(st.param)]
        tied = any(isinstance(m, torch.nn.Embedding) and a == "weight" for m, a in found)
        big = product_min_numel is not None and st.param.numel() >= product_min_numel
        uses: list[Use] = []
        for module, attr in found:
            owner, up = module, module
            while id(up) in parents:  # MultiheadAttention reads its children's weights
                up = parents[id(up)]
                if isinstance(up, torch.nn.MultiheadAttention):
                    owner = up
            kind = None
            if owner is module and attr == "weight" and st.param.dim() == 2:
                kind = virtual.layer_kind(module)
            if kind == "embedding":
                use = Use(module, "rows", kind)
            elif kind is not None and (tied or big):
                use = Use(module, "product", kind)
            else:
                use = Use(owner, "temporary", None)
            if use not in uses:
                uses.append(use)
        st.uses = uses
    if preset_max_numel is not None:
        budget = preset_budget
        if budget is None:
            budget = max(preset_max_numel, sum(st.param.numel() for st in tensors) // 100)
        small = [
            st
            for st in tensors
            if st.param.numel() <= preset_max_numel and all(u.way == "temporary" for u in st.uses)
        ]
        for st in sorted(small, key=lambda st: st.param.numel()):
            budget -= st.param.numel()
            if budget < 0:
                break
            st.uses = [Use(model, "preset", None)]
    return tensors


class ShadowLayers:
    """The shadow tensors of one optimizer and the hooks that apply them.

    Args:
        tensors: the :class:`ShadowTensor` objects, planned (see :func:`plan`).
        owner: the optimizer (held weakly; :func:`detach` calls its ``detach()``).

    Example:
        >>> lin = torch.nn.Linear(3, 2)
        >>> layers = ShadowLayers(plan(lin, [ShadowTensor(0, "weight", lin.weight)]))
        >>> layers.attach(); layers.remove_hooks()
    """

    def __init__(self, tensors, owner=None):
        self.tensors = list(tensors)
        self._owner = None if owner is None else weakref.ref(owner)
        self._handles: list = []
        self._temporaries: list[_Temporaries] = []
        self.attached = False
        self._bulk: list | None = None  # per home: (StepFactors, DeviceSeeds, Presets)
        self._version = None  # zofast.offload_prepare.VERSION when _bulk was grouped

    @property
    def modules(self) -> list[torch.nn.Module]:
        """The hooked modules, each once ("preset" tensors hook nothing)."""
        seen: dict[int, torch.nn.Module] = {}
        for st in self.tensors:
            for use in st.uses:
                if use.way != "preset":
                    seen.setdefault(id(use.module), use.module)
        return list(seen.values())

    def set_direction(self, step: int, seeds) -> None:
        """Every tensor's direction (seeds[i] for tensors[i], as ShadowTensor.set_direction),
        with the low-rank factors and the temporaries' device seeds made in bulk."""
        for st, s in zip(self.tensors, seeds, strict=True):
            st.set_direction(step, s)
        for factors, device_seeds, _ in self._bulk_parts():
            # A streamed block's factors: before its upload (else each hook makes its own)
            offload_prepare.defer_or_run(factors.tensors, id(factors), factors.load)
            device_seeds.load()

    def set_coef(self, c: float) -> None:
        """c for every tensor (as ShadowTensor.set_coef); with c ≠ 0 the "preset" tensors'
        W + c·Z are built and swapped in until the next set_coef or :meth:`restore`."""
        parts = self._bulk_parts()
        for _, _, presets in parts:
            presets.swap_out()
            if presets.tensors:  # a streamed block's deferred swap_in, if any
                offload_prepare.cancel(presets.tensors[0].param, id(presets))
        for st in self.tensors:
            st.set_coef(c)
        for _, device_seeds, presets in parts:
            device_seeds.set_coef(c)
            if not (c and self.attached and presets.tensors):
                continue
            # A streamed block's: just before its upload (which reads the swapped-in copies)
            offload_prepare.defer_or_run(presets.tensors, id(presets), partial(presets.swap_in, c))

    def _bulk_parts(self) -> list:
        if self._bulk is None or self._version != offload_prepare.VERSION[0]:
            # per device, or per streamed block (zofast.offload_prepare)
            self._version = offload_prepare.VERSION[0]
            by_home: dict = {}
            for st in self.tensors:
                by_home.setdefault(offload_prepare.home(st.param), []).append(st)
            self._bulk = []
            for group in by_home.values():
                ways = {st: {u.way for u in st.uses} for st in group}
                self._bulk.append(
                    (
                        StepFactors(
                            [st for st in group if st.rank and ways[st] & {"rows", "product"}]
                        ),
                        DeviceSeeds([st for st in group if "temporary" in ways[st]]),
                        Presets([st for st in group if "preset" in ways[st]]),
                    )
                )
        return self._bulk

    def attach(self) -> None:
        """Register the hooks. ValueError, nothing registered, if a tensor is not planned or
        another optimizer's shadow or virtual hooks are on one of the modules (they share one
        registry, zofast.virtual's, so the two cannot stack)."""
        if self.attached:
            return
        unplanned = [st.name for st in self.tensors if not st.uses]
        if unplanned:
            raise ValueError(f"{unplanned} have no uses: call plan(model, tensors) first")
        virtual.claim(self, self.modules)
        temporaries: dict[int, tuple] = {}
        for st in self.tensors:
            for use in st.uses:
                if use.way == "temporary":
                    temporaries.setdefault(id(use.module), (use.module, []))[1].append(st)
                elif use.way != "preset":
                    hook = _output_hook(st, use)
                    self._handles.append(use.module.register_forward_hook(hook, with_kwargs=True))
        for module, owned in temporaries.values():
            pair = _Temporaries(owned)
            self._temporaries.append(pair)
            self._handles.append(module.register_forward_pre_hook(pair.pre, prepend=True))
            self._handles.append(module.register_forward_hook(pair.post, always_call=True))
        self.attached = True

    def restore(self) -> None:
        """Put the stored tensors back wherever a temporary is swapped in (after an interrupted
        forward; the hooks do it themselves when a forward raises an Exception). Idempotent."""
        for pair in self._temporaries:
            pair.frames.clear()
        for _, _, presets in self._bulk or []:
            if presets.tensors:  # a streamed block's swap_in not yet run: none now
                offload_prepare.cancel(presets.tensors[0].param, id(presets))
        for st in self.tensors:
            st._swap_out()

    @property
    def swapped(self) -> bool:
        """Whether any temporary is swapped in right now (False between forwards)."""
        return any(st.swapped for st in self.tensors)

    def used(self) -> list[ShadowTensor]:
        """The tensors that a forward perturbed (with c ≠ 0) since :meth:`reset_usage`."""
        return [st for st in self.tensors if st.used]

    def reset_usage(self) -> None:
        for st in self.tensors:
            st.used = False

    def remove_hooks(self) -> None:
        """Restore, then remove the hooks; the model is plain again."""
        self.restore()
        for handle in self._handles:
            handle.remove()
        self._handles, self._temporaries = [], []
        virtual.release(self, self.modules)
        self.attached = False

    def owner(self):
        return None if self._owner is None else self._owner()


def detach(model: torch.nn.Module) -> None:
    """Remove every shadow-mode and virtual-mode optimizer's hooks from `model`.

    Where the optimizer still exists this is its ``detach()``; a shadow set whose optimizer is
    gone is restored and unhooked (nothing is pending in shadow mode); virtual ones are handled by
    :func:`zofast.virtual.detach` (which folds their pending updates in).

    Example:
        >>> detach(torch.nn.Linear(4, 2))  # nothing hooked: nothing to do
    """
    for layers in [s for s in virtual.hook_sets(model) if isinstance(s, ShadowLayers)]:
        opt = layers.owner()
        if opt is not None:
            opt.detach()
        else:
            layers.remove_hooks()
    virtual.detach(model)
