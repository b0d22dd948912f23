"""The hooks of a paired step: one forward over the batch stacked twice, its first half seeing
W + ε·Z and its second half W − ε·Z, while the stored weights are never written.

A paired step (:mod:`zofast.optim.paired`) runs the model once on 2·B rows: rows 0 .. B − 1 are
the batch and rows B .. 2B − 1 the same batch again. Every trained tensor is applied with a
per-row coefficient c_i, +ε on the first half and −ε on the second, so the first copy's loss is
L+ and the second's L−. Each (module, tensor) pair takes one of five ways, chosen by :func:`plan`:

* ``"product"`` (a low-rank matrix used as the weight of a stock ``nn.Linear`` or GPT-2
  ``Conv1D``) and ``"rows"`` (of a stock ``nn.Embedding``): y_i += c_i·(the layer applied to
  U·Vᵀ), zofast.shadow's low-rank product with the rank-r side's second half negated;
* ``"bias"`` (the bias of a stock Linear / Conv1D): y_i += (b ± ε·z) − b, where b ± ε·z is the
  perturbed bias rounded to the weights' dtype bit for bit as a two-forward step's temporary;
  ``"fused"`` where the Linear's weight is virtual: the same differences, added by the weight's
  own product (one more column of its factors, :class:`zofast.paired_ways.SignedFactors`);
* ``"norm"`` (the weight / bias of a stock ``nn.LayerNorm`` or ``nn.RMSNorm``): with a trained
  weight the module runs with its affine parameters swapped for ones and zeros, so it returns
  the normalised input x̂ (which does not depend on them), and y_i = x̂_i ⊙ (γ ± ε·z_γ) +
  (β ± ε·z_β), the perturbed values again those of a two-forward step; with a trained bias
  alone, y_i += (β ± ε·z_β) − β;
* ``"split"`` (anything else, e.g. OPT's learned positional embedding, whose ``forward`` is its
  own): the module runs with the temporary W + ε·Z swapped in, then once more with W − ε·Z, and
  the second run's second half of the rows replaces the first run's. Correct for any module
  whose output rows follow the batch's, at twice that module's cost.

LOZO's virtual tensors (:mod:`zofast.virtual`) go through :class:`PairedVirtualLayers`:
y_i += (x_i·R)·L_iᵀ with L_i = A ± ε·U (on a V-refresh step [A | ±ε·U], R = [V_A | V]), the two
L's stacked and applied by one batched product (two launches per layer; the factors of all
tensors made in a few launches per forward); with c = 0 (between steps) the hooks are virtual
mode's own, applying the pending A·V_Aᵀ. Both halves apply the same pending A.

Each half equals the layer with weight W ± ε·Z up to the rounding of the forward (a two-forward
step's, except that "norm" rounds x̂ to the output's dtype before the affine step and "bias"
adds its difference after the layer's own bias).

Rows. A hooked layer's output must have the stacked batch as its first dimension, or its tokens
flattened batch-major (OPT's MLP takes a (2B·L, d) input), so that its first half belongs to the
first copy. The stacked batch's size 2B is learnt in each paired forward from the first hooked
output with three or more dimensions; an output whose first dimension is 1 (a positional
embedding broadcast over the batch, as BERT's and GPT-2's) is expanded to 2B rows, each copy with
its own perturbation. Any other first dimension raises ValueError in the forward (the step is
then aborted, the weights bit-identical). Sequence-first layouts, (seq, batch, dim), are not
supported: a sequence length equal to 2B would go unnoticed.

The hooks are for ``no_grad`` / ``inference_mode`` forwards (ZO), not for backward.

Memory: "product" / "rows" as shadow mode; the virtual L± (2·m·r per tensor in the output's
dtype, padded to 8 columns on a GPU); "bias" / "norm" three float copies of the small tensors
(+, −, and their differences); "split" the module's two temporaries and a second output.

Example:
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    >>> tensors = [ShadowTensor(i, n, p, rank=1 if p.dim() == 2 else 0)
    ...            for i, (n, p) in enumerate(model.named_parameters())]
    >>> layers = PairedShadowLayers(plan(model, tensors), Rows()); layers.attach()
    >>> layers.set_direction(0, [(11, 12), (13,), (14,), (15,)]); layers.set_coef(1e-3)
    >>> with torch.no_grad():  # ZO forwards: no autograd through the hooks
    ...     y = model(torch.ones(2, 3, 4))  # y[0] at W + 1e-3·Z, y[1] at W − 1e-3·Z
    >>> layers.remove_hooks()
"""

from __future__ import annotations

import torch

from zofast import offload_prepare
from zofast import virtual as virtual_mode
from zofast.offload_prepare import cancel, defer, defer_or_run
from zofast.paired_ways import (
    NormHooks,
    Rows,
    SignedFactors,
    SmallValues,
    SplitHooks,
    bias_hook,
    lowrank_hook,
    virtual_hook,
)
from zofast.shadow import ShadowLayers, ShadowTensor, Use, registrations
from zofast.shadow_step import StepFactors
from zofast.virtual import VirtualLayers, VirtualTensor, layer_kind

