"""What a shadow-mode step prepares once for all its tensors instead of once per tensor.

A shadow forward perturbs every trained tensor through a hook on the module that uses it
(:mod:`zofast.shadow`). On a model of a few hundred tensors, per-tensor host work (an upload of
the seeds, the low-rank factors, an engine call with its checks) took longer than the forward's
own kernels (H200, OPT-1.3B, bf16, batch 16×256: a LOZO step 4.7× two plain forwards,
bench/results/2026-12-03-exact-1). Here the same numbers are made in bulk, bit for bit:

* :class:`StepFactors`: the step's (U, V) of every low-rank tensor applied as a product or as
  rows, generated in one multi-tensor launch on a GPU (zofast.kernels.multi; per tensor on other
  devices) and cast once to the weights' dtype. The hooks read (r, m) and (r, n) views whose
  rows are 16-element aligned, so their rank-r products need no padded copies.
* :class:`DeviceSeeds`: the engine's seeds of every temporary, uploaded once per step, and c,
  once per forward.
* :class:`Presets`: the small tensors (biases, norms: ``preset`` in :func:`zofast.shadow.plan`)
  copied into one buffer and perturbed there by one engine pass per forward (a CUDA graph on a
  GPU), then swapped in for the whole forward: no hook, no launch per module. Their W + c·Z is
  bit for bit a temporary's (the engine writes the same numbers into a copy as out of place).
"""

from __future__ import annotations

import numpy as np
import torch

from zofast._ext import resolve_backend
from zofast.perturb import gaussian_, lowrank_, lowrank_factors

# Factor rows are padded to this many elements, as zofast.kernels.multi pads them (that module
# needs Triton; this one must import without it).
STRIDE_ALIGN = 16

__all__ = ["PRESET_ALIGN", "PRESET_MAX_NUMEL", "DeviceSeeds", "Presets", "StepFactors", "bulk_on"]

# Tensors of at most this many elements that would take a temporary are presets: on OPT-1.3B
# every bias and norm (243 of 388 tensors, 0.05 % of the weights).
PRESET_MAX_NUMEL = 1 << 16
PRESET_ALIGN = 64  # elements: every preset copy starts 128-byte aligned in bf16 (vector loads)


def bulk_on(device: torch.device) -> bool:
    """Whether the multi-tensor launches (Triton) serve tensors on `device`: a GPU with Triton."""
    return device.type == "cuda" and resolve_backend("auto", device) == "triton"


