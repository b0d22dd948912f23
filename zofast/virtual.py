"""LOZO's virtual mode: the perturbation and the pending updates go through the layers.

In ``LOZO(..., mode="virtual", model=model)`` a weight W that the model only uses as the
``.weight`` of supported layers is never written during a step. With W viewed as the m×n matrix
of :func:`zofast.perturb.matrix_shape`, the layers compute with

    W_eff = W + L·Rᵀ,   (L, R) = (A + c·U_t, V)             when A and U_t share V's epoch,
                        ([A | c·U_t], [V_A | V])           on a V-refresh step (A is on the old V),
                        (A, V_A)                           between steps (c = 0),

where A (m×r, float32) holds the updates not yet written to W, U_t and V are the step's noise
factors (the same seeds and contract as in-place LOZO) and c is +ε during the first forward, −ε
during the second and 0 otherwise. Forward hooks add the low-rank term to each layer's output,
in the output's dtype, without forming anything m×n:

* ``torch.nn.Linear`` (W: out×in, m = out): ``y += (x·R)·Lᵀ``;
* transformers' GPT-2 ``Conv1D`` (W: in×out, m = in, ``y = x·W + b``): ``y += (x·L)·Rᵀ``;
* ``torch.nn.Embedding`` (W: vocab×dim, ``y = W[ids]``): ``y += L[ids]·Rᵀ``.

A tensor is virtual when every module that registers it does so as ``weight`` and is one of these
with its stock ``forward`` (not overridden by a subclass or on the instance; an Embedding without
``max_norm``; not a child of ``nn.MultiheadAttention``, which reads its out_proj weight directly).
Tied weights (an embedding and an LM head sharing one Parameter) are one tensor with hooks on both
layers. Everything else stays in place.

Limits of the hook approach: code that reads ``layer.weight`` itself instead of calling the layer
(or calls ``layer.forward(...)`` directly, bypassing hooks) sees the stored W, not W_eff. Such
models must use mode="inplace". A ``copy.deepcopy`` of a hooked model shares the original's hooks:
``opt.settle()`` or ``opt.detach()`` first.

:class:`VirtualLayers` is the optimizer's set of virtual tensors and their hooks; the optimizer
drives it (see :mod:`zofast.optim`). :func:`detach` removes zofast's hooks from a model whose
optimizer is gone, folding the pending updates into the weights first.
"""

from __future__ import annotations

import weakref

import torch

from zofast.device_map import moves_inputs_only
from zofast.perturb import matrix_shape, outer_add_
from zofast.shadow_step import to_device

__all__ = ["VirtualLayers", "VirtualTensor", "add_lowrank", "plan", "layer_kind", "detach"]

# The hooked modules and the hook sets (VirtualLayers, zofast.shadow.ShadowLayers) on each: the
# sets of one optimizer may share a module, those of two optimizers may not.
_OWNERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def claim(layers, modules) -> None:
    """Register `layers` (a hook set with ``attached`` and ``owner()``) on `modules`, or raise
    ValueError (nothing registered) if another optimizer's hook set holds one of them."""
    mine = layers.owner()
    for module in modules:
        for other in _OWNERS.get(module, ()):
            if (
                other is not layers
                and other.attached
                and (mine is None or other.owner() is not mine)
            ):
                raise ValueError(
                    f"a {type(module).__name__} of the model is already driven by another "
                    "optimizer's shadow or virtual hooks: call its detach() (or "
                    "zofast.shadow.detach(model)) first"
                )
    for module in modules:
        held = _OWNERS.setdefault(module, [])
        if all(other is not layers for other in held):
            held.append(layers)


def release(layers, modules) -> None:
    """Undo :func:`claim`."""
    for module in modules:
        held = [other for other in _OWNERS.get(module, ()) if other is not layers]
        if held:
            _OWNERS[module] = held
        else:
            _OWNERS.pop(module, None)


def hook_sets(model: torch.nn.Module) -> list:
    """Every hook set registered on a module of `model`, once each."""
    found: list = []
    for module in model.modules():
        for layers in _OWNERS.get(module, ()):
            if all(layers is not other for other in found):
                found.append(layers)
    return found


