"""LOZO-M's momentum (``momentum`` = β > 0).

Matrices keep N (m×r, float32), the left factor of the momentum N·Vᵀ; 1-D tensors keep a
full-size float32 buffer m, as in the authors' code (g·U is the left factor of the estimate
g·U·Vᵀ):

* first step of the run: N = g·U (the authors' initialisation; same for m = g·z);
* steps inside a V epoch: N ← β·N + (1 − β)·g·U;
* V-refresh steps (step % nu == 0): N ← β·N·(V_oldᵀ·V_new)/n + (1 − β)·g·U, i.e. the old
  momentum N·V_oldᵀ is projected onto the new subspace (V_newᵀ·V_new ≈ n·I for Gaussian V),
  as in the authors' code (computed in float64, rounded once to float32);
* update: W ← W − lr·N·Vᵀ (1-D: b ← b − lr·m), through ``outer_add_`` in one pass (the 1-D
  tensors in FlatVectors' buffers on a GPU: all in one launch, zofast.optim.momentum_update;
  the in-place and shadow matrices inside a V epoch in FlatMatrices' buffers: one launch per
  rank and dtype, zofast.optim.momentum_matrices).

With ``directions=q`` the momentum takes the step's averaged estimate: g·U above stands for
(1/q)·Σ_k g_k·U_k (the q directions share the step's V), g·z for (1/q)·Σ_k g_k·z_k.
"""

from __future__ import annotations

import numpy as np
import torch

from zofast.device_map import by_device
from zofast.optim.momentum_flat import FlatVectors
from zofast.optim.momentum_matrices import FlatMatrices
from zofast.optim.momentum_update import FlatUpdate
from zofast.optim.noise import NoisePlan, Slot
from zofast.perturb import outer_add_
from zofast.shadow_step import bulk_on, to_device


def _together(state, tensors, continuing: bool) -> list | None:
    """The old buffers of `tensors` (slots or virtual tensors) when they can be stepped as one
    flat buffer: [] where none has one yet, all of them where all have one and `continuing`;
    None otherwise (per tensor)."""
    old = [state[x.param].get("momentum_buffer") for x in tensors]
    if all(x is None for x in old):
        return []
    return old if continuing and all(x is not None for x in old) else None


