"""The in-place part: trained tensors that carry the perturbation themselves.

``W += ε·Z_t`` before the first forward, ``W −= 2ε·Z_t`` before the second, and one fused pass
``W += ε·Z_t − lr·g·Z_t`` (pipelined: ``+ ε·Z_(t+1)`` too) after it. Every pass rounds the weights
to their dtype, so bf16 / fp16 weights random-walk (see the package docstring); float32 ones stay
within the documented ulp bounds.

On one GPU every pass replays a CUDA graph (zofast.perturb.GraphedPass) per term count, with a
seed table built in numpy: no Python call per tensor. When the closure returns its loss as a GPU
tensor, the step's last pass is queued right behind the second forward (:meth:`finish_queued`).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from zofast._ext import triton_available
from zofast.optim.noise import NoisePlan, Slot
from zofast.perturb import GraphedPass, gaussian_, lowrank_


def graphs_enabled(slots: list[Slot]) -> bool:
    """Whether passes over `slots` replay CUDA graphs: Triton, one CUDA device, not turned off."""
    if not triton_available() or os.environ.get("ZOFAST_CUDA_GRAPHS", "1") == "0":
        return False
    devices = {s.param.device for s in slots}
    return len(devices) == 1 and devices.pop().type == "cuda"


class InPlace:
    """Passes over the in-place slots.

    Args:
        slots: the in-place slots.
        noise: the run's seeds.
    """

    def __init__(self, slots: list[Slot], noise: NoisePlan):
        self.slots, self.noise = slots, noise
        # Per slot, as arrays: what a graphed pass's seed / scale tables are built from.
        self.index = np.array([s.index for s in slots], dtype=np.int64)
        self.lowrank = np.array([s.rank > 0 for s in slots], dtype=bool)
        self.group = np.array([s.group for s in slots], dtype=np.int64)
        self.graphs: dict[tuple[int, int], GraphedPass] | None = (
            {} if slots and graphs_enabled(slots) else None
        )
        self.host_buffers: dict[str, torch.Tensor] = {}  # finish_queued's, see _pinned
        self._group_index: torch.Tensor | None = None

    def shift(self, t: int, scale: float, n_groups: int) -> None:
        """W += scale·Z_t for every slot: one pass."""
        if self.slots:
            self.run_pass([t], [[scale]] * n_groups)

    def graph_plan(self, steps: list[int], group_scales: list[list[float]]):
        """(graph, seed table, scale table) of a pass that a CUDA graph can replay, or None: no
        graphs, or low-rank terms on V epochs that are not one run, then at most one other (a
        V-refresh step's restore + update, then next)."""
        index, lowrank, nu = self.index, self.lowrank, self.noise.nu
        epochs = [s // nu for s in steps] if lowrank.any() else [0] * len(steps)
        split = epochs.index(epochs[-1])  # the first term on the last V: 0 if one V
        if self.graphs is None or epochs[:split] != [epochs[0]] * split:
            return None
        # The v seeds per V (one column of zeros without low-rank tensors).
        v_rows = [self.noise.seed_array("v", e)[index] for e in dict.fromkeys(epochs)]
        if split and np.any((v_rows[0] == v_rows[1]) & lowrank):
            return None  # one V after all: lowrank_ merges every term (eager path)
        key = (len(steps), split)
        graph = self.graphs.get(key)
        if graph is None or graph.stale:  # first use, or a parameter was reallocated
            params, ranks = [s.param for s in self.slots], [s.rank for s in self.slots]
            same = [g for g in self.graphs.values() if not g.stale and g.v_split == split]
            graph = self.graphs[key] = GraphedPass(
                params, ranks, len(steps), share_with=same[0] if same else None, v_split=split
            )
        table = np.zeros((len(self.slots), len(steps) + len(v_rows)), dtype=np.uint64)
        for k, step in enumerate(steps):
            full = self.noise.seed_array("full", step)[index] if not lowrank.all() else 0
            u = self.noise.seed_array("u", step)[index] if lowrank.any() else 0
            table[:, k] = np.where(lowrank, u, full)
        for j, v in enumerate(v_rows):
            table[:, len(steps) + j] = np.where(lowrank, v, 0)
        scales = np.asarray(group_scales, dtype=np.float32)[self.group]
        return graph, table, scales

    def run_pass(self, steps: list[int], group_scales: list[list[float]]) -> None:
        """One engine pass: every slot gets the terms scale_k·Z_(steps[k]), with its group's
        scales group_scales[group][k]. On one GPU a CUDA graph of the whole pass is replayed
        (bit-identical to the eager calls)."""
        plan = self.graph_plan(steps, group_scales)
        if plan is not None:
            graph, table, scales = plan
            graph.replay_table(table, scales)
            return
        for slot in self.slots:
            seeds, vs, scales = self.noise.terms(slot, steps, group_scales[slot.group])
            if slot.rank:
                lowrank_(slot.param, seeds, vs, slot.rank, scales)
            else:
                gaussian_(slot.param, seeds, scales)

    def finish(self, t, g, lrs, wds, eps, nxt, momentum=None, buffers=None, used=None) -> None:
        """Restore, update (and pipelined: perturb for step nxt) in one pass per tensor.

        Weight decay is one ``p.mul_(1 − lr·wd)`` on the −ε-perturbed weights right before the
        pass, whose restore term is scaled by the same factor. With momentum each slot takes its
        own pass through ``momentum.apply``."""
        for slot in self.slots:
            lr, wd = lrs[slot.group], wds[slot.group]
            decay = 1.0 - lr * wd
            if decay != 1.0:
                slot.param.mul_(decay)
            if momentum is not None:
                momentum.apply(
                    slot, used[slot.index], buffers[slot.index], decay * eps, lr, eps, nxt
                )
        if momentum is None and self.slots:
            steps = [t, t] if nxt is None else [t, t, nxt]
            group_scales = [
                [(1.0 - lr * wd) * eps, -lr * g] + ([] if nxt is None else [eps])
                for lr, wd in zip(lrs, wds, strict=True)
            ]
            self.run_pass(steps, group_scales)

    def finish_queued(self, t, loss_plus, loss_minus, lrs, eps, nxt):
        """The fused last pass with g computed where the losses are, queued right behind the
        second forward: the GPU does not wait for the host to read the losses, which it does
        (from a copy queued before the pass) while the pass runs.

        Only for a graphed pass with both losses tensors on the weights' device; returns None
        otherwise (the caller reads the losses and runs :meth:`finish`). The caller checks that
        there is no momentum, virtual tensor or weight decay. Returns the losses as floats.

        The pass's terms are those of :meth:`finish`, the update's scale −lr·g computed on the
        device in the same float64 arithmetic (so bit for bit the same). If g or any group's
        −lr·g is not finite in float32, the device zeroes the update and next-step terms: the
        pass is then the restore alone, bit for bit the abort's one-term pass (the zero terms
        add exact zeros)."""
        device = self.slots[0].param.device if self.slots else None
        on_device = all(
            isinstance(x, torch.Tensor) and x.device == device for x in (loss_plus, loss_minus)
        )
        if not on_device:
            return None
        steps = [t, t] if nxt is None else [t, t, nxt]
        plan = self.graph_plan(steps, [[eps, 0.0] + ([] if nxt is None else [eps])] * len(lrs))
        if plan is None:
            return None
        graph, table, scales = plan
        losses = torch.stack([loss_plus.reshape(()).double(), loss_minus.reshape(()).double()])
        g = ((losses[0] - losses[1]) / (2.0 * eps)).float()
        # Host -> device through pinned memory: a pageable copy could wait for the forward.
        lr_host = self._pinned("lrs", len(lrs), device)
        lr_host.copy_(torch.tensor(lrs, dtype=torch.float64))
        lr_groups = lr_host.to(device, non_blocking=True)
        updates = (lr_groups * -g.double()).float()  # per group, as finish's float32 scales
        finite = torch.isfinite(g) & torch.isfinite(updates).all()

        def set_update(device_scales):  # columns: restore, update, (next)
            row_updates = updates[self._group_rows(device)]
            device_scales[:, 1] = torch.where(finite, row_updates, 0.0)
            device_scales[:, 2:] *= finite

        loss_host = self._pinned("losses", 2, device)
        loss_host.copy_(losses, non_blocking=True)
        copied = torch.cuda.Event() if device.type == "cuda" else None
        if copied is not None:
            copied.record()
        graph.replay_table(table, scales, set_update)
        if copied is not None:
            copied.synchronize()
        return tuple(loss_host.tolist())

    def _pinned(self, name: str, size: int, device) -> torch.Tensor:
        """A float64 host buffer of finish_queued, pinned for a GPU; reused across steps (the
        copies that read or fill it are over when the step returns)."""
        buffer = self.host_buffers.get(name)
        if buffer is None or buffer.numel() != size:
            pinned = device.type == "cuda"
            buffer = self.host_buffers[name] = torch.empty(
                size, dtype=torch.float64, pin_memory=pinned
            )
        return buffer

    def _group_rows(self, device) -> torch.Tensor:
        """The group of every slot (rows of a graphed pass), on `device`."""
        cached = self._group_index
        if cached is None or cached.device != device:
            cached = self._group_index = torch.from_numpy(self.group).to(device)
        return cached