__all__ = ["WAYS", "PairedShadowLayers", "PairedVirtualLayers", "Rows", "plan"]

WAYS = ("product", "rows", "bias", "fused", "norm", "split")


class PairedVirtualLayers(VirtualLayers):
    """A paired optimizer's virtual tensors and their hooks (see the module docstring).

    Args:
        tensors: the :class:`zofast.virtual.VirtualTensor` objects.
        rows: the optimizer's :class:`Rows`.
        owner: the optimizer (held weakly).
    """

    def __init__(self, tensors: list[VirtualTensor], rows: Rows, owner=None):
        super().__init__(tensors, owner)
        self.rows = rows
        self.factors = SignedFactors(self.tensors)

    def fuse_biases(self, shadow: PairedShadowLayers) -> None:
        """Apply the bias of each Linear whose weight is virtual (and used by that Linear alone)
        in the weight's own product, instead of through a "bias" hook of its own: its way
        becomes "fused" (before attach)."""
        by_param = {id(st.param): st for st in shadow.tensors}
        for vt in self.tensors:
            if len(vt.layers) != 1 or vt.layers[0][1] != "linear":
                continue
            module = vt.layers[0][0]
            st = by_param.get(id(getattr(module, "bias", None)))
            if st is not None and st.uses == [Use(module, "bias", "linear")]:
                st.uses = [Use(module, "fused", "linear")]
                self.factors.fused[id(vt)] = (st, shadow.values)

    def prepare(self, tensors) -> None:
        """Make the deferred directions of `tensors` (one streamed block's) and, in a paired
        forward, their paired factors."""
        super().prepare(tensors)
        if tensors and tensors[0].c:
            self.factors.prepare(tensors, self.rows.generation)

    def attach(self) -> None:
        if self.attached:
            return
        virtual_mode.claim(self, self.modules)
        for vt in self.tensors:
            for module, kind in vt.layers:
                hook = virtual_hook(vt, kind, self.rows, self.factors)
                self._handles.append(module.register_forward_hook(hook, with_kwargs=True))
        self.attached = True


def _norm_module(module: torch.nn.Module) -> bool:
    """A stock nn.LayerNorm or nn.RMSNorm (forward not overridden)."""
    if "forward" in vars(module):
        return False
    cls = type(module)
    if isinstance(module, torch.nn.LayerNorm):
        return cls.forward is torch.nn.LayerNorm.forward
    rms = getattr(torch.nn, "RMSNorm", None)
    return rms is not None and isinstance(module, rms) and cls.forward is rms.forward


def plan(model: torch.nn.Module, tensors):
    """Choose each tensor's paired ways (sets each tensor's ``uses``; see the module docstring).

    Args:
        model: the module whose forward the closure runs.
        tensors: the :class:`zofast.shadow.ShadowTensor` objects (distinct parameters).

    Returns:
        `tensors`, each with ``uses`` = [:class:`zofast.shadow.Use`, ...], ways in WAYS.

    Raises:
        ValueError: a parameter given twice, a tensor no module of `model` registers, or a
            matrix with full-rank noise (which no layer can apply per row cheaply).

    Example:
        >>> lin = torch.nn.Linear(3, 2)
        >>> st = [ShadowTensor(0, "weight", lin.weight, rank=1), ShadowTensor(1, "bias", lin.bias)]
        >>> [u.way for t in plan(lin, st) for u in t.uses]
        ['product', 'bias']
    """
    tensors = list(tensors)
    by_id: dict[int, ShadowTensor] = {}
    for st in tensors:
        if by_id.setdefault(id(st.param), st) is not st:
            raise ValueError(f"{st.name} and {by_id[id(st.param)].name} are the same parameter")
    full = [st.name for st in tensors if st.param.dim() >= 2 and not st.rank]
    if full:
        raise ValueError(
            f"paired steps apply matrices as low-rank products: {full[:5]} have full-rank noise "
            "(pair LOZO / LOZO-M; MeZO takes two forwards)"
        )
    parents, registered = registrations(model, tensors, "paired")
    for st in tensors:
        uses: list[Use] = []
        for module, attr in registered[id(st.param)]:
            owner, up = module, module
            while id(up) in parents:  # MultiheadAttention reads its children's weights
                up = parents[id(up)]
                if isinstance(up, torch.nn.MultiheadAttention):
                    owner = up
            kind = layer_kind(module) if owner is module else None
            if kind is not None and attr == "weight" and st.param.dim() == 2:
                use = Use(module, "rows" if kind == "embedding" else "product", kind)
            elif kind in ("linear", "conv1d") and attr == "bias":
                use = Use(module, "bias", kind)
            elif owner is module and attr in ("weight", "bias") and _norm_module(module):
                use = Use(module, "norm", None)
            else:
                use = Use(owner, "split", None)
            if use not in uses:
                uses.append(use)
        st.uses = uses
    return tensors


