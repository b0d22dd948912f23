"""Population-batched evaluation of one layer's candidate low-rank updates.

A generation of DFO-LoRA is ``P`` candidate updates of one layer ``l``; every other layer keeps
its incumbent. The loss of each candidate on the training batch is computed here in one batched
forward (or a few, see ``max_candidates``):

1. The hidden states entering layer ``l`` do not depend on the candidates: they are computed
   once, on the ``N`` rows of the batch, and cached. The cache is incremental: the input of layer
   ``l`` is made from the cached input of layer ``l - 1`` by running that one layer, and a cached
   input is valid while no layer below it has changed its incumbent (checked with
   :attr:`LowRankHooks.version`). Visiting layers in order therefore costs one layer on ``N`` rows
   per generation for the part below ``l``.
2. Those hidden states are repeated ``P`` times along the batch dimension (copy-major, like
   :meth:`zofast.encoding.Batch.repeat`) and layers ``l .. L-1`` run on the ``P·N`` rows, layer
   ``l`` with candidate ``p``'s update on the rows of copy ``p`` (:class:`LowRankHooks`
   population mode), then the base model's final modules and :meth:`Scorer.head_logits`.

Calling transformers' layer modules directly is version-sensitive (positional or keyword
arguments, attention-mask formats, rotary embeddings, per-layer masks). Nothing here hard-codes
those: the evaluator runs the base model once on the batch and once on the batch repeated twice
with a forward pre-hook on every layer, and records the exact arguments each layer received.
Arguments equal in both runs are reused as they are; tensors whose first dimension doubled and
whose second-run value is the first-run value repeated twice are batch-shaped and are repeated
``P`` times for a population. Then a self-check replays every layer from the recorded input of
layer 0 and compares the result with the model's own ``last_hidden_state`` (once with one copy,
once with two). If anything does not fit this scheme (an argument that is neither shared nor
batch-shaped, a mismatch in the self-check), the evaluator falls back to ``mode="full"``: the
whole model runs on the repeated batch (still one batched forward per generation, without the
cache of step 1). ``mode="sequential"`` is the published code's loop, one forward of the whole
model per candidate, kept as the reference.

Three more savings apply to the batched modes (``replay`` and ``full``), never to the
reference loop:

3. *Last layer on the scored rows only* (``trim=True``, label-word scorers: ``mlm`` and
   ``causal``, whose head reads one position per example). In the last layer, everything after
   the attention acts on each token separately and reaches the output through a residual sum:
   forward pre-hooks on the modules listed in :attr:`Architecture.tail_names` cut their inputs
   from ``(rows, L, D)`` to the scored positions ``(rows, 1, D)``, and the residual sum
   broadcasts the result back, so the last hidden state is exact at the scored positions (the
   only ones read) and meaningless elsewhere. That removes the attention output projection and
   the feed-forward block of the last layer for all but one token per row (about 3/4 of a
   layer's FLOPs). A self-check at construction compares trimmed and untrimmed logits; on a
   mismatch the trim stays off (:attr:`PopulationEvaluator.trim_reason` says why). Encoder
   scorers (mean pooling) read every token and are never trimmed.
4. *One kernel for the tanh-GELU* (``fuse_activations=True``): transformers' ``gelu_new``
   (``NewGELUActivation``, GPT-2) and ``gelu_fast`` (``FastGELUActivation``) evaluate
   ``0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`` with about eight elementwise kernels, each a
   full pass over the ``(P·N, L, 4·D)`` intermediate activations; during a batched evaluation
   those modules compute the same function with ``F.gelu(x, approximate="tanh")``, one pass.
   The results differ from the module's own by rounding only.
5. *Incumbents merged into the weights* (``merge=True``): every layer but the searched one has
   a fixed update during a generation; :meth:`LowRankHooks.merged` swaps in ``W + A·B`` (one
   copy per module, cached until the layer's incumbent changes; the model's own weights are
   never written) so those layers make one product instead of the projection plus the hook's
   skinny ``x·A``, ``(x·A)·B`` and a pass over the output. Measured on the H200 before this
   step, the hooks of the layers above the searched one took 16 % (RoBERTa-large shape) and
   12 % (GPT-2-large shape) of a generation's GPU time. Equal to the hooks up to rounding (the
   merged weight is rounded once to the model's dtype).

Example:
    >>> ev = PopulationEvaluator(scorer, arch, hooks, [scorer.encode(train)])
    >>> losses = ev.losses(3, {"query": (A, B), "key": (A2, B2)})  # A: (P, D, r), B: (P, r, D)
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from zofast.dfo.arch import Architecture, LowRankHooks
from zofast.encoding import Batch

__all__ = ["PopulationEvaluator", "clipped_std", "MODES", "CLIP_ROUNDS", "CLIP_SIGMAS"]

MODES = ("auto", "replay", "full", "sequential")
"""Evaluation modes: see the module docstring (``auto`` = ``replay`` if it passes its check)."""

CLIP_ROUNDS = 3
"""How many times :func:`clipped_std` clips the values to ``mean ± CLIP_SIGMAS · std``."""

CLIP_SIGMAS = 3.0
"""Half-width of the clipping interval of :func:`clipped_std`, in standard deviations."""

_CHECK_TOL = {torch.float32: 1e-4, torch.float64: 1e-8}
"""Relative tolerance of the replay self-check per dtype (2e-2 for 16-bit floats)."""


_TANH_GELU_MODULES = ("NewGELUActivation", "FastGELUActivation")
"""transformers activation modules that compute the tanh-approximated GELU in several kernels."""


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


class _Unsupported(Exception):
    """The recorded layer arguments cannot be replayed for a population."""


def clipped_std(values: torch.Tensor) -> float:
    """Standard deviation after clipping outliers, as BBTv2 does for its projection init.

    ``CLIP_ROUNDS`` times: ``v = clamp(v, mean(v) - CLIP_SIGMAS·std(v), mean(v) +
    CLIP_SIGMAS·std(v))``; then ``std(v)`` (float32 arithmetic, population std).

    Args:
        values: any tensor (flattened).

    Returns:
        The clipped standard deviation.

    Example:
        >>> values = torch.tensor([0.0, 1.0] * 50 + [10.0])  # plain std 1.064
        >>> round(clipped_std(values), 4)  # the outlier pulled in to mean + 3 std, three times
        0.5223
    """
    v = values.detach().reshape(-1).float()
    if v.numel() < 2:
        raise ValueError("clipped_std needs at least two values")
    for _ in range(CLIP_ROUNDS):
        mu, sd = v.mean(), v.std(unbiased=False)
        v = v.clamp(float(mu - CLIP_SIGMAS * sd), float(mu + CLIP_SIGMAS * sd))
    return float(v.std(unbiased=False))


def _module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name) if name else model


def _plan(a: Any, b: Any) -> Any:
    """Compare one recorded argument of the 1-copy and the 2-copy runs (see module docstring)."""
    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor) or a.dim() != b.dim():
            raise _Unsupported("tensor argument changed type or rank")
        if a.shape == b.shape:
            if torch.equal(a, b):
                return ("shared", a)
            raise _Unsupported(f"argument of shape {tuple(a.shape)} depends on the batch")
        doubled = a.dim() >= 1 and b.shape[0] == 2 * a.shape[0] and b.shape[1:] == a.shape[1:]
        if doubled and torch.equal(b, torch.cat([a, a])):
            return ("batch", a)
        raise _Unsupported(f"argument of shape {tuple(a.shape)} is not batch-major")
    if isinstance(a, (tuple, list)):
        if type(a) is not type(b) or len(a) != len(b):
            raise _Unsupported("sequence argument changed")
        return ("seq", type(a), [_plan(x, y) for x, y in zip(a, b, strict=True)])
    if isinstance(a, dict):
        if type(a) is not type(b) or set(a) != set(b):
            raise _Unsupported("dict argument changed")
        return ("dict", type(a), {k: _plan(a[k], b[k]) for k in a})
    if a is None or isinstance(a, (bool, int, float, str)):
        if a != b:
            raise _Unsupported(f"argument {a!r} changed to {b!r}")
        return ("const", a)
    if a is b:
        return ("const", a)
    raise _Unsupported(f"cannot replay an argument of type {type(a).__name__}")


class _Record:
    """Arguments of every layer recorded by a pre-hook during one forward of the base model."""

    def __init__(self, num_layers: int):
        self.args: list[tuple | None] = [None] * num_layers
        self.kwargs: list[dict | None] = [None] * num_layers
        self.positional: list[bool] = [True] * num_layers
        self.output: torch.Tensor | None = None


def _model_inputs(base: nn.Module, batch: Batch) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    if batch.token_type_ids is not None:
        kwargs["token_type_ids"] = batch.token_type_ids
    params = inspect.signature(base.forward).parameters
    if "use_cache" in params:
        kwargs["use_cache"] = False
    return kwargs


class _Part:
    """One batch (a length bucket) with its recorded layer arguments and input cache."""

    def __init__(self, batch: Batch, weight: float):
        self.batch = batch
        self.weight = weight
        self.plans: list[tuple[Any, Any]] | None = None
        self.positional: list[bool] = []
        self.inputs: list[torch.Tensor | None] = []
        self.versions: list[tuple[int, ...] | None] = []
        self.repeated: dict[int, Batch] = {}
        self.expanded: dict[tuple[int, int], torch.Tensor] = {}
        self.token_values: list[torch.Tensor] = []

    def batch_for(self, copies: int) -> Batch:
        if copies == 1:
            return self.batch
        if copies not in self.repeated:
            self.repeated = {copies: self.batch.repeat(copies)}
        return self.repeated[copies]


class PopulationEvaluator:
    """Losses of many candidate updates of one layer on fixed training batches.

    Args:
        scorer: a :class:`zofast.scoring.Scorer` (anything with ``model`` and
            ``head_logits(hidden, batch)``) of the model the hooks are on.
        arch: the model's :class:`~zofast.dfo.arch.Architecture`.
        hooks: the :class:`~zofast.dfo.arch.LowRankHooks` on the model.
        batches: the training examples as one or more batches (e.g. length buckets); the loss is
            the mean cross-entropy over all their examples.
        mode: ``"auto"``, ``"replay"``, ``"full"`` or ``"sequential"`` (module docstring).
        record_inputs: keep the hidden states entering every layer on the real tokens of the
            first forward (for :meth:`input_stds`).
        trim: run the last layer's per-token tail on the scored rows only in batched modes
            (module docstring, step 3), when the scorer and architecture allow it.
        fuse_activations: one-kernel tanh-GELU in batched modes (module docstring, step 4).
        merge: in batched modes, layers other than the searched one run with their incumbent
            merged into the weights (module docstring, step 5).

    Raises:
        ValueError: on an unknown mode, no batches, or ``mode="replay"`` on a model whose layer
            arguments cannot be replayed.

    Example:
        >>> ev = PopulationEvaluator(scorer, arch, hooks, [batch])
        >>> ev.mode
        'replay'
    """

    def __init__(
        self,
        scorer: Any,
        arch: Architecture,
        hooks: LowRankHooks,
        batches: Sequence[Batch],
        *,
        mode: str = "auto",
        record_inputs: bool = False,
        trim: bool = True,
        fuse_activations: bool = True,
        merge: bool = True,
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        batches = list(batches)
        if not batches:
            raise ValueError("PopulationEvaluator needs at least one batch")
        self.scorer = scorer
        self.model = scorer.model
        self.arch = arch
        self.hooks = hooks
        self.base = _module(self.model, arch.base_name)
        self.layers = _module(self.model, arch.layers_name)
        self.finals = [_module(self.model, name) for name in arch.final_names]
        self.num_layers = arch.num_layers
        total = sum(b.num_examples for b in batches)
        self.parts = [_Part(b, b.num_examples / total) for b in batches]
        self.requested_mode = mode
        self.fallback_reason: str | None = None
        with torch.no_grad():
            for part in self.parts:
                self._prepare(part, record_inputs)
        if mode == "auto":
            self.mode = "full" if self.fallback_reason else "replay"
        elif mode == "replay" and self.fallback_reason:
            raise ValueError(f"cannot replay the layers of this model: {self.fallback_reason}")
        else:
            self.mode = mode
        self.fuse_activations = bool(fuse_activations)
        self.merge = bool(merge)
        self._activations = [
            m for m in self.model.modules() if type(m).__name__ in _TANH_GELU_MODULES
        ]
        self.trimmed = False
        self.trim_reason: str | None = None
        if not trim:
            self.trim_reason = "disabled"
        elif self.mode == "sequential":
            self.trim_reason = "the sequential reference loop runs the whole model"
        elif getattr(scorer, "kind", None) not in ("mlm", "causal"):
            self.trim_reason = "the scorer reads every token (mean pooling)"
        elif not arch.tail_names:
            self.trim_reason = "no per-token tail modules known for this architecture"
        else:
            with torch.no_grad():
                self.trim_reason = self._check_trim(self.parts[0])
            self.trimmed = self.trim_reason is None

    # ------------------------------------------------------------------ batched-mode savings
    @contextlib.contextmanager
    def fused_activations(self) -> Iterator[None]:
        """Within the block, tanh-GELU modules compute ``F.gelu(x, approximate="tanh")``.

        Example:
            >>> with ev.fused_activations():
            ...     hidden = ev.model.base_model(**inputs).last_hidden_state
        """
        for m in self._activations:
            m.forward = _gelu_tanh
        try:
            yield
        finally:
            for m in self._activations:
                m.__dict__.pop("forward", None)

    @contextlib.contextmanager
    def _trimmed(self, batch: Batch) -> Iterator[None]:
        rows = batch.num_rows
        width = batch.input_ids.shape[1]
        row_index = torch.arange(rows, device=batch.positions.device)
        positions = batch.positions

        def pre_hook(module, args):
            if not args:
                return None
            h = args[0]
            if not isinstance(h, torch.Tensor) or h.dim() != 3 or h.shape[:2] != (rows, width):
                return None
            return (h[row_index, positions].unsqueeze(1), *args[1:])

        handles = [
            self.model.get_submodule(name).register_forward_pre_hook(pre_hook)
            for name in self.arch.tail_names
        ]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _check_trim(self, part: _Part) -> str | None:
        """Logits with and without the trimmed last layer (2 copies); a reason if they differ."""
        batch = part.batch_for(2)
        if batch.positions.numel() != batch.num_rows:
            return "the batch has rows that are not scored examples"
        hidden = self._batched_hidden(part, 0, 2, trim=False)
        ref = self.scorer.head_logits(hidden, batch)
        try:
            out = self.scorer.head_logits(self._batched_hidden(part, 0, 2, trim=True), batch)
        except Exception as err:  # a module that is not per-token breaks the layer's shapes
            return f"the trimmed last layer fails: {type(err).__name__}: {err}"
        tol = _CHECK_TOL.get(hidden.dtype, 2e-2)
        err = float((out - ref).abs().max())
        if not err <= tol * (float(ref.abs().max()) + 1.0):
            return f"the trimmed last layer changes the logits by {err:.3g}"
        return None

    # ----------------------------------------------------------------- recording and replay
    def _record(self, batch: Batch, on_input: Callable[[int, torch.Tensor], None] | None):
        rec = _Record(self.num_layers)

        def make_hook(i: int):
            def pre_hook(module, args, kwargs):
                if args:
                    hidden, rest, rec.positional[i] = args[0], tuple(args[1:]), True
                else:
                    kwargs = dict(kwargs)
                    hidden, rest, rec.positional[i] = kwargs.pop("hidden_states"), (), False
                rec.args[i] = rest
                rec.kwargs[i] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                if on_input is not None:
                    on_input(i, hidden)

            return pre_hook

        handles = [
            layer.register_forward_pre_hook(make_hook(i), with_kwargs=True)
            for i, layer in enumerate(self.layers)
        ]
        try:
            out = self.base(**_model_inputs(self.base, batch))
        finally:
            for h in handles:
                h.remove()
        rec.output = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return rec

    def _prepare(self, part: _Part, record_inputs: bool) -> None:
        mask = part.batch.attention_mask.bool()
        h0: list[torch.Tensor] = []

        def on_input(i: int, hidden: torch.Tensor) -> None:
            if i == 0:
                h0.append(hidden)
            if record_inputs:
                part.token_values.append(hidden[mask].detach())

        rec1 = self._record(part.batch, on_input)
        part.inputs = [h0[0]] + [None] * self.num_layers
        part.versions = [()] + [None] * self.num_layers
        if self.fallback_reason is not None or self.requested_mode in ("full", "sequential"):
            return
        rec2 = self._record(part.batch.repeat(2), None)
        try:
            part.positional = list(rec1.positional)
            if rec1.positional != rec2.positional:
                raise _Unsupported("the hidden states moved between args and kwargs")
            part.plans = [
                (_plan(rec1.args[i], rec2.args[i]), _plan(rec1.kwargs[i], rec2.kwargs[i]))
                for i in range(self.num_layers)
            ]
            for copies, reference in ((1, rec1.output), (2, rec2.output)):
                h = h0[0].repeat(copies, *([1] * (h0[0].dim() - 1)))
                for i in range(self.num_layers):
                    h = self._run_layer(part, i, h, copies)
                h = self._final(h)
                tol = _CHECK_TOL.get(h.dtype, 2e-2)
                scale = float(reference.abs().max()) + 1.0
                err = float((h.float() - reference.float()).abs().max())
                if not err <= tol * scale:
                    raise _Unsupported(
                        f"replayed layers differ from the model's forward by {err:.3g} "
                        f"({copies} cop{'y' if copies == 1 else 'ies'})"
                    )
        except _Unsupported as err:
            part.plans = None
            self.fallback_reason = str(err)

    def _materialise(self, part: _Part, spec: Any, copies: int) -> Any:
        kind = spec[0]
        if kind == "const" or kind == "shared":
            return spec[1]
        if kind == "batch":
            t = spec[1]
            if copies == 1:
                return t
            key = (id(t), copies)
            if key not in part.expanded:
                part.expanded[key] = t.repeat(copies, *([1] * (t.dim() - 1)))
            return part.expanded[key]
        if kind == "seq":
            return spec[1](self._materialise(part, s, copies) for s in spec[2])
        return spec[1]((k, self._materialise(part, s, copies)) for k, s in spec[2].items())

    def _run_layer(self, part: _Part, i: int, h: torch.Tensor, copies: int) -> torch.Tensor:
        args_spec, kwargs_spec = part.plans[i]
        args = self._materialise(part, args_spec, copies)
        kwargs = self._materialise(part, kwargs_spec, copies)
        if part.positional[i]:
            out = self.layers[i](h, *args, **kwargs)
        else:
            out = self.layers[i](*args, hidden_states=h, **kwargs)
        return out if isinstance(out, torch.Tensor) else out[0]

    def _final(self, h: torch.Tensor) -> torch.Tensor:
        for module in self.finals:
            h = module(h)
        return h

    def _layer_input(self, part: _Part, layer: int) -> torch.Tensor:
        version = self.hooks.version

        def valid(i: int) -> bool:
            return part.inputs[i] is not None and part.versions[i] == tuple(version[:i])

        k = layer
        while k > 0 and not valid(k):
            k -= 1
        h = part.inputs[k]
        for i in range(k, layer):
            h = self._run_layer(part, i, h, 1)
            part.inputs[i + 1] = h
            part.versions[i + 1] = tuple(version[: i + 1])
        return h

    # ------------------------------------------------------------------------------ losses
    def _ce(self, hidden: torch.Tensor, batch: Batch, copies: int) -> torch.Tensor:
        logits = self.scorer.head_logits(hidden, batch)
        ce = F.cross_entropy(logits, batch.labels, reduction="none")
        return ce.view(copies, batch.num_examples).mean(dim=1)

    def _full_hidden(self, batch: Batch) -> torch.Tensor:
        out = self.base(**_model_inputs(self.base, batch))
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def _batched_hidden(self, part: _Part, layer: int, copies: int, trim: bool) -> torch.Tensor:
        """Last hidden state of ``copies`` stacked copies (replay or full mode)."""
        batch = part.batch_for(copies)
        fused = self.fused_activations() if self.fuse_activations else contextlib.nullcontext()
        trimmed = self._trimmed(batch) if trim else contextlib.nullcontext()
        merged = self.hooks.merged(skip=layer) if self.merge else contextlib.nullcontext()
        if self.mode == "replay":
            h = self._layer_input(part, layer)
            h = h.repeat(copies, *([1] * (h.dim() - 1)))
            with fused, trimmed, merged:
                for i in range(layer, self.num_layers):
                    h = self._run_layer(part, i, h, copies)
                return self._final(h)
        with fused, trimmed, merged:
            return self._full_hidden(batch)

    def _part_losses(self, part: _Part, layer: int, mats, copies: int) -> torch.Tensor:
        batch = part.batch_for(copies)
        self.hooks.set_population(layer, mats)
        try:
            hidden = self._batched_hidden(part, layer, copies, self.trimmed)
        finally:
            self.hooks.set_population(layer, None)
        return self._ce(hidden, batch, copies)

    @torch.no_grad()
    def losses(
        self, layer: int, mats: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
    ) -> torch.Tensor:
        """Mean cross-entropy of each candidate update of ``layer`` (others at their incumbents).

        Args:
            layer: the layer being searched.
            mats: ``{name: (A, B)}`` with ``A`` ``(P, D_in, r)`` and ``B`` ``(P, r, D_out)`` in the
                model's dtype and device.

        Returns:
            ``(P,)`` float32 losses on the model's device.

        Example:
            >>> ev.losses(0, {"query": (A, B), "key": (A2, B2)}).shape
            torch.Size([20])
        """
        if self.mode == "sequential":
            return self.sequential_losses(layer, mats)
        copies = next(iter(mats.values()))[0].shape[0]
        return self._part_sum(layer, mats, copies)

    def _part_sum(self, layer: int, mats, copies: int) -> torch.Tensor:
        total = None
        for part in self.parts:
            loss = part.weight * self._part_losses(part, layer, mats, copies)
            total = loss if total is None else total + loss
        return total

    @torch.no_grad()
    def sequential_losses(
        self, layer: int, mats: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
    ) -> torch.Tensor:
        """The reference loop: one forward of the whole model per candidate.

        Each candidate's update is applied alone (population mode with ``P = 1``) and
        ``model.base_model`` runs on the unrepeated batches, as the published code does.

        Args:
            layer, mats: as for :meth:`losses`.

        Returns:
            ``(P,)`` float32 losses.

        Example:
            >>> torch.allclose(ev.sequential_losses(0, mats), ev.losses(0, mats), atol=1e-5)
            True
        """
        copies = next(iter(mats.values()))[0].shape[0]
        out = []
        for p in range(copies):
            single = {k: (a[p : p + 1], b[p : p + 1]) for k, (a, b) in mats.items()}
            total = None
            for part in self.parts:
                self.hooks.set_population(layer, single)
                try:
                    hidden = self._full_hidden(part.batch)
                finally:
                    self.hooks.set_population(layer, None)
                loss = part.weight * self._ce(hidden, part.batch, 1)
                total = loss if total is None else total + loss
            out.append(total)
        return torch.cat(out)

    @torch.no_grad()
    def current_loss(self) -> float:
        """Loss of the model as it is (every layer at its incumbent), reusing the input cache.

        Returns:
            The mean cross-entropy over all examples.

        Example:
            >>> ev.current_loss()
            0.693...
        """
        total = 0.0
        for part in self.parts:
            if self.mode == "replay":
                hidden = self._final(self._layer_input(part, self.num_layers))
            else:
                hidden = self._full_hidden(part.batch)
            total += part.weight * float(self._ce(hidden, part.batch, 1)[0])
        return total

    def input_stds(self) -> list[float]:
        """Clipped std (:func:`clipped_std`) of the hidden states entering each layer.

        Computed over the real (non-pad) tokens of all batches, from the first forward (made
        with the updates that were active when the evaluator was built); needs
        ``record_inputs=True``. The recorded values are released.

        Returns:
            One float per layer.

        Example:
            >>> PopulationEvaluator(scorer, arch, hooks, [b], record_inputs=True).input_stds()[1]
            0.59...
        """
        if not all(len(p.token_values) == self.num_layers for p in self.parts):
            raise ValueError("build the evaluator with record_inputs=True to get input stds")
        out = []
        for i in range(self.num_layers):
            out.append(clipped_std(torch.cat([p.token_values[i].reshape(-1) for p in self.parts])))
        for p in self.parts:
            p.token_values = []
        return out