def transposed(factor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A factor (k, r) as (r, k) in `dtype`, rows padded to STRIDE_ALIGN elements: the layout
    StepFactors' bulk views have, so that the hooks' products are the same cuBLAS calls (and
    the same numbers) whichever way the factors were made."""
    k, r = factor.shape
    stride = -(-k // STRIDE_ALIGN) * STRIDE_ALIGN
    out = torch.empty(r, stride, dtype=dtype, device=factor.device)[:, :k]
    return out.copy_(factor.t())


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """t on `device`; from the host to a GPU through pinned memory, without waiting for the GPU (a
    pageable copy of more than 64 KB waits for the stream's earlier work, so the host could not
    prepare a streamed block while the previous ones compute, zofast.offload)."""
    device = torch.device(device)
    if t.device.type == "cpu" and device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def upload_seeds(rows: np.ndarray, device: torch.device) -> torch.Tensor:
    """An int64 table of uint64 seeds on `device`."""
    return to_device(torch.from_numpy(rows.astype(np.uint64).view(np.int64)), device)


class StepFactors:
    """Each step's low-rank factors of `tensors` (ShadowTensors of rank ≥ 1, one device), handed
    to each as (Uᵀ, Vᵀ), (r, m) and (r, n) in its dtype (ShadowTensor.set_factors)."""

    def __init__(self, tensors):
        self.tensors = list(tensors)
        self._plan = None  # a factors-only MultiPass, built at the first load on a GPU

    def load(self) -> None:
        """Make the factors of each tensor's current direction (set_direction)."""
        if not self.tensors:
            return
        device = self.tensors[0].param.device
        if not bulk_on(device):
            for st in self.tensors:
                U, V = lowrank_factors(st.param.shape, *st.seeds, st.rank, device=device)
                st.set_factors(transposed(U, st.param.dtype), transposed(V, st.param.dtype))
            return
        if self._plan is None:
            self._build(device)
        seeds = upload_seeds(np.array([st.seeds for st in self.tensors], dtype=np.uint64), device)
        self._plan.launch_factors(seeds, self._ones, *self._float32)
        for u, v in self._casts.values():
            u.copy_(self._float32[0])
            v.copy_(self._float32[1])
        for st, (ut, vt) in zip(self.tensors, self._views, strict=True):
            st.set_factors(ut, vt)

    def _build(self, device) -> None:
        from zofast.kernels.multi import MultiPass

        params, ranks = [st.param for st in self.tensors], [st.rank for st in self.tensors]
        self._plan = plan = MultiPass(params, ranks, 1, factors_only=True)
        self._ones = torch.ones(len(params), 1, dtype=torch.float32, device=device)
        self._float32 = plan.factor_buffers()
        # The hooks compute in the weights' dtype: one cast of all the factors per step.
        self._casts = {dtype: plan.factor_buffers(dtype) for dtype in {p.dtype for p in params}}
        views = {dtype: plan.factor_views(*casts) for dtype, casts in self._casts.items()}
        self._views = [
            (u.t(), v.t())
            for i, st in enumerate(self.tensors)
            for u, v in [views[st.param.dtype][i]]
        ]


class DeviceSeeds:
    """The engine's seeds and c of `tensors` (the temporaries, one device) on the device: the
    seeds uploaded once per step (:meth:`load`), c once per forward (:meth:`set_coef`), handed
    to each tensor as views (its ``terms``)."""

    def __init__(self, tensors):
        self.tensors = list(tensors)
        self._seeds: torch.Tensor | None = None

    def load(self) -> None:
        if not self.tensors:
            return
        width = max(len(st.seeds) for st in self.tensors)
        rows = np.zeros((len(self.tensors), width), dtype=np.uint64)
        for i, st in enumerate(self.tensors):
            rows[i, : len(st.seeds)] = st.seeds
        self._seeds = upload_seeds(rows, self.tensors[0].param.device)

    def set_coef(self, c: float) -> None:
        """Give each tensor (seeds, c) on the device (after its own set_coef(c))."""
        if not self.tensors or not c:
            return
        device = self.tensors[0].param.device
        scale = to_device(torch.tensor([c], dtype=torch.float32), device)
        for i, st in enumerate(self.tensors):
            st.set_terms(device, self._seeds[i, : len(st.seeds)], scale)


class Presets:
    """The small tensors' W + c·Z (see the module docstring; `tensors` on one device):
    :meth:`swap_in` before a forward with c ≠ 0, :meth:`swap_out` after it (or after an
    interrupted one)."""

    def __init__(self, tensors):
        self.tensors = list(tensors)
        self._copies: list[torch.Tensor] | None = None
        self._graph = None  # a GraphedPass over the copies (GPU), built at the first swap_in

    def _allocate(self) -> None:
        by_dtype: dict = {}
        for st in self.tensors:
            by_dtype.setdefault(st.param.dtype, []).append(st)
        copies = {}
        device = self.tensors[0].param.device
        for dtype, group in by_dtype.items():
            sizes = [-(-st.param.numel() // PRESET_ALIGN) * PRESET_ALIGN for st in group]
            flat = torch.empty(sum(sizes), dtype=dtype, device=device)
            start = 0
            for st, size in zip(group, sizes, strict=True):
                copies[id(st)] = flat[start : start + st.param.numel()].view(st.param.shape)
                start += size
        self._copies = [copies[id(st)] for st in self.tensors]

    def swap_in(self, c: float) -> None:
        """Build every tensor's W + c·Z into its copy and swap the copy in as the parameter's
        data (for the whole forward)."""
        if not self.tensors:
            return
        if self._copies is None:
            self._allocate()
        with torch.inference_mode(False), torch.no_grad():
            torch._foreach_copy_(self._copies, [st.param.data for st in self.tensors])
            self._perturb(c)
            for st, copy in zip(self.tensors, self._copies, strict=True):
                st.swap_to(copy)

    def _perturb(self, c: float) -> None:
        if bulk_on(self._copies[0].device):
            if self._graph is None or self._graph.stale:
                from zofast.graphed import GraphedPass

                ranks = [st.rank for st in self.tensors]
                self._graph = GraphedPass(self._copies, ranks, 1)
            seeds = np.zeros((len(self.tensors), 2), dtype=np.uint64)
            for i, st in enumerate(self.tensors):
                seeds[i, : len(st.seeds)] = st.seeds
            scales = np.full((len(self.tensors), 1), c, dtype=np.float32)
            self._graph.replay_table(seeds, scales)
            return
        for st, copy in zip(self.tensors, self._copies, strict=True):
            if st.rank:
                lowrank_(copy, st.seeds[:1], st.seeds[1:], st.rank, [c])
            else:
                gaussian_(copy, list(st.seeds), [c])

    def swap_out(self) -> None:
        for st in self.tensors:
            st._swap_out()
