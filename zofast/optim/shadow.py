"""The shadow part: an exact mode for every optimizer and every trained tensor.

The forwards see W + c·Z through zofast.shadow's hooks (a perturbed temporary built just before
its module runs, or the looked-up rows of an embedding, or a tied head's extra product), with
c = +ε in the first forward, −ε in the second and 0 otherwise; the stored weights are written by
the update alone: one pass per step, ``W ← (1 − lr·wd)·W − lr·g·Z_t`` (LOZO-M: ``− lr·N·Vᵀ``;
``directions=q``: ``− lr·Σ_k (g_k/q)·Z_(d_k)``, a term per direction),
rounded stochastically by default for bf16 / fp16 (``rounding``). A failing step writes nothing,
so the weights stay bit-identical; at lr = 0 they never move.

``accumulate`` = K > 1 (no momentum): the updates of K steps are written together, in one pass
with K terms and one rounding, W ← (Π d_k)·W + Σ_k (Π_(j>k) d_j)·(−lr_k·g_k)·Z_k; the forwards in
between see the weights of the last write, as K micro-batches of gradient accumulation see one
set of weights. A stochastic rounding per step adds a variance of about ulp·|lr·g·z| per weight,
far more than the update's own when |lr·g·z| ≪ ulp (bf16 at ZO learning rates); one rounding per
K steps divides it by about √K (bench/tools/precision.py teacher, 64 inputs, MeZO bf16 ÷ fp32's
loss reduction: 63 % at K = 1, 74 % at 8, 90 % at 32, 93 % at 64, 99 % at 128). With low-rank
tensors a write also ends each V epoch (LOZO's ν), so that its terms share one V: a write across
an epoch boundary took a pass compiled for that boundary's place among its K terms, a new one
for almost every write when ν does not divide K (most likely why MiniLM, bf16, ν = 50, K = 64
took ~740 ms a step over steps 100-300 against ~50 ms in traced steps, bench/results/
2026-12-03-session10), and across two boundaries no graph at all.

Paired steps (zofast.optim.paired) hook the same tensors per row instead
(:mod:`zofast.paired_layers`); the update pass is the same.
"""

from __future__ import annotations

import warnings

from zofast import paired_layers
from zofast.optim.noise import NoisePlan
from zofast.optim.passes import Passes
from zofast.shadow import ShadowLayers, ShadowTensor, Use, plan
from zofast.shadow_step import PRESET_MAX_NUMEL

# A model with at most this many trained elements, on one device, is host-bound: the shadow
# hooks' launches, one per module and forward, cost more than its forward's kernels (H200,
# MiniLM (22.7M), bf16 MeZO: the GPU busy 1.1 of 72 ms a step, bench/results/
# 2026-12-03-session9). There every tensor is a preset: one multi-tensor pass a forward, no
# hook, for one more copy of the weights (at most 64 MB in bf16).
PRESET_ALL_NUMEL = 1 << 25