class PairedShadowLayers(ShadowLayers):
    """A paired optimizer's non-virtual tensors and their hooks (see the module docstring).

    Args:
        tensors: the :class:`zofast.shadow.ShadowTensor` objects, planned by :func:`plan`.
        rows: the optimizer's :class:`Rows`.
        owner: the optimizer (held weakly).
    """

    def __init__(self, tensors, rows: Rows, owner=None):
        super().__init__(tensors, owner)
        self.rows = rows
        self._norms: list[NormHooks] = []
        self._splits: list[SplitHooks] = []
        self._parts: dict | None = None  # home -> (StepFactors, SmallValues)
        self._version = None  # zofast.offload_prepare.VERSION when _parts were grouped

    def _device_parts(self) -> dict:
        """{home: (StepFactors, SmallValues)}, a home being a device or a streamed block
        (zofast.offload_prepare.home: a block's tensor is on another device during its
        forward, and its part is made just before its upload)."""
        if self._parts is None or self._version != offload_prepare.VERSION[0]:
            self._version = offload_prepare.VERSION[0]
            self._home = {id(st): offload_prepare.home(st.param) for st in self.tensors}
            by_home: dict = {}
            for st in self.tensors:
                by_home.setdefault(self._home[id(st)], []).append(st)
            self._parts = {}
            for where, group in by_home.items():
                ways = {id(st): {u.way for u in st.uses} for st in group}
                lowrank = [st for st in group if st.rank and ways[id(st)] & {"product", "rows"}]
                small = [st for st in group if ways[id(st)] & {"bias", "norm", "fused"}]
                self._parts[where] = (StepFactors(lowrank), SmallValues(small))
        return self._parts

    def values(self, st: ShadowTensor) -> SmallValues:
        parts = self._device_parts()
        return parts[self._home[id(st)]][1]

    def set_direction(self, step: int, seeds) -> None:
        """Every tensor's direction (seeds[i] for tensors[i]); low-rank factors made in bulk."""
        for st, s in zip(self.tensors, seeds, strict=True):
            st.set_direction(step, s)
        for factors, _ in self._device_parts().values():
            # A block's: before its upload (else its hooks make each tensor's, the same numbers)
            defer_or_run(factors.tensors, id(factors), factors.load)

    def set_coef(self, c: float) -> None:
        """c for every tensor; with c ≠ 0 the "bias" and "norm" tensors' W ± c·Z are made (a
        streamed block's before its upload, or at their first read)."""
        for st in self.tensors:
            st.set_coef(c)
        for _, values in self._device_parts().values():
            if not values.tensors:
                continue
            if not (c and self.attached):
                cancel(values.tensors[0].param, id(values))
            elif defer(values.tensors[0].param, id(values), values.make):
                values.build(c, now=False)
            else:
                values.build(c)

    def attach(self) -> None:
        """Register the hooks (ValueError, nothing registered, as ShadowLayers.attach)."""
        if self.attached:
            return
        unplanned = [st.name for st in self.tensors if not st.uses]
        if unplanned:
            raise ValueError(f"{unplanned} have no uses: call plan(model, tensors) first")
        virtual_mode.claim(self, self.modules)
        self._norms, self._splits = [], []
        norms: dict[int, tuple] = {}
        splits: dict[int, tuple] = {}
        for st in self.tensors:
            for use in st.uses:
                module = use.module
                if use.way in ("product", "rows"):
                    hook = lowrank_hook(st, use.kind, self.rows)
                    self._handles.append(module.register_forward_hook(hook, with_kwargs=True))
                elif use.way == "bias":
                    hook = bias_hook(st, self.rows, self.values)
                    self._handles.append(module.register_forward_hook(hook))
                elif use.way == "fused":
                    continue  # applied by its weight's virtual hook
                elif use.way == "norm":
                    entry = norms.setdefault(id(module), (module, {}))
                    entry[1]["weight" if st.param is module.weight else "bias"] = st
                else:
                    splits.setdefault(id(module), (module, []))[1].append(st)
        for module, owned in norms.values():
            norm = NormHooks(owned.get("weight"), owned.get("bias"), self.rows, self.values)
            self._norms.append(norm)
            self._handles.append(module.register_forward_pre_hook(norm.pre, prepend=True))
            self._handles.append(module.register_forward_hook(norm.post, always_call=True))
        for module, owned in splits.values():
            split = SplitHooks(owned, self.rows)
            self._splits.append(split)
            self._handles.append(module.register_forward_pre_hook(split.pre, prepend=True))
            self._handles.append(
                module.register_forward_hook(split.post, with_kwargs=True, always_call=True)
            )
        self.attached = True

    def restore(self) -> None:
        """Put the stored tensors back wherever something is swapped in. Idempotent."""
        for norm in self._norms:
            norm.restore()
        for split in self._splits:
            split.restore()
        super().restore()