def layer_kind(module: torch.nn.Module) -> str | None:
    """ "linear", "conv1d" or "embedding" if `module` computes with its weight in the stock way.

    Example:
        >>> layer_kind(torch.nn.Linear(2, 3)), layer_kind(torch.nn.LayerNorm(3))
        ('linear', None)
    """
    if "forward" in vars(module) and not moves_inputs_only(module):
        return None  # forward replaced on the instance (other than by a device map's wrapper)
    cls = type(module)
    if isinstance(module, torch.nn.Linear) and cls.forward is torch.nn.Linear.forward:
        return "linear"
    if (
        isinstance(module, torch.nn.Embedding)
        and cls.forward is torch.nn.Embedding.forward
        and module.max_norm is None
    ):
        return "embedding"
    if cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers"):
        from transformers.pytorch_utils import Conv1D

        if cls is Conv1D:
            return "conv1d"
    return None


def plan(model: torch.nn.Module, params) -> dict[int, list[tuple[torch.nn.Module, str]]]:
    """The tensors of `params` that can go virtual in `model`, with the layers that use each.

    Args:
        model: the module whose forward computes the loss.
        params: candidate matrices (the optimizer's trained tensors with ndim ≥ 2).

    Returns:
        ``{id(tensor): [(layer, kind), ...]}`` for each candidate registered in `model` only as
        the ``weight`` of supported layers (see :func:`layer_kind`).

    Example:
        >>> lin = torch.nn.Linear(3, 2)
        >>> [kind for _, kind in plan(lin, [lin.weight])[id(lin.weight)]]
        ['linear']
    """
    wanted = {id(p) for p in params}
    blocked = set()  # layers whose parent reads their weight directly
    for module in model.modules():
        if isinstance(module, torch.nn.MultiheadAttention):
            blocked.update(id(child) for child in module.children())
    uses: dict[int, list] = {}
    for module in model.modules():
        for attr, p in module._parameters.items():
            if p is None or id(p) not in wanted:
                continue
            kind = None
            if attr == "weight" and id(module) not in blocked and p.dim() == 2:
                kind = layer_kind(module)
            uses.setdefault(id(p), []).append((module, kind))
    return {pid: found for pid, found in uses.items() if all(kind for _, kind in found)}


