"""LOZO-M's matrices (low-rank slots of the in-place and shadow parts) in flat buffers.

Per matrix and step, LOZO-M took a lowrank_factors call for (U_t, V), two elementwise ops for
N ← β·N + (1 − β)·g·U_t and one ``outer_add_`` (two products, two cats) for the update: on
float32 MiniLM in place (101 matrices) about 1300 launches and 51 ms a step against LOZO's 7.5
(H200, bench/results/2026-12-03-session9). Here, as for virtual mode's tensors
(zofast.virtual_step.FlatVirtual), every matrix's (U_t, V) comes from one factor launch into
flat float32 buffers in zofast.kernels.multi's factor layout, N from one elementwise op over a
flat buffer, and the update from one low-rank launch per (rank, dtype): in place
W ← round(W + restore·U_t·Vᵀ − lr·N·Vᵀ) over [fl(restore·U_t) | fl(−lr·N)]·[V | V]ᵀ, the 2r
layout of a v_split plan filled by one gather; in shadow mode W ← round(a·W − lr·N·Vᵀ). The
slots' U, V and N are views of the flat buffers.

Numbers: bit for bit the per-tensor path. U, V are lowrank_factors' (tests/test_multi.py), N the
same elementwise ops, the update the same float32 products and the same fma order over the same
columns as Momentum.apply's ``outer_add_``, rounded with the same (row, column) words. A V-refresh
step with a buffer to project (float64), a pipelined step and several directions per step stay
per tensor (zofast.optim.momentum).
"""

from __future__ import annotations

import numpy as np
import torch

from zofast.optim.momentum_flat import flat_momentum
from zofast.optim.noise import NoisePlan, Slot
from zofast.shadow_step import to_device, upload_seeds


