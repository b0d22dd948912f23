"""What a virtual-mode step prepares once for all its tensors instead of once per tensor.

In virtual mode (:mod:`zofast.virtual`) every Linear / Conv1D / Embedding weight reaches the
forward as a low-rank term L·Rᵀ, L = A + c·U_t. Per tensor and forward that is an add, a cast and
a pad before the hook's two small products; on OPT-1.3B (145 matrices, two forwards a step, a
forward that is itself host-bound) that per-tensor host work made LOZO's default step 2.5× two
forwards (bench/results/2026-12-03-exact-1). Here every tensor's U_t, V, pending A and the
hooks' casts live in one flat float32 buffer each, in zofast.kernels.multi's factor layout
(per tensor r rows of m, resp. n, numbers, padded to 16): a forward costs one elementwise launch
for all tensors (L = A + c·U_t, cast to the weights' dtype), a step's update another two
(A ← A − lr·g·U_t). The tensors' own A, U, V are views of these buffers, so everything that works
per tensor (a V-refresh step's rank-2r forwards, the flush, state_dict) keeps working unchanged.
The hooks read (r, m) and (r, n) views whose rows are 16-element aligned, as shadow mode's do.

Numbers: L and A are elementwise what the per-tensor path computes (the same float32 adds and
products, the same cast); the hooks' products take the transposed layout, so a forward may round
differently from the per-tensor path in its last bits (a step uses one path for both forwards).
"""

from __future__ import annotations

import numpy as np
import torch

from zofast.kernels.multi import factor_views
from zofast.perturb import lowrank_factors
from zofast.shadow_step import STRIDE_ALIGN, bulk_on, to_device, upload_seeds

__all__ = ["FlatVirtual", "HostLayout"]