class VirtualTensor:
    """One virtual weight: its pending update A (on V_A), the step's direction and c.

    The optimizer sets these; the hooks read :meth:`factors`. A and the factors are never
    modified in place (new tensors each time), so snapshots of the optimizer state stay valid.
    """

    def __init__(self, index: int, name: str, param: torch.Tensor, rank: int, layers: list):
        self.index, self.name, self.param, self.rank = index, name, param, rank
        self.m, self.n = matrix_shape(param.shape)
        self.layers = layers  # [(module, kind)]; empty for a replay-only optimizer
        self.A: torch.Tensor | None = None  # (m, r) float32, the updates not yet in W
        self.epoch: int | None = None  # the V epoch A is on
        self.V_A: torch.Tensor | None = None  # (n, r) float32, that epoch's V
        self.step: int | None = None  # the step whose direction (U, V) is loaded
        self._U: torch.Tensor | None = None
        self._V: torch.Tensor | None = None
        self._make = None  # a callable giving (U, V), made at the first read (set_direction)
        self.V_epoch: int | None = None
        self.c = 0.0
        self._pair: tuple | None = None  # float32 (L, R), None when W_eff = W
        self._fresh = True  # _pair is current
        self._cast: dict = {}  # (dtype, device) -> the hooks' (L, R)
        self._cast_R: dict = {}  # (dtype, device) -> (R, its cast): R changes only with V
        self.bulk: tuple | None = None  # (Lᵀ, Rᵀ) made for all tensors (zofast.virtual_step)

    def set_pending(self, A, epoch, V_A) -> None:
        self.A, self.epoch, self.V_A = A, epoch, V_A
        self._fresh, self.bulk = False, None

    def set_direction(self, step: int, epoch: int, U, V=None) -> None:
        """The step's direction: (U, V), or U a callable that makes them when either is first
        read (a streamed block's, zofast.offload_prepare: made just before its upload)."""
        self.step, self.V_epoch = step, epoch
        self._make, self._U, self._V = (U, None, None) if callable(U) else (None, U, V)
        self._fresh, self.bulk = False, None

    @property
    def U(self) -> torch.Tensor | None:
        """The loaded direction's U_t, (m, r) float32."""
        if self._make is not None:
            self.materialise()
        return self._U

    @property
    def V(self) -> torch.Tensor | None:
        """The loaded direction's V, (n, r) float32."""
        if self._make is not None:
            self.materialise()
        return self._V

    def materialise(self) -> None:
        """Make a deferred direction's (U, V) now (nothing to do if they are made)."""
        make, self._make = self._make, None
        if make is not None:
            with torch.inference_mode(False), torch.no_grad():
                self._U, self._V = make()

    def set_coef(self, c: float) -> None:
        if c != self.c:
            self.c = c
            self._fresh, self.bulk = False, None

    def set_bulk(self, Lt: torch.Tensor, Rt: torch.Tensor) -> None:
        """The current L·Rᵀ as (Lᵀ, Rᵀ), (r, m) and (r, n) in the weight's dtype, made in bulk
        for many tensors; cleared by every change of A, direction or c."""
        self.bulk = (Lt, Rt)

    def pair(self) -> tuple | None:
        """(L, R), float32, with W_eff = W + L·Rᵀ; None when W_eff = W."""
        if self._fresh:
            return self._pair
        pair = None
        if self.c == 0.0 or self.U is None:
            if self.A is not None:
                pair = (self.A, self.V_A)
        elif self.A is None:
            pair = (self.U * self.c, self.V)
        elif self.epoch == self.V_epoch:
            pair = (torch.add(self.A, self.U, alpha=self.c), self.V)
        else:
            pair = (torch.cat([self.A, self.U * self.c], 1), torch.cat([self.V_A, self.V], 1))
        self._pair, self._fresh, self._cast = pair, True, {}
        return pair

    def factors(self, dtype: torch.dtype, device: torch.device) -> tuple | None:
        """(L, R) in `dtype` on `device`, cast once per change of A, direction or c.

        Their columns are zero-padded to a multiple of 8 on a GPU, so that every operand of the
        hooks' rank-r matrix products is 16-byte aligned (cuBLAS otherwise falls back to slow
        2-element-aligned kernels at rank 2; the zero columns add exact zeros). Built outside
        inference mode and autograd (a first forward under ``torch.inference_mode()`` must not
        leave inference tensors for a later one with grad)."""
        key = (dtype, device)
        cast = self._cast.get(key) if self._fresh else None
        if cast is None:
            with torch.inference_mode(False), torch.no_grad():
                pair = self.pair()
                if pair is None:
                    return None
                L, R = pair
                held = self._cast_R.get(key)
                if held is None or held[0] is not R:  # R is V (or [V_A | V]): new with V only
                    held = self._cast_R[key] = (R, _padded(R, dtype, device))
                cast = (_padded(L, dtype, device), held[1])
            self._cast[key] = cast
        return cast

    def flush(self, round_seed: int | None = None) -> None:
        """W += A·V_Aᵀ in one engine pass (rounded stochastically with `round_seed` where
        given), then A = 0 (nothing pending)."""
        if self.A is not None:
            outer_add_(self.param, self.A, self.V_A, round_seed=round_seed)
        self.set_pending(None, None, None)


