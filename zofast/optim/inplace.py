"""The in-place part: trained tensors that carry the perturbation themselves.

``W += ε·Z_t`` before the first forward, ``W −= 2ε·Z_t`` before the second, and one fused pass
``W += ε·Z_t − lr·g·Z_t`` (pipelined: ``+ ε·Z_(t+1)`` too) after it. With ``directions=q`` the
step's directions d_0 .. d_(q−1) follow one another: ``W += ε·Z_(d_k) + ε·Z_(d_(k+1))`` (one pass)
between them, and the last pass restores d_(q−1) and adds ``−lr·(g_k/q)·Z_(d_k)`` for every k.
Every pass rounds the weights to their dtype, so bf16 / fp16 weights random-walk (see
zofast.optim's docstring); float32 ones stay within the documented ulp bounds. With
``rounding="stochastic"`` the last pass (the one that writes the update) rounds stochastically;
the perturbation passes round to nearest.
"""

from __future__ import annotations

from zofast.optim.noise import NoisePlan, Slot
from zofast.optim.passes import Passes
from zofast.optim.sharding import reshard


class InPlace:
    """Passes over the in-place slots.

    Args:
        slots: the in-place slots.
        noise: the run's seeds.
        stochastic: round the update pass stochastically.
        fsdp: FSDP2 modules to reshard after every pass (zofast.optim.sharding.reshard).
    """

    def __init__(
        self, slots: list[Slot], noise: NoisePlan, stochastic: bool = False, fsdp: list = ()
    ):
        self.slots = slots
        self.passes = Passes(slots, noise)
        self.stochastic = stochastic
        self.fsdp = list(fsdp) if any(s.sharded for s in slots) else []

    def shift(self, d: int, scale: float, n_groups: int, round_index: int | None = None) -> None:
        """W += scale·Z_d for every slot (d a direction index): one pass, rounded to nearest or,
        with round_index, stochastically with that step's round seeds."""
        if self.slots:
            self.passes.run([d], [[scale]] * n_groups, round_index)
            reshard(self.fsdp)

    def restore(self, d: int, scale: float, n_groups: int, t: int) -> None:
        """An aborted step's restore, W += scale·Z_d, rounded as step t's update pass is: the
        queued finish turns an abort into that pass with zero update terms (Passes.queued), so
        a run that aborts there and one (or a replay) that aborts here write the same bits."""
        self.shift(d, scale, n_groups, t if self.stochastic else None)

    def move(self, d_from: int, d_to: int, eps: float, n_groups: int) -> None:
        """From −ε·Z_(d_from) to +ε·Z_(d_to) (the next direction of a step): one pass."""
        if self.slots:
            self.passes.run([d_from, d_to], [[eps, eps]] * n_groups)
            reshard(self.fsdp)

    def _last_pass(self, t, nxt, group_scales):
        """The update pass's terms: the restore of the step's last direction, one update term
        per direction (q = 1: [t, t]), then nxt's perturbation where pipelined."""
        directions = self.passes.noise.directions(t)
        steps = [directions[-1], *directions] + ([] if nxt is None else [nxt])
        return steps, group_scales, {"round_index": t} if self.stochastic else {}

    def finish(self, t, gs, lrs, wds, eps, nxt, momentum=None, buffers=None, used=None) -> None:
        """Restore, update (and pipelined: perturb for direction index nxt) in one pass per
        tensor; gs are g_k / q for the step's directions (q = 1: [g]).

        Weight decay is one ``p.mul_(1 − lr·wd)`` on the −ε-perturbed weights right before the
        pass, whose restore term is scaled by the same factor. With momentum the passes are
        ``momentum.apply_all``'s (one per slot, or one for the flat vectors' slots)."""
        for slot in self.slots:
            decay = 1.0 - lrs[slot.group] * wds[slot.group]
            if decay != 1.0:
                slot.param.mul_(decay)
        if momentum is not None:
            restores = [(1.0 - lr * wd) * eps for lr, wd in zip(lrs, wds, strict=True)]
            momentum.apply_all(
                self.slots, used, buffers, t, lrs, self.stochastic, restores, eps, nxt
            )
        if momentum is None and self.slots:
            group_scales = [
                [(1.0 - lr * wd) * eps] + [-lr * c for c in gs] + ([] if nxt is None else [eps])
                for lr, wd in zip(lrs, wds, strict=True)
            ]
            steps, group_scales, extra = self._last_pass(t, nxt, group_scales)
            self.passes.run(steps, group_scales, **extra)
        reshard(self.fsdp)

    def finish_queued(self, t, loss_plus, loss_minus, lrs, eps, nxt):
        """:meth:`finish` (one direction, no momentum, no weight decay) with −lr·g computed on
        the device and the pass queued behind the second forward (see Passes.queued); None where
        that does not apply. If g or an update is not finite the pass is the restore alone, bit
        for bit the abort's one-term pass (the zero terms add exact zeros)."""
        group_scales = [[eps, 0.0] + ([] if nxt is None else [eps])] * len(lrs)
        steps, group_scales, extra = self._last_pass(t, nxt, group_scales)
        return self.passes.queued(steps, group_scales, 1, loss_plus, loss_minus, lrs, eps, **extra)