class HostLayout:
    """zofast.kernels.multi's factor layout for devices without its launch (or without Triton):
    the same buffers and views, the factors made per tensor (bit for bit lowrank_factors')."""

    def __init__(self, shapes, ranks, device):
        self.shapes, self.ranks, self.device = list(shapes), list(ranks), device
        self._geometry = []
        u_off = v_off = 0
        for (m, n), r in zip(self.shapes, self.ranks, strict=True):
            su, sv = (-(-k // STRIDE_ALIGN) * STRIDE_ALIGN for k in (m, n))
            self._geometry.append((m, n, u_off, v_off, su, sv, r))
            u_off += r * su
            v_off += r * sv
        self._size = (u_off, v_off)

    def factor_buffers(self, dtype: torch.dtype = torch.float32) -> tuple:
        return tuple(torch.zeros(k, dtype=dtype, device=self.device) for k in self._size)

    def factor_views(self, u: torch.Tensor, v: torch.Tensor) -> list:
        return factor_views(self._geometry, u, v)

    def launch_factors(self, seeds: np.ndarray, u, v) -> None:
        for (U, V), (m, n), r, (su, sv) in zip(
            self.factor_views(u, v), self.shapes, self.ranks, seeds, strict=True
        ):
            Uf, Vf = lowrank_factors((m, n), int(su), int(sv), r, device=self.device)
            U.copy_(Uf)
            V.copy_(Vf)


class FlatVirtual:
    """The flat buffers of one device's virtual tensors (see the module docstring).

    Args:
        tensors: the VirtualTensors (rank ≥ 1), all on one device.
    """

    def __init__(self, tensors):
        self.tensors = list(tensors)
        self.device = self.tensors[0].param.device
        if bulk_on(self.device):
            from zofast.kernels.multi import MultiPass

            self._layout = MultiPass(
                [vt.param for vt in self.tensors],
                [vt.rank for vt in self.tensors],
                1,
                factors_only=True,
            )
            self._ones = torch.ones(len(self.tensors), 1, device=self.device)
        else:
            self._layout = HostLayout(
                [(vt.m, vt.n) for vt in self.tensors], [vt.rank for vt in self.tensors], self.device
            )
        self._step = None  # (run key, step) of the loaded U, V
        self.u = self.v = None
        self.a = None  # the pending A's flat buffer (the tensors' A are its views), or None
        self._a_views: list | None = None
        self._pending_next = None  # (buffer, views) of updated(), until committed()
        self._n: tuple = (None, None)  # LOZO-M: the momentum buffers' (flat buffer, views)
        self._va: tuple | None = None  # (flat V_A, the tensors' V_A it holds), see _a_v
        # dtype -> (L buffer, R buffer, views, [the flat V that R holds a cast of])
        self._casts: dict = {}
        self._scale_index: torch.Tensor | None = None

    def load(self, key, seeds: np.ndarray) -> list:
        """Make the step's (U_t, V) of every tensor from `seeds` ((count, 2) uint64: u and v
        seed per tensor) into new buffers; `key` names the step (nothing is made twice).
        Returns per tensor (U, V) as (m, r) and (n, r) float32 views."""
        if self._step != key:
            u, v = (x.zero_() for x in self._layout.factor_buffers())  # padding: zeros
            if isinstance(self._layout, HostLayout):
                self._layout.launch_factors(seeds, u, v)
            else:
                self._layout.launch_factors(upload_seeds(seeds, self.device), self._ones, u, v)
            self.u, self.v, self._step = u, v, key
            self._views = self._layout.factor_views(u, v)
        return self._views

    def adopt(self) -> bool:
        """Whether the tensors' pending A are this object's views (or all absent); if they are
        not (loaded from a state_dict, made per tensor), copy them into a new flat buffer. False
        when they cannot share one flat form (different V epochs)."""
        pending = [vt.A for vt in self.tensors]
        if all(A is None for A in pending):
            self.a = self._a_views = None
            return True
        if any(A is None for A in pending) or len({vt.epoch for vt in self.tensors}) != 1:
            return False
        self.a, self._a_views = self._packed(pending, (self.a, self._a_views))
        return True

    def _packed(self, tensors: list, held: tuple) -> tuple:
        """(buffer, views): `held` if its views are `tensors`, else a new flat buffer (u layout)
        holding copies of them."""
        if held[1] is not None and all(x is y for x, y in zip(tensors, held[1], strict=True)):
            return held
        buffer, v = self._layout.factor_buffers()
        views = [U for U, _ in self._layout.factor_views(buffer.zero_(), v)]  # padding: zeros
        for view, x in zip(views, tensors, strict=True):
            view.copy_(x)
        return buffer, views

    def momentum(self, old: list | None, beta: float, g: float) -> tuple:
        """LOZO-M inside a V epoch: the new momentum N ← β·N + (1 − β)·g·U_t of every tensor
        (N = g·U_t at the first step, `old` None), elementwise the per-tensor numbers, into a new
        flat buffer. Returns (the buffer, its per-tensor (m, r) views)."""
        if old is None:
            n = self.u * g
        else:
            flat, _ = self._packed(old, self._n)
            n = torch.add(flat * beta, self.u, alpha=(1.0 - beta) * g)
        self._n = (n, [U for U, _ in self._layout.factor_views(n, self.v)])
        return self._n

    def momentum_source(self, buffers: dict):
        """The flat buffer behind `buffers` ({index: momentum buffer}) if this object's tensors'
        entries are its views (:meth:`momentum`), else None."""
        n, views = self._n
        if views is None or any(
            buffers.get(vt.index) is not view for vt, view in zip(self.tensors, views, strict=True)
        ):
            return None
        return n

    def updated(self, scales: list[float], fresh: bool, source=None) -> list:
        """New pending A's after the loaded step, per tensor: A + s_i·U_t (s_i = −lr·g of its
        group; LOZO-M: A + s_i·N with `source` N's flat buffer and s_i = −lr), or without A
        where `fresh` (a new V epoch) or nothing is pending; out of place into a new buffer,
        fl(A + fl(s_i·U_t)): elementwise the per-tensor numbers. Call :meth:`adopt` first;
        :meth:`committed` once the tensors hold the returned views."""
        delta = self._scaled(self.u if source is None else source, scales)
        a = delta if fresh or self.a is None else torch.add(self.a, delta)
        views = [U for U, _ in self._layout.factor_views(a, self.v)]
        self._pending_next = (a, views)
        return views

    def committed(self) -> None:
        """After the tensors took :meth:`updated`'s views as their A: they are this buffer's."""
        pending, self._pending_next = self._pending_next, None
        if pending is not None and all(
            vt.A is A for vt, A in zip(self.tensors, pending[1], strict=True)
        ):
            self.a, self._a_views = pending

    def _scaled(self, flat: torch.Tensor, scales: list[float]) -> torch.Tensor:
        """s_i · flat over tensor i's part; one product when every s_i is the same."""
        if len(set(scales)) == 1:
            return flat * scales[0]
        if self._scale_index is None:
            counts = [vt.rank * c for vt, c in zip(self.tensors, self._strides(), strict=True)]
            self._scale_index = torch.repeat_interleave(
                torch.arange(len(counts), device=self.device),
                to_device(torch.tensor(counts), self.device),
                output_size=flat.numel(),
            )
        s = to_device(torch.tensor(scales, dtype=torch.float32), self.device)
        return flat * s[self._scale_index]

    def _strides(self) -> list[int]:
        return [-(-vt.m // STRIDE_ALIGN) * STRIDE_ALIGN for vt in self.tensors]

    def prepare(self, c: float) -> bool:
        """Give every tensor its hooks' (Lᵀ, Rᵀ) in its dtype, L = A + c·U_t (c ≠ 0: the
        tensors' directions are :meth:`load`'s views) or A (c = 0), in one launch per dtype.
        False (nothing given) where the flat form does not apply: a V-refresh step with A on
        the old V, or nothing to add."""
        if not self.adopt():
            return False
        vt0 = self.tensors[0]
        if c and self.a is not None and vt0.epoch != vt0.V_epoch:
            return False
        if not c and self.a is None:
            return False
        # R: the step's V (A, if any, is on its epoch) or, between steps, A's V.
        r_source = self.v if c else self._a_v()
        for dtype in {vt.param.dtype for vt in self.tensors}:
            L, R, views, held = self._cast(dtype)
            if c and self.a is not None:
                torch.add(self.a, self.u, alpha=c, out=L)
            elif c:
                torch.mul(self.u, c, out=L)
            else:
                L.copy_(self.a)
            if held[0] is not r_source:
                R.copy_(r_source)
                held[0] = r_source
        for i, vt in enumerate(self.tensors):
            vt.set_bulk(*self._casts[vt.param.dtype][2][i])
        return True

    def _a_v(self) -> torch.Tensor:
        """A's V as a flat buffer: the loaded step's V when A is on its epoch, else made from
        the tensors' V_A (after a load_state_dict)."""
        vt0 = self.tensors[0]
        if self.v is not None and vt0.V_epoch == vt0.epoch:
            return self.v
        held = self._va
        if held is None or any(
            vt.V_A is not V for vt, V in zip(self.tensors, held[1], strict=True)
        ):
            u, va = self._layout.factor_buffers()
            for (_, view), vt in zip(self._layout.factor_views(u, va), self.tensors, strict=True):
                view.copy_(vt.V_A)
            held = self._va = (va, [vt.V_A for vt in self.tensors])
        return held[0]

    def _cast(self, dtype):
        held = self._casts.get(dtype)
        if held is None:
            L, R = self._layout.factor_buffers(dtype)
            views = [(Lv.t(), Rv.t()) for Lv, Rv in self._layout.factor_views(L, R)]
            held = self._casts[dtype] = (L, R, views, [None])
        return held