def _padded(t: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """t in dtype on device; on a GPU its columns zero-padded to a multiple of 8."""
    t = to_device(t.to(dtype), device)
    pad = -t.shape[1] % 8 if device.type == "cuda" else 0
    return torch.nn.functional.pad(t, (0, pad)) if pad else t


def _add(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
    """out += a @ b, in place on a 2-D view of out where possible (a hook's return value)."""
    if out.is_contiguous():
        out.view(-1, b.shape[1]).addmm_(a, b)
        return None
    return out + (a @ b).view(out.shape)


def _input(args, kwargs):
    return args[0] if args else next(iter(kwargs.values()))


def add_lowrank(kind: str, x: torch.Tensor, out: torch.Tensor, Lt, Rt, alpha: float = 1.0):
    """out += alpha·(the `kind` layer applied to L·Rᵀ), from (Lᵀ, Rᵀ), (r, m) and (r, n) in
    out's dtype: Linear (W: out × in) y += (x·R)·Lᵀ, Conv1D (W: in × out) y += (x·L)·Rᵀ,
    Embedding (W: vocab × dim) y += L[ids]·Rᵀ. The rank-r side is computed transposed,
    (r, tokens), so that every operand of both products is 16-byte aligned when the factors'
    rows are (cuBLAS's slow path otherwise). Returns the output (a copy if out was not
    contiguous)."""
    y = out if out.is_contiguous() else out.contiguous()
    if kind == "embedding":
        left, right = Lt.index_select(1, x.reshape(-1)), Rt
    else:
        inner, right = (Rt, Lt) if kind == "linear" else (Lt, Rt)
        left = inner @ x.reshape(-1, inner.shape[1]).to(y.dtype).T
    y.view(-1, right.shape[1]).addmm_(left.T, right, alpha=alpha)
    return y


def _make_hook(vt: VirtualTensor, kind: str):
    """The forward hook adding vt's low-rank term L·Rᵀ (W viewed as m×n) to a `kind` layer."""

    def hook(module, args, kwargs, out):
        x = _input(args, kwargs).to(out.device)  # a device map's wrapper moves it only inside
        bulk = vt.bulk
        if bulk is not None and bulk[0].dtype == out.dtype and bulk[0].device == out.device:
            return add_lowrank(kind, x, out, *bulk)
        f = vt.factors(out.dtype, out.device)
        if f is None:
            return None
        L, R = f
        if kind == "linear":  # W: (out = m, in = n); y += (x·R)·Lᵀ
            return _add(out, x.reshape(-1, vt.n).to(out.dtype) @ R, L.T)
        if kind == "conv1d":  # W: (in = m, out = n); y += (x·L)·Rᵀ
            return _add(out, x.reshape(-1, vt.m).to(out.dtype) @ L, R.T)
        return _add(out, L[x.reshape(-1)], R.T)  # embedding, W: (vocab = m, dim = n); L[ids]·Rᵀ

    return hook


class VirtualLayers:
    """The virtual tensors of one optimizer and the forward hooks that apply them.

    Args:
        tensors: the :class:`VirtualTensor` objects.
        owner: the optimizer (held weakly; :func:`detach` calls its ``detach()``).
    """

    def __init__(self, tensors: list[VirtualTensor], owner=None):
        self.tensors = tensors
        self._owner = None if owner is None else weakref.ref(owner)
        self._handles: list = []
        self.attached = False

    @property
    def modules(self) -> list[torch.nn.Module]:
        return [module for vt in self.tensors for module, _ in vt.layers]

    def prepare(self, tensors) -> None:
        """Make the deferred directions of `tensors` (one streamed block's) now."""
        for vt in tensors:
            vt.materialise()

    def attach(self) -> None:
        """Register the hooks (ValueError, nothing registered, if another optimizer's are on)."""
        if self.attached:
            return
        claim(self, self.modules)
        for vt in self.tensors:
            for module, kind in vt.layers:
                handle = module.register_forward_hook(_make_hook(vt, kind), with_kwargs=True)
                self._handles.append(handle)
        self.attached = True

    def remove_hooks(self) -> None:
        """Remove the hooks (the pending updates are NOT folded in: see flush / detach)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        release(self, self.modules)
        self.attached = False

    def owner(self):
        return None if self._owner is None else self._owner()


def detach(model: torch.nn.Module) -> None:
    """Remove every virtual-mode optimizer's hooks from `model`, folding pending updates in.

    Where the optimizer still exists this is its ``detach()`` (recorded in its trajectory as a
    settle); where it is gone, the pending updates are written with one engine pass per tensor.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> detach(model)  # nothing hooked: nothing to do
    """
    for layers in [s for s in hook_sets(model) if isinstance(s, VirtualLayers)]:
        opt = layers.owner()
        if opt is not None:
            opt.detach()
        else:
            with torch.no_grad():
                for vt in layers.tensors:
                    vt.set_coef(0.0)
                    vt.flush()
            layers.remove_hooks()