def plan_ways(model, tensors: list[ShadowTensor], trained_numel: int = 0) -> None:
    """How each tensor reaches the forward (zofast.shadow.plan), by the model's size.

    Low-rank noise reaches a Linear / Conv1D weight more cheaply as an extra product,
    y += c·(x·V)·Uᵀ, than through a perturbed copy of W (H200, bf16, 8192×2048, 2048 tokens,
    rank 2: +0.03 ms against +0.21 ms); full-rank noise costs less as a copy (+0.10 ms against
    +0.50 ms), so MeZO takes products for tied heads only (bench/results/
    2026-12-02-shadow-layers). Biases and norms are presets (PRESET_MAX_NUMEL): in virtual mode
    this part holds only them, and a budget of 1 % of its own elements left most of OPT-1.3B's
    243 as temporaries, a launch per module and forward (2026-12-03-exact-2). On a small model
    on one device (PRESET_ALL_NUMEL) every tensor is a preset, embeddings and tied heads too:
    the forward runs no hook at all (and can be compiled, zofast.train's ``compile``).
    """
    total = trained_numel or sum(st.param.numel() for st in tensors)
    one_device = len({st.param.device for st in tensors}) <= 1
    if total <= PRESET_ALL_NUMEL and one_device:
        plan(model, tensors)  # (checks that a module registers every tensor)
        for st in tensors:
            st.uses = [Use(model, "preset", None)]
        return
    lowrank = any(st.rank for st in tensors)
    plan(
        model,
        tensors,
        product_min_numel=0 if lowrank else None,
        preset_max_numel=PRESET_MAX_NUMEL,
        preset_budget=max(PRESET_MAX_NUMEL, total // 100),
    )


class Shadow:
    """The shadow slots of one optimizer, their hooks and their update pass.

    Args:
        slots: the slots (every trained tensor).
        noise: the run's seeds.
        model: the module whose forward the closure runs; None for a replay-only optimizer.
        names: {id(param): name}.
        stochastic: round the update pass stochastically.
        owner: the optimizer (held weakly by the hooks' registry).
        accumulate: steps per write of the updates (see the module docstring).
        rows: paired steps: the optimizer's :class:`zofast.paired_layers.Rows` (the tensors are
            then hooked per row, zofast.paired_layers); None otherwise.
        trained_numel: elements of every tensor the optimizer trains (virtual mode's too): 1 %
            of them may go to the presets' copies.
    """

    def __init__(
        self,
        slots,
        noise: NoisePlan,
        model,
        names,
        stochastic: bool,
        owner,
        accumulate: int = 1,
        rows=None,
        trained_numel: int = 0,
    ):
        self.slots, self.noise, self.model = slots, noise, model
        self.accumulate = accumulate
        # Steps not yet written (accumulate > 1): (step, its direction indices, per group the
        # −lr·g_k/q of each direction, per group the decay).
        self.deferred: list[tuple] = []
        self.passes = Passes(slots, noise)
        self._lowrank = any(s.rank for s in slots)
        self.stochastic = stochastic
        tensors = [
            ShadowTensor(s.index, names.get(id(s.param), f"parameter {s.index}"), s.param, s.rank)
            for s in slots
        ]
        if rows is not None:
            if model is not None:
                paired_layers.plan(model, tensors)
            self.layers = paired_layers.PairedShadowLayers(tensors, rows, owner)
        else:
            if model is not None:
                plan_ways(model, tensors, trained_numel)
            self.layers = ShadowLayers(tensors, owner)
        self.detached = False
        self._checked_usage = False
        self._directions = None

    def attach(self) -> None:
        if self.model is not None:
            self.layers.attach()

    def check_step(self) -> None:
        if self.detached:
            raise ValueError(
                "this shadow-mode optimizer was detached from its model: create a new one "
                "(load_state_dict continues the run)"
            )
        if self.model is None:
            raise ValueError(
                "this shadow-mode optimizer was built without a model (for replay): it cannot "
                "step; pass the model (or model=...)"
            )

    def coef(self, d: int, c: float) -> None:
        """The forwards see W + c·Z_d, d a direction index (c = 0: the stored W, no work)."""
        if not self.layers.attached:
            return  # replay: no forward runs
        if c == 0.0:
            self.layers.restore()  # a forward cut short by an interrupt may have left one
        # The directions loaded: keyed by the run seed too (load_state_dict may change it).
        if c and self._directions != (self.noise.run, d):
            seeds = []
            for slot in self.slots:
                us, vs, _ = self.noise.terms(slot, [d], [c])
                seeds.append((us[0], vs[0]) if slot.rank else (us[0],))
            self.layers.set_direction(d, seeds)
            self._directions = (self.noise.run, d)
        self.layers.set_coef(c)

    def warn_unused(self) -> None:
        """After the first step: name the trained tensors that no forward perturbed (a weight
        read outside its module's forward sees the stored W, so its estimate is noise)."""
        if self._checked_usage or not self.layers.attached:
            return
        self._checked_usage = True
        unused = [st.name for st in self.layers.tensors if not st.used]
        if unused:
            warnings.warn(
                f"mode='shadow': no forward of the first step used {unused[:5]}"
                f"{' and more' if len(unused) > 5 else ''} through its module; a tensor the model "
                "reads outside its module's forward is not perturbed (its update is noise). "
                "Freeze unused tensors, or use mode='inplace' for such a model",
                RuntimeWarning,
                stacklevel=4,
            )

    def _round(self, t: int) -> dict:
        return {"round_index": t} if self.stochastic else {}

    def finish(self, t, gs, lrs, wds, momentum=None, buffers=None, used=None) -> None:
        """The update pass: W ← (1 − lr·wd)·W − lr·Σ_k (g_k/q)·Z_(d_k) over the step's
        directions, gs being the g_k/q (q = 1: W − lr·g·Z_t; LOZO-M: − lr·N·Vᵀ, one pass
        each)."""
        self.layers.restore()  # the presets' copies out: the pass writes the stored tensors
        decays = [1.0 - lr * wd for lr, wd in zip(lrs, wds, strict=True)]
        if momentum is not None:
            momentum.apply_all(self.slots, used, buffers, t, lrs, self.stochastic, w_scales=decays)
            return
        directions = self.noise.directions(t)
        scales = [[-lr * c for c in gs] for lr in lrs]
        if self.accumulate > 1:
            self.deferred.append((t, directions, scales, decays))
            if len(self.deferred) == self.accumulate or self._epoch_ends(t):
                self.write()
            return
        scaled = {"group_w_scales": decays} if any(d != 1.0 for d in decays) else {}
        self.passes.run(directions, scales, **self._round(t), **scaled)

    def _epoch_ends(self, t: int) -> bool:
        """Whether step t is the last of its V epoch (low-rank tensors only)."""
        if not self._lowrank:
            return False
        return self.noise.epoch(self.noise.directions(t)[-1]) != self.noise.epoch(
            self.noise.directions(t + 1)[0]
        )

    def write(self) -> None:
        """Write the deferred steps' updates in one pass (module docstring), rounded with the
        round seeds of the last of them; nothing to do when none is deferred."""
        if not self.deferred:
            return
        self.layers.restore()
        steps = [d for _, directions, _, _ in self.deferred for d in directions]
        scales, w_scales = [], []
        for gi in range(len(self.deferred[0][2])):
            later, terms = 1.0, []
            for _, _, updates, decays in reversed(self.deferred):
                terms = [u * later for u in updates[gi]] + terms
                later *= decays[gi]
            scales.append(terms)
            w_scales.append(later)
        scaled = {"group_w_scales": w_scales} if any(d != 1.0 for d in w_scales) else {}
        self.passes.run(steps, scales, **self._round(self.deferred[-1][0]), **scaled)
        self.deferred = []

    def finish_queued(self, t, loss_plus, loss_minus, lrs, eps):
        """:meth:`finish` (no momentum, no decay) with −lr·g computed on the device and the pass
        queued behind the second forward (Passes.queued); None where that does not apply. A
        non-finite g or update gives a zero term: the pass then writes W unchanged."""
        if self.accumulate > 1:
            return None
        self.layers.restore()
        scales = [[0.0]] * len(lrs)
        d = self.noise.directions(t)[0]  # one direction
        return self.passes.queued([d], scales, 0, loss_plus, loss_minus, lrs, eps, **self._round(t))

    def detach(self) -> None:
        if self.layers.attached:
            self.layers.remove_hooks()
            self.detached = True
