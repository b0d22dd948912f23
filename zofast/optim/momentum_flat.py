"""LOZO-M's full-rank tensors (biases, norms) in flat buffers.

Per tensor and step, the momentum of a 1-D tensor took a gaussian_noise call for z_t and two
elementwise ops for m ← β·m + (1 − β)·g·z_t: on OPT-1.3B 243 tensors, about 40 ms of host time a
step (bench/results/2026-12-03-exact-2, `momentum._step` in exact_host.log). Here z_t of every
such tensor is made in one engine pass into one float32 buffer (a CUDA graph on a GPU; per
tensor elsewhere) and m in one op over the flat buffer. The tensors' z and m are views of these
buffers; the numbers are the per-tensor ones (z exactly: the pass adds 1·z to zeros; m: the same
elementwise ops).
"""

from __future__ import annotations

import numpy as np
import torch

from zofast.optim.noise import NoisePlan, Slot
from zofast.shadow_step import bulk_on

ALIGN = 64  # elements: every tensor's part starts 256-byte aligned


class FlatVectors:
    """z_t and the momentum of `slots` (full-rank, unsharded, one device) in flat buffers.

    Args:
        slots: the full-rank slots.
        noise: the run's seeds.
    """

    def __init__(self, slots: list[Slot], noise: NoisePlan):
        self.slots, self.noise = list(slots), noise
        self.device = self.slots[0].param.device
        self.index = np.array([s.index for s in self.slots], dtype=np.int64)
        sizes = [s.param.numel() for s in self.slots]
        starts = np.concatenate([[0], np.cumsum([-(-n // ALIGN) * ALIGN for n in sizes])])
        self._parts = [(int(a), int(a) + n) for a, n in zip(starts[:-1], sizes, strict=True)]
        self.z = torch.zeros(int(starts[-1]), dtype=torch.float32, device=self.device)
        self.z_views = self.views(self.z)
        self._loaded = None  # (run seeds, step) whose z the buffer holds
        self._graph = None  # a GraphedPass over z's views (GPU), built at the first load
        self._m: tuple = (None, None)  # the last momentum's (flat buffer, views)

    @property
    def starts(self) -> list[int]:
        """Each slot's first element in the flat buffers."""
        return [a for a, _ in self._parts]

    def flat_of(self, buffers: dict, used: dict) -> torch.Tensor | None:
        """The flat momentum behind `buffers` ({index: buffer}) where every slot's entry is a
        view of :meth:`momentum`'s last buffer and its `used` z a view of z; else None."""
        m, views = self._m
        if views is None:
            return None
        for slot, view, z in zip(self.slots, views, self.z_views, strict=True):
            if buffers.get(slot.index) is not view or used.get(slot.index, (None,))[0] is not z:
                return None
        return m

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Each slot's part of a flat buffer, as a flat view."""
        return [flat[a:b] for a, b in self._parts]

    def load(self, t: int) -> list[torch.Tensor]:
        """z_t of every slot (views of one buffer, overwritten by the next step's)."""
        if self._loaded != (self.noise.run, t):
            if bulk_on(self.device):
                self._load_graphed(t)
            else:
                for slot, view in zip(self.slots, self.z_views, strict=True):
                    view.copy_(self.noise.noise(slot, t))
            self._loaded = (self.noise.run, t)
        return self.z_views

    def _load_graphed(self, t: int) -> None:
        if self._graph is None or self._graph.stale:
            from zofast.graphed import GraphedPass

            self._graph = GraphedPass(self.z_views, [0] * len(self.slots), 1)
        seeds = np.zeros((len(self.slots), 2), dtype=np.uint64)
        seeds[:, 0] = self.noise.seed_array("full", t)[self.index]
        self.z.zero_()
        self._graph.replay_table(seeds, np.ones((len(self.slots), 1), dtype=np.float32))

    def momentum(self, old: list | None, beta: float, g: float) -> tuple:
        """m ← β·m + (1 − β)·g·z (m = g·z where `old` is None) for every slot, out of place into
        a new flat buffer, after :meth:`load`. Returns (the buffer, per-slot views)."""
        self._m = flat_momentum(self.z, old, self._m, beta, g, self.views)
        return self._m


def flat_momentum(z: torch.Tensor, old: list | None, held: tuple, beta: float, g: float, views_of):
    """The momentum of a flat layout: β·m + (1 − β)·g·z (g·z where `old` is None), out of place,
    elementwise the per-tensor ops. `held`: the last (buffer, views); `old` (the per-tensor
    buffers) are copied into a new zeroed buffer where they are not those views (a loaded state,
    or buffers made per tensor). `views_of(flat)`: the per-tensor views of a buffer like z.
    Returns (the new buffer, its views)."""
    if old is None:
        m = z * g
    else:
        buffer, views = held
        if views is None or any(x is not y for x, y in zip(old, views, strict=True)):
            buffer = torch.zeros_like(z)
            for view, x in zip(views_of(buffer), old, strict=True):
                view.copy_(x)
        m = torch.add(buffer * beta, z, alpha=(1.0 - beta) * g)
    return m, views_of(m)
