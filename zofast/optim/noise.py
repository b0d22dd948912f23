"""Which noise each trained tensor gets at each step: slots, seeds and materialised factors.

Seeds come from ``zofast.rng.RunSeeds(seed)`` with tensor index = the tensor's position in the
optimizer's flat parameter list (frozen tensors included, so freezing does not shift seeds).
Direction k of step t (``directions=q`` per step, zofast.optim.directions) has the direction index
d = t·q + k (q = 1: d = t). Low-rank slots: U_d from role "u" at index d, V from role "v" at index
t // nu (every direction of a step shares the step's V); full-rank slots: z_d from role "full" at
index d; stochastic rounding of an update: role "round" at index t.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from zofast.perturb import gaussian_noise, lowrank_factors
from zofast.rng import RunSeeds


@dataclass
class Slot:
    """A trained tensor: its flat index (seeds), group, and how it is perturbed."""

    index: int
    param: torch.Tensor
    group: int
    shape: tuple
    rank: int  # 0: full-rank noise
    virtual: object | None = None  # a zofast.virtual.VirtualTensor: applied through the layers
    row_offset: int = 0  # a shard's first row in the whole tensor (zofast.optim.sharding)
    sharded: bool = False  # param is a rank's shard of a bigger tensor

    @property
    def offset(self) -> int:
        """The global index of the first element of param (full-rank noise's offset)."""
        return self.row_offset * (self.param.numel() // max(self.shape[0], 1)) if self.shape else 0


class NoisePlan:
    """Seeds of one run (cached per (role, step)) and the factors they give.

    Args:
        run_seed: the run seed.
        n_params: length of the optimizer's flat parameter list.
        nu: steps per V epoch (LOZO; 1 for MeZO).
        q: directions per step.
    """

    def __init__(self, run_seed: int, n_params: int, nu: int, q: int = 1):
        self.n_params, self.nu, self.q = n_params, nu, q
        self.reseed(run_seed)

    def directions(self, t: int) -> list[int]:
        """The direction indices of step t: t·q .. t·q + q − 1."""
        return list(range(t * self.q, (t + 1) * self.q))

    def epoch(self, d: int) -> int:
        """The V epoch of direction index d: its step d // q, over nu."""
        return d // (self.q * self.nu)

    def reseed(self, run_seed: int) -> None:
        """Derive every seed from `run_seed` from now on (a loaded optimizer state's)."""
        self.run = RunSeeds(run_seed)
        self._cache: dict = {}

    def seeds(self, role: str, index: int) -> list[int]:
        key = (role, index)
        seeds = self._cache.get(key)
        if seeds is None:
            if len(self._cache) >= 32 + 4 * self.q:  # a step uses about 2q + 4 keys
                self._cache.clear()
            seeds = self.run.seeds(index, self.n_params, role)
            self._cache[key] = seeds
        return seeds

    def seed_array(self, role: str, index: int) -> np.ndarray:
        """seeds() as a uint64 numpy array (cached alongside), for building pass tables."""
        key = ("array", role, index)
        seeds = self._cache.get(key)
        if seeds is None:
            seeds = np.array(self.seeds(role, index), dtype=np.uint64)
            self._cache[key] = seeds
        return seeds

    def factors(self, slot: Slot, d: int, epoch: int | None = None):
        """Materialised (U_d, V_epoch) of a low-rank slot, d a direction index (epoch defaults to
        d's)."""
        return self.factors_maker(slot, d, epoch)()

    def factors_maker(self, slot: Slot, d: int, epoch: int | None = None, device=None):
        """A callable making :meth:`factors` later, with the seeds of now (on `device`; None:
        the slot's)."""
        epoch = self.epoch(d) if epoch is None else epoch
        return partial(
            lowrank_factors,
            slot.shape,
            self.seeds("u", d)[slot.index],
            self.seeds("v", epoch)[slot.index],
            slot.rank,
            row_offset=slot.row_offset,
            device=slot.param.device if device is None else device,
        )

    def noise(self, slot: Slot, d: int) -> torch.Tensor:
        """Materialised full-rank z_d of a slot (d a direction index), flattened."""
        seed = self.seeds("full", d)[slot.index]
        return gaussian_noise(
            (slot.param.numel(),), seed, offset=slot.offset, device=slot.param.device
        )

    def terms(self, slot: Slot, steps: list[int], scales: list[float]):
        """(seeds, v_seeds or None, scales) of the terms scale_k·Z_(steps[k]) of one slot, steps
        being direction indices."""
        if slot.rank:
            us = [self.seeds("u", s)[slot.index] for s in steps]
            vs = [self.seeds("v", self.epoch(s))[slot.index] for s in steps]
            return us, vs, scales
        return [self.seeds("full", s)[slot.index] for s in steps], None, scales