class FlatMatrices:
    """(U_t, V) and the momentum N of `slots` (low-rank, unsharded, one device that has the
    multi-tensor launches) in flat buffers, and their update pass.

    Args:
        slots: the low-rank slots.
        noise: the run's seeds.
    """

    def __init__(self, slots: list[Slot], noise: NoisePlan):
        from zofast.kernels.multi import MultiPass

        self.slots, self.noise = list(slots), noise
        self.device = self.slots[0].param.device
        self.index = np.array([s.index for s in self.slots], dtype=np.int64)
        self._layout = MultiPass(
            [s.param for s in self.slots], [s.rank for s in self.slots], 1, factors_only=True
        )
        self._ones = torch.ones(len(self.slots), 1, device=self.device)
        # Overwritten every step (the padding stays zero: the launch writes only the factors).
        self.u, self.v = (x.zero_() for x in self._layout.factor_buffers())
        self._views = self._layout.factor_views(self.u, self.v)
        self._loaded = None  # (run seeds, step) whose factors u, v hold
        self._n: tuple = (None, None)  # the last momentum's (flat buffer, per-slot views)
        self._passes: dict = {}  # (restoring, stochastic, scaled) -> update MultiPass
        self._slot_of: torch.Tensor | None = None  # per element of u: its slot
        self._gathers: tuple | None = None  # (u, v) index: the v_split layout from u, v

    def load(self, t: int) -> list:
        """Per slot (U_t, V), (m, r) and (n, r) float32 views (overwritten by the next step's)."""
        if self._loaded != (self.noise.run, t):
            (d,) = self.noise.directions(t)
            seeds = np.stack(
                [
                    self.noise.seed_array("u", d)[self.index],
                    self.noise.seed_array("v", self.noise.epoch(d))[self.index],
                ],
                1,
            )
            seeds_t = upload_seeds(seeds, self.device)
            self._layout.launch_factors(seeds_t, self._ones, self.u, self.v)
            self._loaded = (self.noise.run, t)
        return self._views

    def momentum(self, old: list | None, beta: float, g: float) -> tuple:
        """N ← β·N + (1 − β)·g·U_t (N = g·U_t where `old` is None) of every slot, out of place
        into a new flat buffer, after :meth:`load`: elementwise Momentum._step's numbers.
        Returns (the buffer, per-slot (m, r) views)."""
        self._n = flat_momentum(self.u, old, self._n, beta, g, self._u_views)
        return self._n

    def _u_views(self, flat: torch.Tensor) -> list:
        return [U for U, _ in self._layout.factor_views(flat, self.v)]

    def apply(self, slots, buffers, used, lrs, restores, w_scales, round_seeds) -> set:
        """The update pass of every slot in one launch per (rank, dtype), if all are among
        `slots` (one part's) and their `buffers` / `used` entries are :meth:`momentum`'s and
        :meth:`load`'s views: W ← round(a·W + restore·U_t·Vᵀ − lr·N·Vᵀ) (restores None: no
        restore term; w_scales None: a = 1; lrs, restores, w_scales per group; round_seeds:
        the step's, indexed by slot index, or None). Returns the slot indices done."""
        n, views = self._n
        mine = {id(s) for s in slots}
        if views is None or not all(id(s) in mine for s in self.slots):
            return set()
        for slot, N, pair in zip(self.slots, views, self._views, strict=True):
            held = used.get(slot.index, ())
            if buffers.get(slot.index) is not N or len(held) != 2:
                return set()
            if held[0] is not pair[0] or held[1] is not pair[1]:
                return set()
        groups = [s.group for s in self.slots]
        if restores is not None and not all(restores[g] for g in groups):
            return set()  # Momentum.apply leaves a zero restore term out: per tensor
        scaled = w_scales is not None and any(a != 1.0 for a in w_scales)
        plan = self._plan(restores is not None, round_seeds is not None, scaled)
        minus = self._scaled(n, [-lrs[g] for g in groups])
        if restores is None:
            u, v = minus, self.v
        else:
            gather_u, gather_v = self._gather(plan)
            restored = self._scaled(self.u, [restores[g] for g in groups])
            u, v = torch.cat([restored, minus])[gather_u], self.v[gather_v]
        seeds = np.zeros((len(self.slots), plan.seed_width), dtype=np.uint64)
        if round_seeds is not None:
            seeds[:, -1] = round_seeds[self.index]
        scales = np.ones((len(self.slots), plan.n_terms + scaled), dtype=np.float32)
        if scaled:
            scales[:, -1] = [w_scales[g] for g in groups]
        plan.launch_lowrank(
            u, v, upload_seeds(seeds, self.device), to_device(torch.from_numpy(scales), self.device)
        )
        return {s.index for s in self.slots}

    def _plan(self, restoring: bool, stochastic: bool, scaled: bool):
        """The update's low-rank plan: rank 2r over [restore·U | −lr·N]·[V | V]ᵀ (a v_split
        plan's layout), or rank r over −lr·N·Vᵀ; rebuilt where a weight was reallocated."""
        from zofast.kernels.multi import MultiPass

        key = (restoring, stochastic, scaled)
        params = [s.param for s in self.slots]
        held = self._passes.get(key)
        if held is None or any(p.data_ptr() != a for p, a in zip(params, held[1], strict=True)):
            terms = dict(n_terms=2, v_split=1) if restoring else dict(n_terms=1)
            plan = MultiPass(
                params,
                [s.rank for s in self.slots],
                **terms,
                stochastic=stochastic,
                scaled=scaled,
            )
            held = self._passes[key] = (plan, [p.data_ptr() for p in params])
        return held[0]

    def _gather(self, plan) -> tuple:
        """Indices that build `plan`'s (a v_split plan's) u from cat([restore·U, −lr·N]) (both
        in the flat layout) and its v from V: per slot the columns [U | N] and [V | V]."""
        if self._gathers is None:
            size = self.u.numel()
            u1, v1 = self._layout.factor_buffers(torch.int64)
            torch.arange(size, out=u1)
            torch.arange(v1.numel(), out=v1)
            u2, v2 = (x.zero_() for x in plan.factor_buffers(torch.int64))  # padding: any index
            pairs = zip(plan.factor_views(u2, v2), self._layout.factor_views(u1, v1), strict=True)
            for (U2, V2), (U1, V1) in pairs:  # (the first V's columns; the second's follow)
                U2.copy_(U1)
                _second(U2).copy_(U1 + size)
                V2.copy_(V1)
                _second(V2).copy_(V1)
            self._gathers = (u2, v2)
        return self._gathers

    def _scaled(self, flat: torch.Tensor, scales: list[float]) -> torch.Tensor:
        """s_i · flat over slot i's part (float32 products, as per tensor); one product when
        every s_i is the same."""
        if len(set(scales)) == 1:
            return flat * scales[0]
        if self._slot_of is None:
            self._slot_of = slot_of = torch.zeros_like(self.u, dtype=torch.int64)
            for i, U in enumerate(self._u_views(slot_of)):
                U.fill_(i)
        s = to_device(torch.tensor(scales, dtype=torch.float32), self.device)
        return flat * s[self._slot_of]


def _second(view: torch.Tensor) -> torch.Tensor:
    """A v_split plan's (k, r) factor view of the first V's columns → the second V's: column
    g·r + k at offset + (g·r + k)·stride (zofast.kernels.multi's factor layout)."""
    offset = view.storage_offset() + view.shape[1] * view.stride(1)
    return view.as_strided(view.shape, view.stride(), offset)