class Momentum:
    """New buffers of a step (computed before any write) and the passes that apply them."""

    def __init__(self, beta: float, noise: NoisePlan):
        self.beta, self.noise = beta, noise
        # (the slots it was built for, FlatVectors or None, their FlatUpdate or None)
        self._vectors: tuple | None = None
        self._matrices: tuple | None = None  # (the slots it was built for, FlatMatrices or None)

    def _flat_vectors(self, slots: list[Slot]) -> FlatVectors | None:
        """The full-rank slots' flat buffers (FlatVectors), where they share one device and none
        is a shard; None otherwise."""
        if self._vectors is None or self._vectors[0] is not slots:
            full = [s for s in slots if not s.rank]
            one = len({s.param.device for s in full}) == 1 and not any(s.sharded for s in full)
            vectors = FlatVectors(full, self.noise) if full and one else None
            self._vectors = (slots, vectors, vectors and FlatUpdate(vectors))
        return self._vectors[1]

    def _flat_matrices(self, slots: list[Slot]) -> FlatMatrices | None:
        """The low-rank slots' flat buffers (FlatMatrices; virtual tensors have their own),
        where they share one device with the multi-tensor launches and none is a shard."""
        if self._matrices is None or self._matrices[0] is not slots:
            low = [s for s in slots if s.rank and s.virtual is None]
            devices = {s.param.device for s in low}
            one = len(devices) == 1 and bulk_on(*devices) and not any(s.sharded for s in low)
            self._matrices = (slots, FlatMatrices(low, self.noise) if one else None)
        return self._matrices[1]

    def buffers(self, slots: list[Slot], state, t: int, gs: list[float], flat=None):
        """({index: new buffer}, {index: the last direction's tensors}) of every slot after step
        t, gs being g_k / q for the step's q directions (q = 1: [g]); FloatingPointError
        (nothing written) if a buffer is not finite. `flat`: the virtual part's flat tensors
        (zofast.virtual_step.FlatVirtual) with step t loaded, whose buffers are made together
        inside a V epoch (one direction per step only: Virtual.flat_step gives None otherwise)."""
        buffers, used, checks = {}, {}, []
        continuing = t % self.noise.nu != 0  # a V-refresh step projects each matrix's buffer
        olds = None if flat is None else _together(state, flat.tensors, continuing)
        if olds is not None:
            (g,) = gs
            n, views = flat.momentum(olds or None, self.beta, g)
            for vt, view in zip(flat.tensors, views, strict=True):
                buffers[vt.index], used[vt.index] = view, (vt.U, vt.V)
            checks.append(torch.isfinite(n).all())
        matrices = self._flat_matrices(slots) if len(gs) == 1 else None
        # (a V-refresh step with buffers to project: per tensor, as the virtual ones)
        olds = None if matrices is None else _together(state, matrices.slots, continuing)
        if olds is not None:
            factors = matrices.load(t)
            n, views = matrices.momentum(olds or None, self.beta, gs[0])
            for slot, view, pair in zip(matrices.slots, views, factors, strict=True):
                buffers[slot.index], used[slot.index] = view, pair
            checks.append(torch.isfinite(n).all())
        vectors = self._flat_vectors(slots) if len(gs) == 1 else None
        olds = None if vectors is None else _together(state, vectors.slots, True)
        if olds is not None:
            zs = vectors.load(t)
            n, views = vectors.momentum(olds or None, self.beta, gs[0])
            for slot, view, z in zip(vectors.slots, views, zs, strict=True):
                buffers[slot.index], used[slot.index] = view, (z,)
            checks.append(torch.isfinite(n).all())
        for slot in slots:
            if slot.index not in buffers:
                buffers[slot.index], used[slot.index] = self._step(slot, state, t, gs)
                checks.append(torch.isfinite(buffers[slot.index]).all())
        # One check (one host sync) per device the buffers are on (a model on several devices).
        groups = by_device(checks, key=lambda check: check.device)
        if not all(torch.stack(group).all() for group in groups):
            shown = gs[0] if len(gs) == 1 else gs
            raise FloatingPointError(f"the momentum overflowed at step {t} (g = {shown})")
        return buffers, used

    def _step(self, slot: Slot, state, t: int, gs: list[float]):
        """The new buffer: the estimate's left factor is Σ_k (g_k / q)·U_k (full-rank: z_k),
        added term by term in direction order."""
        beta, nu = self.beta, self.noise.nu
        old = state[slot.param].get("momentum_buffer")
        directions = self.noise.directions(t)
        if slot.rank:
            factors = [self.noise.factors(slot, d) for d in directions]
            V = factors[0][1]  # one V per step
            us = [U for U, _ in factors]
            if old is None:
                new = us[0] * gs[0]
                for U, c in zip(us[1:], gs[1:], strict=True):
                    new = torch.add(new, U, alpha=c)
            elif t % nu == 0:
                _, V_old = self.noise.factors(slot, directions[0], t // nu - 1)
                carry = (old.double() @ (V_old.double().T @ V.double())) * (beta / V.shape[0])
                for U, c in zip(us, gs, strict=True):
                    carry = carry + U.double() * ((1.0 - beta) * c)
                new = carry.float()
            else:
                new = old * beta
                for U, c in zip(us, gs, strict=True):
                    new = torch.add(new, U, alpha=(1.0 - beta) * c)
            return new, (us[-1], V)
        zs = [self.noise.noise(slot, d) for d in directions]
        if old is None:
            new = zs[0] * gs[0]
            for z, c in zip(zs[1:], gs[1:], strict=True):
                new = torch.add(new, z, alpha=c)
        else:
            new = old * beta
            for z, c in zip(zs, gs, strict=True):
                new = torch.add(new, z, alpha=(1.0 - beta) * c)
        return new, (zs[-1],)

    def apply_all(
        self,
        slots,
        used,
        buffers,
        t,
        lrs,
        stochastic,
        restores=None,
        eps=0.0,
        nxt=None,
        w_scales=None,
    ) -> None:
        """:meth:`apply` over one part's `slots` after step t: the flat vectors' slots in one
        pass on a GPU (:meth:`_apply_flat`; not pipelined: nxt is a term the flat buffers do not
        hold), the others one by one. restores: per group the restore scale (in place) or None
        (exact modes: the update alone); w_scales: per group or None; stochastic: round with
        step t's round seeds."""
        done = set()
        if nxt is None:
            done = self._apply_flat(slots, used, buffers, t, lrs, stochastic, restores, w_scales)
            matrices = None if self._matrices is None else self._matrices[1]
            if matrices is not None:
                seeds = self.noise.seed_array("round", t) if stochastic else None
                done |= matrices.apply(slots, buffers, used, lrs, restores, w_scales, seeds)
        rounds = self.noise.seeds("round", t) if stochastic else None
        for slot in slots:
            if slot.index in done:
                continue
            g = slot.group
            self.apply(
                slot,
                used[slot.index],
                buffers[slot.index],
                0.0 if restores is None else restores[g],
                lrs[g],
                eps,
                nxt,
                round_seed=None if rounds is None else rounds[slot.index],
                w_scale=1.0 if w_scales is None else w_scales[g],
            )

    def _apply_flat(self, slots, used, buffers, t, lrs, stochastic, restores, w_scales) -> set:
        """The flat vectors' slots, if all are among `slots` and their buffers and z are the
        flat ones, in one FlatUpdate pass (columns [m], in place [z, m]); the indices done."""
        held = self._vectors
        if held is None or held[1] is None or not bulk_on(held[1].device):
            return set()
        vectors, update = held[1], held[2]
        mine = {id(s) for s in slots}
        m = vectors.flat_of(buffers, used)
        if m is None or not all(id(s) in mine for s in vectors.slots):
            return set()
        columns, rows = [m], [[-lr] for lr in lrs]
        if restores is not None:
            columns, rows = [vectors.z, m], [[r, -lr] for r, lr in zip(restores, lrs, strict=True)]
        if w_scales is not None and any(a != 1.0 for a in w_scales):
            rows = [[*row, a] for row, a in zip(rows, w_scales, strict=True)]
        groups = np.array([s.group for s in vectors.slots], dtype=np.int64)
        scales = np.asarray(rows, dtype=np.float32)[groups]
        seeds = self.noise.seed_array("round", t)[vectors.index] if stochastic else None
        update.run(columns, scales, seeds)
        return {s.index for s in vectors.slots}

    def apply(self, slot, used, buffer, restore, lr, eps, nxt, round_seed=None, w_scale=1.0):
        """One pass over a slot: W ← w_scale·W + restore·Z_last − lr·(momentum), + ε·Z_nxt where
        nxt (a direction index) is not None (pipelined), rounded stochastically with
        `round_seed` where given; `used` holds Z_last, the step's last direction."""
        p, rounding = slot.param, {"round_seed": round_seed, "w_scale": w_scale}
        if slot.rank:
            U, V = used
            left, right = [buffer * -lr], [V]
            if restore:  # in place; exact modes write the update alone
                left, right = [U * restore, *left], [V, V]
            if nxt is not None:
                U2, V2 = self.noise.factors(slot, nxt)
                left.append(U2 * eps)
                right.append(V2)
            outer_add_(
                p, torch.cat(left, 1), torch.cat(right, 1), row_offset=slot.row_offset, **rounding
            )
            return
        cols, scales = [buffer], [-lr]
        if restore:
            cols, scales = [used[0], *cols], [restore, *scales]
        if nxt is not None:
            cols.append(self.noise.noise(slot, nxt))
            scales.append(eps)
        # Through pinned memory: a pageable upload would wait for the GPU (once per tensor).
        right = to_device(torch.tensor([scales], dtype=torch.float32), p.device)
        outer_add_(p.view(-1, 1), torch.stack(cols, 1), right, row_offset=slot.offset, **rounding)
