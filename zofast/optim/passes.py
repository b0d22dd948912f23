"""Engine passes over a fixed list of trained tensors (slots), as one call or one graph.

A pass gives every slot the terms scale_k·Z_(steps[k]) (its group's scales; steps are direction
indices, zofast.optim.noise), optionally scales the
stored weight first (``w_scale``, weight decay fused into an update) and optionally rounds the
result stochastically (round seeds from the run's "round" role, see zofast.optim.noise). On one
GPU the whole pass replays a CUDA graph (zofast.graphed.GraphedPass) with a seed table built in
numpy, no Python call per tensor; elsewhere it is one engine call per tensor, bit for bit the same.
Slots on several devices (a device map, zofast.device_map) take one pass per device, each with
its own graphs.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from zofast._ext import triton_available
from zofast.device_map import by_device, on_device
from zofast.graphed import GraphedPass
from zofast.optim.noise import NoisePlan, Slot
from zofast.perturb import gaussian_, lowrank_


def graphs_enabled(slots: list[Slot]) -> bool:
    """Whether passes over `slots` replay CUDA graphs: Triton, one CUDA device, not turned off."""
    if not slots or not triton_available() or os.environ.get("ZOFAST_CUDA_GRAPHS", "1") == "0":
        return False
    if any(s.sharded for s in slots):  # the graphed tables take no offsets
        return False
    devices = {s.param.device for s in slots}
    return len(devices) == 1 and devices.pop().type == "cuda"


class Passes:
    """Passes over `slots` with the seeds of `noise`.

    Args:
        slots: the tensors every pass writes.
        noise: the run's seeds.

    Slots on several devices: ``devices`` holds one Passes per device (its slots in their
    order, its own graphs) and every pass runs each of them; one device: ``devices == [self]``.
    """

    def __init__(self, slots: list[Slot], noise: NoisePlan):
        self.slots, self.noise = slots, noise
        groups = by_device(slots)
        self._split = len(groups) > 1
        self.devices = [Passes(group, noise) for group in groups] if self._split else [self]
        # Per slot, as arrays: what a graphed pass's seed / scale tables are built from.
        self.index = np.array([s.index for s in slots], dtype=np.int64)
        self.lowrank = np.array([s.rank > 0 for s in slots], dtype=bool)
        self.group = np.array([s.group for s in slots], dtype=np.int64)
        self.graphs: dict[tuple, GraphedPass] | None = {} if graphs_enabled(slots) else None
        self.host_buffers: dict[str, torch.Tensor] = {}  # queued()'s, see _pinned
        self._group_index: torch.Tensor | None = None

    def run(self, steps, group_scales, round_index=None, group_w_scales=None) -> None:
        """One pass: slot i gets the terms group_scales[g][k]·Z_(steps[k]) (g its group),
        after W ← group_w_scales[g]·W where given, rounded stochastically with the round seeds
        of step `round_index` where given (to nearest otherwise)."""
        if self._split:
            for part in self.devices:
                part.run(steps, group_scales, round_index, group_w_scales)
            return
        if self.slots:
            with on_device(self.slots[0].param.device):
                self._run(steps, group_scales, round_index, group_w_scales)

    def _run(self, steps, group_scales, round_index, group_w_scales) -> None:
        plan = self.graph_plan(steps, group_scales, round_index, group_w_scales)
        if plan is not None:
            graph, table, scales = plan
            graph.replay_table(table, scales)
            return
        rounds = None if round_index is None else self.noise.seeds("round", round_index)
        for slot in self.slots:
            seeds, vs, scales = self.noise.terms(slot, steps, group_scales[slot.group])
            extra = {
                "round_seed": None if rounds is None else rounds[slot.index],
                "w_scale": 1.0 if group_w_scales is None else group_w_scales[slot.group],
            }
            if slot.rank:
                extra["row_offset"] = slot.row_offset
                lowrank_(slot.param, seeds, vs, slot.rank, scales, **extra)
            else:
                gaussian_(slot.param, seeds, scales, offset=slot.offset, **extra)

    def graph_plan(self, steps, group_scales, round_index=None, group_w_scales=None):
        """(graph, seed table, scale table) of a pass that a CUDA graph can replay, or None: no
        graphs, or low-rank terms on V epochs that are not one run, then at most one other (a
        V-refresh step's restore + update, then next)."""
        index, lowrank = self.index, self.lowrank
        epochs = [self.noise.epoch(s) for s in steps] if lowrank.any() else [0] * len(steps)
        split = epochs.index(epochs[-1])  # the first term on the last V: 0 if one V
        if self.graphs is None or epochs[:split] != [epochs[0]] * split:
            return None
        # The v seeds per V (one column of zeros without low-rank tensors).
        v_rows = [self.noise.seed_array("v", e)[index] for e in dict.fromkeys(epochs)]
        if split and np.any((v_rows[0] == v_rows[1]) & lowrank):
            return None  # one V after all: lowrank_ merges every term (eager path)
        stochastic, scaled = round_index is not None, group_w_scales is not None
        key = (len(steps), split, stochastic, scaled)
        graph = self.graphs.get(key)
        if graph is None or graph.stale:  # first use, or a parameter was reallocated
            params, ranks = [s.param for s in self.slots], [s.rank for s in self.slots]
            same = [
                g
                for k, g in self.graphs.items()
                if not g.stale and k[1:] == key[1:] and g is not graph
            ]
            graph = self.graphs[key] = GraphedPass(
                params,
                ranks,
                len(steps),
                share_with=same[0] if same else None,
                v_split=split,
                **{
                    name: True
                    for name, on in (("stochastic", stochastic), ("scaled", scaled))
                    if on
                },
            )
        columns = [None] * len(steps) + v_rows
        for k, step in enumerate(steps):
            full = self.noise.seed_array("full", step)[index] if not lowrank.all() else 0
            u = self.noise.seed_array("u", step)[index] if lowrank.any() else 0
            columns[k] = np.where(lowrank, u, full)
        for j in range(len(v_rows)):
            columns[len(steps) + j] = np.where(lowrank, v_rows[j], 0)
        if stochastic:
            columns.append(self.noise.seed_array("round", round_index)[index])
        table = np.stack(columns, 1).astype(np.uint64)
        rows = np.asarray(group_scales, dtype=np.float32)
        if scaled:
            rows = np.concatenate([rows, np.asarray(group_w_scales, np.float32)[:, None]], 1)
        return graph, table, rows[self.group]

    def queued(self, steps, group_scales, update_col, loss_plus, loss_minus, lrs, eps, **extra):
        """:meth:`run` with column `update_col` = −lr·g computed where the losses are, queued
        right behind the second forward: the GPU does not wait for the host to read the losses,
        which it does (from a copy queued before the pass) while the pass runs.

        Only for a graphed pass with both losses tensors on the slots' device (one device);
        returns None otherwise (the caller reads the losses and runs the pass itself). Returns
        the losses as floats. −lr·g is computed on the device in the host's float64 arithmetic
        (so bit for bit the same). If g or any group's −lr·g is not finite in float32, the
        device zeroes the update column and those after it: the pass then adds exact zeros for
        them."""
        if self._split or not self.slots:
            return None
        device = self.slots[0].param.device
        if not all(
            isinstance(x, torch.Tensor) and x.device == device for x in (loss_plus, loss_minus)
        ):
            return None
        with on_device(device):
            plan = self.graph_plan(steps, group_scales, **extra)
            if plan is None:
                return None
            return self._queued(plan, update_col, loss_plus, loss_minus, lrs, eps, len(steps))

    def _queued(self, plan, update_col, loss_plus, loss_minus, lrs, eps, terms):
        device = self.slots[0].param.device
        graph, table, scales = plan
        losses = torch.stack([loss_plus.reshape(()).double(), loss_minus.reshape(()).double()])
        g = ((losses[0] - losses[1]) / (2.0 * eps)).float()
        # Host -> device through pinned memory: a pageable copy could wait for the forward.
        lr_host = self._pinned("lrs", len(lrs), device)
        lr_host.copy_(torch.tensor(lrs, dtype=torch.float64))
        lr_groups = lr_host.to(device, non_blocking=True)
        updates = (lr_groups * -g.double()).float()  # per group, as the host's float32 scales
        finite = torch.isfinite(g) & torch.isfinite(updates).all()

        def set_update(device_scales):
            row_updates = updates[self._group_rows(device)]
            device_scales[:, update_col] = torch.where(finite, row_updates, 0.0)
            device_scales[:, update_col + 1 : terms] *= finite

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
        """A float64 host buffer of queued(), pinned for a GPU; reused across steps (the copies
        that read or fill it are over when the step returns)."""
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
