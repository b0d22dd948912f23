"""LOZO's virtual part: matrices perturbed and updated through their layers (zofast.virtual).

A trained matrix whose every use in the model is as the ``.weight`` of an ``nn.Linear``,
transformers' GPT-2 ``Conv1D`` or an ``nn.Embedding`` is never written during a step: hooks add
``(x·V)·(A + c·U_t)ᵀ`` (c = ±ε during the forwards, 0 otherwise). A (m×r, float32,
``state[p]["virtual_factor"]``, on the V epoch ``state[p]["virtual_epoch"]``) holds the updates
not yet written: A ← A − lr·g·U_t (LOZO-M: A ← A − lr·N; ``directions=q``:
A ← A − lr·Σ_k (g_k/q)·U_(d_k), the step's directions sharing its V); at the end of a V-refresh
step the old A goes into W in one pass, W += A·V_oldᵀ, and A restarts on the new V.

On one GPU the tensors' U_t, V, A and the hooks' casts are flat buffers (zofast.virtual_step): a
forward costs one launch for all tensors, an update two (with one direction per step; with
several, the update and LOZO-M's momentum run per tensor).
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch

from zofast.offload_prepare import defer, home
from zofast.optim.noise import NoisePlan
from zofast.optim.passes import graphs_enabled
from zofast.virtual import VirtualLayers, VirtualTensor, plan
from zofast.virtual_step import FlatVirtual


def flat_enabled(slots) -> bool:
    """Whether `slots` keep their factors in flat buffers (FlatVirtual): one GPU with Triton."""
    return graphs_enabled(slots)


class Virtual:
    """The virtual slots of one optimizer and their hooks.

    Args:
        slots: every trained slot; the matrices the model applies through supported layers are
            marked (``slot.virtual``) and kept.
        noise: the run's seeds.
        model: the module whose forward the closure runs; None for a replay-only optimizer.
        request: the flat indices a recorded run kept virtual (replay), or None.
        names: {id(param): name} for error messages.
        stochastic: round the flushes stochastically.
        owner: the optimizer (held weakly by the hooks' registry).
    """

    def __init__(self, slots, noise: NoisePlan, model, request, names, stochastic, owner):
        matrices = [s for s in slots if s.rank]
        if model is not None:
            layers = plan(model, [s.param for s in matrices])
            chosen = {s.index: layers[id(s.param)] for s in matrices if id(s.param) in layers}
            if request is not None and sorted(request) != sorted(chosen):
                raise ValueError(
                    f"virtual_indices {sorted(request)} do not match the tensors this model "
                    f"applies through its layers: {sorted(chosen)}"
                )
        else:  # replay: the recorded indices, no hooks (no forward runs)
            by_index = {s.index: s for s in matrices}
            bad = [i for i in request if i not in by_index]
            if bad:
                raise ValueError(
                    f"virtual_indices {bad[:5]} are not trained matrices of this optimizer"
                )
            chosen = {i: [] for i in request}
        for slot in slots:
            slot.virtual = None
            if slot.index in chosen:
                name = names.get(id(slot.param), f"parameter {slot.index}")
                slot.virtual = VirtualTensor(
                    slot.index, name, slot.param, slot.rank, chosen[slot.index]
                )
        self.slots = [s for s in slots if s.virtual is not None]
        self.noise, self.model, self.stochastic = noise, model, stochastic
        self.layers = VirtualLayers([s.virtual for s in self.slots], owner=owner)
        # On one GPU each step's (U, V) of every virtual tensor come from one launch, and the
        # hooks' factors from one more per forward.
        self._flat = (
            FlatVirtual([s.virtual for s in self.slots]) if flat_enabled(self.slots) else None
        )
        self.detached = False

    def attach(self) -> None:
        if self.model is not None:
            self.layers.attach()

    def check_decay(self, wds: list[float]) -> None:
        for slot in self.slots:
            if wds[slot.group]:
                raise ValueError(
                    f"weight_decay {wds[slot.group]} on {slot.virtual.name}, a tensor of "
                    "mode='virtual': decay would need a full pass over it every step; use "
                    "weight_decay=0 for the groups of virtual tensors (or mode='inplace')"
                )

    def check_step(self) -> None:
        if self.detached:
            raise ValueError(
                "this virtual-mode optimizer was detached from its model: create a new one "
                "(load_state_dict continues the run)"
            )
        if self.model is None:
            raise ValueError(
                "this virtual-mode optimizer was built without a model (for replay): it "
                "cannot step; pass model=..."
            )

    def coef(self, d: int, c: float) -> None:
        """The layers see W + A·V_Aᵀ + c·U_d·V_dᵀ, d a direction index (c = 0: no
        perturbation)."""
        if not self.layers.attached:
            return  # no hooks (replay): no forward runs, the factors are not needed
        tensors = self.layers.tensors
        if c and any(vt.step != d for vt in tensors):
            if self._flat is None:
                self._load_directions(d)
            else:
                for vt, (U, V) in zip(tensors, self._step_directions(d), strict=True):
                    vt.set_direction(d, self.noise.epoch(d), U, V)
        for vt in tensors:
            vt.set_coef(c)
        if self._flat is not None:
            self._flat.prepare(c)

    def _load_directions(self, d: int) -> None:
        """Give every virtual tensor (U_d, V), one lowrank_factors call each: made now, or for
        a streamed block's tensors just before the block's upload (zofast.offload_prepare; at
        the first read of U or V if that comes first), from the seeds of now."""
        epoch, blocks = self.noise.epoch(d), {}
        for slot in self.slots:
            vt = slot.virtual
            where, block = home(slot.param)
            if block is None:
                vt.set_direction(d, epoch, *self.noise.factors(slot, d))
                continue
            vt.set_direction(d, epoch, self.noise.factors_maker(slot, d, device=where))
            blocks.setdefault(block, (slot.param, []))[1].append(vt)
        for param, group in blocks.values():
            defer(param, ("virtual", id(self)), partial(self.layers.prepare, group))

    def _step_directions(self, d: int) -> list:
        """(U_d, V) of every virtual tensor: views of FlatVirtual's buffers (one launch on a GPU,
        bit for bit lowrank_factors' numbers), or one lowrank_factors call per tensor."""
        if self._flat is None:
            return [self.noise.factors(slot, d) for slot in self.slots]
        index = np.array([s.index for s in self.slots])
        epoch = self.noise.epoch(d)
        table = np.stack(
            [self.noise.seed_array("u", d)[index], self.noise.seed_array("v", epoch)[index]], 1
        )
        return self._flat.load((self.noise.run, d), table)

    def updates(self, t, gs, lrs, buffers, used) -> list[tuple]:
        """Every virtual tensor's new pending factor after step t, computed before any write:
        A ← A − lr·Σ_k (g_k/q)·U_(d_k) over the step's directions, gs being the g_k/q (q = 1:
        A − lr·g·U_t; LOZO-M: A ← A − lr·N), where A is on the step's V; a fresh A on a V
        refresh, the old one then being folded into W by :meth:`commit`."""
        epoch = t // self.noise.nu
        if len(gs) == 1 and self._flat is not None and self._flat.adopt():
            source = self._flat.momentum_source(buffers) if buffers else None
            if source is not None or not buffers:
                return self._flat_updates(t, gs[0], lrs, epoch, source)
        out = []
        directions = self.noise.directions(t)
        for slot in self.slots:
            vt, lr = slot.virtual, lrs[slot.group]
            if slot.index in used:
                V = used[slot.index][1]
                delta = buffers[slot.index] * -lr
            else:
                delta = V = None
                for d, c in zip(directions, gs, strict=True):
                    if vt.step == d:  # the direction the hooks hold
                        U, V = vt.U, vt.V
                    else:
                        U, V = self.noise.factors(slot, d)
                    delta = U * (-lr * c) if delta is None else torch.add(delta, U, alpha=-lr * c)
            same = vt.epoch == epoch
            out.append((slot, torch.add(vt.A, delta) if same else delta, epoch, V))
        return out

    def flat_step(self, t: int):
        """The FlatVirtual with step t's direction loaded (and given to the tensors), or None
        (per-tensor path; also with several directions per step)."""
        if self._flat is None or self.noise.q > 1:
            return None
        if any(s.virtual.step != t for s in self.slots):  # replay: no forward loaded them
            for vt, (U, V) in zip(self.layers.tensors, self._step_directions(t), strict=True):
                vt.set_direction(t, self.noise.epoch(t), U, V)
        return self._flat

    def _flat_updates(self, t, g, lrs, epoch, source) -> list[tuple]:
        """:meth:`updates` in two launches for all tensors (FlatVirtual.updated); `source`:
        LOZO-M's flat momentum buffer."""
        self.flat_step(t)
        fresh = self.slots[0].virtual.epoch != epoch
        if source is None:
            scales = [-lrs[s.group] * g for s in self.slots]
        else:
            scales = [-lrs[s.group] for s in self.slots]
        A = self._flat.updated(scales, fresh, source)
        return [(slot, a, epoch, slot.virtual.V) for slot, a in zip(self.slots, A, strict=True)]

    def _round_seeds(self, role: str, t: int):
        return self.noise.seeds(role, t) if self.stochastic else None

    def commit(self, pending: list[tuple], state, t: int) -> None:
        """Install :meth:`updates`' factors (on a V refresh the old A goes into W first)."""
        seeds = self._round_seeds("flush", t)
        for slot, A, epoch, V in pending:
            vt = slot.virtual
            if vt.epoch is not None and vt.epoch != epoch:
                vt.flush(None if seeds is None else seeds[slot.index])
            vt.set_coef(0.0)
            vt.set_pending(A, epoch, V)
            state[slot.param]["virtual_factor"] = A
            state[slot.param]["virtual_epoch"] = epoch
        if self._flat is not None:
            self._flat.committed()

    @property
    def unflushed(self) -> bool:
        return any(slot.virtual.epoch is not None for slot in self.slots)

    def settle(self, state, t: int) -> None:
        """W += A·V_Aᵀ for every tensor with a pending A (one pass each), then A = 0; t: the
        number of completed steps (seeds of the stochastic rounding)."""
        seeds = self._round_seeds("settle", t)
        for slot in self.slots:
            vt = slot.virtual
            if vt.epoch is not None:
                vt.flush(None if seeds is None else seeds[slot.index])
                state[vt.param].pop("virtual_factor", None)
                state[vt.param].pop("virtual_epoch", None)

    def detach(self) -> None:
        if self.layers.attached:
            self.layers.remove_hooks()
            self.detached = True

    def load(self, state) -> None:
        """Rebuild the pending factors from a loaded optimizer state."""
        for slot in self.slots:
            vt, entry = slot.virtual, state[slot.param]
            vt.set_coef(0.0)
            vt.set_direction(None, None, None, None)
            if "virtual_factor" in entry:
                epoch = int(entry["virtual_epoch"])
                V = self.noise.factors(slot, epoch * self.noise.nu, epoch)[1]
                vt.set_pending(entry["virtual_factor"], epoch, V)
            else:
                vt.set_pending(None, None, None)
