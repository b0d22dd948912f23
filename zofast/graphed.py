"""GraphedPass: one engine pass over many tensors, captured once in a CUDA graph and replayed
with new seeds and scales (see zofast.perturb for the noise contract it follows bit for bit)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from zofast.device_map import on_device
from zofast.perturb_args import _check_rank, check_weight, matrix_shape
from zofast.rng import MAX_SEED

__all__ = ["GraphedPass"]


class GraphedPass:
    """One engine pass over many tensors, captured once in a CUDA graph and replayed with new
    seeds and scales: no Python call and no launch per tensor.

    The pass runs as a few multi-tensor launches (zofast.kernels.multi: one per group of
    full-rank tensors of a dtype, one factor launch per rank, one low-rank launch per rank and
    dtype) that read the seeds and scales from device tables. Every tensor takes ``n_terms``
    terms per replay. A low-rank tensor (rank r ≥ 1) takes T u seeds, ONE v seed shared by its
    terms and T scales, and gets exactly ``lowrank_(w, u_seeds, [v_seed] * T, r, scales)``; a
    full-rank tensor (rank 0) takes T seeds and T scales, exactly ``gaussian_(w, seeds, scales)``
    (bit for bit: same arithmetic in the same order). Seeds and scales travel in one
    host-to-device copy per replay. With ``v_split`` = s ≥ 1 a low-rank tensor takes two v seeds,
    the first for terms 0 .. s − 1 and the second for the others (LOZO's V-refresh step): exactly
    ``lowrank_`` with those v seeds; call it through :meth:`replay_table`.

    The graph holds the tensors' addresses: if a tensor is reallocated (``model.to(...)``, a
    load that replaces storage), ``stale`` turns True and a replay raises; build a new pass.

    Options: ``stochastic=True`` gives each tensor a round seed per replay (stochastic rounding,
    bit for bit the eager ops' ``round_seed``) and ``scaled=True`` a weight scale (the eager ops'
    ``w_scale``; pass 1.0 for tensors that take none). The device tables, row i for tensor i:

    * seeds (count, T + V + S) int64, the uint64 bit patterns: columns 0 .. T − 1 the T u (or
      full-rank) seeds, then V = 1 v seed (2 with v_split), then S = 1 round seed if stochastic
      (the last column), else S = 0.
    * scales (count, T + A) float32: columns 0 .. T − 1 the T scales, then A = 1 weight scale if
      scaled (the last column), else A = 0.

    Args:
        tensors: contiguous float32 / bfloat16 / float16 CUDA tensors on one device.
        ranks: one rank per tensor (0 = full-rank noise).
        n_terms: T.
        share_with: a GraphedPass over the same tensors and ranks (another T) whose tables and
            factor buffers this one reuses (passes replayed one after another on one stream).
        v_split: 0 (one v seed per tensor) or s in 1 .. T − 1 (two; see above).
        stochastic: a round seed column (see above).
        scaled: a weight-scale column (see above).

    Example:
        >>> passes = GraphedPass([w1, b1], ranks=[2, 0], n_terms=1)  # doctest: +SKIP
        >>> passes([[11], [12]], [13, 0], [[1e-3], [1e-3]])  # doctest: +SKIP
    """

    def __init__(
        self,
        tensors: Sequence[torch.Tensor],
        ranks: Sequence[int],
        n_terms: int,
        share_with: GraphedPass | None = None,
        v_split: int = 0,
        stochastic: bool = False,
        scaled: bool = False,
    ):
        if len(tensors) != len(ranks) or not tensors:
            raise ValueError("GraphedPass needs one rank per tensor and at least one tensor")
        device = tensors[0].device
        for i, (w, rank) in enumerate(zip(tensors, ranks, strict=True)):
            check_weight(w, f"tensors[{i}]")
            if w.device != device or device.type != "cuda":
                raise ValueError("GraphedPass takes CUDA tensors on one device")
            if rank:
                _check_rank(rank, *matrix_shape(w.shape))
        if isinstance(n_terms, bool) or not isinstance(n_terms, int) or n_terms < 1:
            raise ValueError(f"n_terms must be a positive integer, got {n_terms!r}")
        if isinstance(v_split, bool) or not isinstance(v_split, int) or not 0 <= v_split < n_terms:
            raise ValueError(f"v_split must be 0 or in 1..{n_terms - 1}, got {v_split!r}")
        for name, flag in (("stochastic", stochastic), ("scaled", scaled)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be True or False, got {flag!r}")
        self.tensors, self.ranks, self.n_terms = list(tensors), list(ranks), n_terms
        self.v_split, self.stochastic, self.scaled = v_split, stochastic, scaled
        self._addresses = [w.data_ptr() for w in self.tensors]
        count = len(tensors)
        # Row i: T u (or full-rank) seeds, the v seed (two with v_split), [the round seed];
        # scales apart: T scales, [the weight scale] (class docstring).
        v_seeds = 2 if v_split else 1
        seed_width = n_terms + v_seeds + stochastic
        self._seeds = torch.zeros(count, seed_width, dtype=torch.int64, device=device)
        self._scales = torch.zeros(count, n_terms + scaled, dtype=torch.float32, device=device)
        self._host_seeds = torch.zeros_like(self._seeds, device="cpu").pin_memory()
        self._host_scales = torch.zeros_like(self._scales, device="cpu").pin_memory()
        with on_device(device):  # the events, the launches and the capture: on w's GPU
            self._capture(device, share_with)

    def _capture(self, device: torch.device, share_with: GraphedPass | None) -> None:
        from zofast.kernels.multi import MultiPass, vector_aligned

        self._copied = torch.cuda.Event()
        # Compile every kernel variant on tiny stand-ins first (same dtype, rank and alignment),
        # so that capture compiles nothing and the weights are untouched until the first replay.
        kinds = sorted(
            {
                (w.dtype, r, vector_aligned(w, r))
                for w, r in zip(self.tensors, self.ranks, strict=True)
            },
            key=str,
        )
        stand_ins = []
        for dtype, rank, aligned in kinds:
            # Rows of a multiple of 16 elements exactly when the variant is the aligned one.
            length = 16 * math.ceil(max(rank, 1) / 16) + (0 if aligned else 1)
            shape = (rank, length) if rank else (length,)
            stand_ins.append(torch.zeros(shape, dtype=dtype, device=device))
        options = dict(v_split=self.v_split, stochastic=self.stochastic, scaled=self.scaled)
        MultiPass(stand_ins, [r for _, r, _ in kinds], self.n_terms, **options).launch(
            self._seeds[: len(kinds)], self._scales[: len(kinds)]
        )
        share = share_with._plan if share_with is not None and not share_with.stale else None
        self._plan = MultiPass(self.tensors, self.ranks, self.n_terms, share=share, **options)
        torch.cuda.synchronize(device)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._plan.launch(self._seeds, self._scales)

    @property
    def stale(self) -> bool:
        """Whether a tensor no longer lives at the address the graph writes to."""
        return any(w.data_ptr() != a for w, a in zip(self.tensors, self._addresses, strict=True))

    def __call__(
        self,
        seeds: Sequence[Sequence[int]],
        v_seeds: Sequence[int],
        scales: Sequence[Sequence[float]],
        round_seeds: Sequence[int] | None = None,
        w_scales: Sequence[float] | None = None,
    ) -> None:
        """Replay: tensor i gets terms (seeds[i][t], v_seeds[i], scales[i][t]), t < T.

        Args:
            seeds: per tensor, T uint64 seeds (u seeds, or the full-rank seeds).
            v_seeds: per tensor, its shared v seed, or with v_split its pair of v seeds
                (ignored for full-rank tensors).
            scales: per tensor, T finite scales.
            round_seeds: per tensor, its uint64 round seed (required with stochastic, else
                not allowed).
            w_scales: per tensor, its weight scale, finite in float32 (required with scaled,
                else not allowed).
        """
        for name, given, wanted in (
            ("round_seeds", round_seeds, self.stochastic),
            ("w_scales", w_scales, self.scaled),
        ):
            if (given is not None) != wanted:
                raise ValueError(
                    f"{name} must be given exactly when the pass was built with "
                    f"{'stochastic' if name == 'round_seeds' else 'scaled'}=True"
                )
        rows = [
            [*row, *(v if isinstance(v, (list, tuple)) else [v])]
            for row, v in zip(seeds, v_seeds, strict=True)
        ]
        if round_seeds is not None:
            rows = [[*row, r] for row, r in zip(rows, round_seeds, strict=True)]
        flat = [x for row in rows for x in row]
        # One pass over plain ints (an optimizer calls this with hundreds of rows per step).
        if not all(type(x) is int and 0 <= x <= MAX_SEED for x in flat):
            bad = next(x for x in flat if type(x) is not int or not 0 <= x <= MAX_SEED)
            raise ValueError(f"seeds must be integers in 0..2**64-1, got {bad!r}")
        if w_scales is not None:
            scales = [[*row, a] for row, a in zip(scales, w_scales, strict=True)]
        self.replay_table(np.array(rows, dtype=np.uint64), np.array(scales, dtype=np.float32))

    def replay_table(self, seeds: np.ndarray, scales: np.ndarray, edit_scales=None) -> None:
        """Replay from arrays: seeds (count, T + V + S) uint64 and scales (count, T + A) float32
        (finite), laid out as the class docstring says (row i: tensor i's T seeds, its v seed
        or two, [its round seed]; its T scales, [its weight scale]). What an optimizer builds
        without a Python loop over tensors.

        edit_scales: called with the device scale table (count, T + A) after the upload, before
        the replay, on the current stream: scales computed on the GPU (an optimizer's −lr·g)
        go in there without a round trip through the host."""
        if seeds.dtype != np.uint64 or scales.dtype != np.float32:
            raise ValueError("seeds must be a uint64 array and scales a float32 array")
        seeds_now = torch.from_numpy(seeds.view(np.int64))
        scales_now = torch.from_numpy(scales)
        if seeds_now.shape != self._host_seeds.shape or scales_now.shape != self._host_scales.shape:
            raise ValueError(
                f"expected seeds {tuple(self._host_seeds.shape)} and scales "
                f"{tuple(self._host_scales.shape)} (count, columns; class docstring), got "
                f"{tuple(seeds_now.shape)} and {tuple(scales_now.shape)}"
            )
        if not torch.isfinite(scales_now).all():
            raise ValueError("scale (and w_scale) must be finite real numbers in float32")
        if self.stale:
            raise RuntimeError("a tensor was reallocated since the graph was captured")
        with on_device(self.tensors[0].device):
            self._replay(seeds_now, scales_now, edit_scales)

    def _replay(self, seeds_now, scales_now, edit_scales) -> None:
        self._copied.synchronize()  # the previous replay's copy has read the pinned buffers
        self._host_seeds.copy_(seeds_now)
        self._host_scales.copy_(scales_now)
        self._seeds.copy_(self._host_seeds, non_blocking=True)
        self._scales.copy_(self._host_scales, non_blocking=True)
        self._copied.record()
        if edit_scales is not None:
            edit_scales(self._scales)
        self._graph.replay()
