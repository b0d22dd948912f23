"""LOZO-M's update of its full-rank tensors (biases, norms) in one launch per weight dtype.

Per tensor, the update was one ``outer_add_`` of the tensor's (n, 1) view with its momentum m
(in place also the restored z) as columns and one upload of their scales: on OPT-1.3B 243 calls
a step. With m and z in FlatVectors' flat buffers, zofast.kernels.multi_columns writes every
such tensor in one launch (replayed as a CUDA graph on a GPU), bit for bit the per-tensor
``outer_add_``: the same fma order, the same float32 scales and stochastic rounding words.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from zofast.device_map import on_device
from zofast.optim.momentum_flat import FlatVectors
from zofast.shadow_step import to_device


class ColumnsPass:
    """One MultiColumns pass over `vectors`' slots with `n_cols` columns, run from host tables
    (a CUDA graph on a GPU unless ZOFAST_CUDA_GRAPHS=0, as zofast.optim.passes; eagerly
    otherwise, e.g. Triton's interpreter on a CPU).

    Args:
        vectors: the flat vectors whose slots it writes.
        n_cols: K, the columns per pass.
        stochastic: a round seed per slot.
        scaled: a weight scale per slot.
    """

    def __init__(self, vectors: FlatVectors, n_cols: int, stochastic: bool, scaled: bool):
        from zofast.kernels.multi_columns import MultiColumns

        self.params = [s.param for s in vectors.slots]
        self._addresses = [p.data_ptr() for p in self.params]
        device = vectors.device
        count = len(self.params)
        self._columns = torch.zeros(n_cols, dtype=torch.int64, device=device)
        self._scales = torch.zeros(count, n_cols + scaled, dtype=torch.float32, device=device)
        self._seeds = torch.zeros(count, dtype=torch.int64, device=device)
        offsets = [s.offset for s in vectors.slots]
        plan = MultiColumns(self.params, vectors.starts, offsets, n_cols, stochastic, scaled)
        self._graph = None
        if device.type == "cuda" and os.environ.get("ZOFAST_CUDA_GRAPHS", "1") != "0":
            with on_device(device):
                self._capture(plan, n_cols, stochastic, scaled)
        else:
            self._plan = plan

    def _capture(self, plan, n_cols: int, stochastic: bool, scaled: bool) -> None:
        from zofast.kernels.multi_columns import MultiColumns

        device = self._seeds.device
        # Compile on stand-ins first (one element per dtype): capture compiles nothing and the
        # weights are untouched until the first replay.
        dtypes = sorted({p.dtype for p in self.params}, key=str)
        stand_ins = [torch.zeros(1, dtype=d, device=device) for d in dtypes]
        column = torch.zeros(1, dtype=torch.float32, device=device)
        addresses = torch.full((n_cols,), column.data_ptr(), dtype=torch.int64, device=device)
        MultiColumns(
            stand_ins, [0] * len(dtypes), [0] * len(dtypes), n_cols, stochastic, scaled
        ).launch(addresses, self._scales[: len(dtypes)], self._seeds[: len(dtypes)])
        self._host = [
            torch.zeros_like(x, device="cpu").pin_memory()
            for x in (self._columns, self._scales, self._seeds)
        ]
        self._copied = torch.cuda.Event()
        torch.cuda.synchronize(device)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            plan.launch(self._columns, self._scales, self._seeds)
        self._plan = plan  # its tables stay alive with the graph

    @property
    def stale(self) -> bool:
        """Whether a tensor no longer lives at the address the plan writes to."""
        return any(p.data_ptr() != a for p, a in zip(self.params, self._addresses, strict=True))

    def run(self, columns: list[torch.Tensor], scales: np.ndarray, seeds: np.ndarray) -> None:
        """Slot i ← round(a_i·W + Σ_k scales[i, k]·columns[k][its part]) (kernels.multi_columns'
        contract); columns: float32 flat buffers in FlatVectors' layout, alive until the pass
        ran on the device's stream; scales (count, K [+ 1]) float32, seeds (count,) uint64."""
        tables = (
            torch.tensor([c.data_ptr() for c in columns], dtype=torch.int64),
            torch.from_numpy(scales),
            torch.from_numpy(seeds.view(np.int64)),
        )
        if self._graph is None:
            self._plan.launch(*(to_device(x, self._seeds.device) for x in tables))
            return
        with on_device(self._seeds.device):
            self._copied.synchronize()  # the last replay's uploads have read the pinned tables
            for host, device, now in zip(
                self._host, (self._columns, self._scales, self._seeds), tables, strict=True
            ):
                host.copy_(now)
                device.copy_(host, non_blocking=True)
            self._copied.record()
            self._graph.replay()


class FlatUpdate:
    """The update passes of one FlatVectors' slots, one ColumnsPass per kind of pass."""

    def __init__(self, vectors: FlatVectors):
        self.vectors = vectors
        self._passes: dict[tuple, ColumnsPass] = {}

    def run(self, columns, scales: np.ndarray, round_seeds: np.ndarray | None) -> None:
        """One pass (see ColumnsPass.run); round_seeds None: round to nearest."""
        scaled = scales.shape[1] > len(columns)
        key = (len(columns), round_seeds is not None, scaled)
        held = self._passes.get(key)
        if held is None or held.stale:  # first use, or a parameter was reallocated
            held = self._passes[key] = ColumnsPass(self.vectors, *key)
        seeds = np.zeros(len(self.vectors.slots), np.uint64) if round_seeds is None else round_seeds
        held.run(columns, np.ascontiguousarray(scales, dtype=np.float32), seeds)
