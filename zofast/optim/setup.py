"""Building and checking an optimizer's parts: which tensors are trained, how each is perturbed
(the slots and the in-place / virtual / shadow / momentum parts), and the checks a step makes
before it writes anything. A mixin of zofast.optim.base.ZerothOrder."""

from __future__ import annotations

import torch

from zofast.device_map import device_types
from zofast.optim.checks import non_negative, positive
from zofast.optim.inplace import InPlace
from zofast.optim.momentum import Momentum
from zofast.optim.noise import NoisePlan, Slot
from zofast.optim.shadow import Shadow
from zofast.optim.sharding import local_shard
from zofast.optim.virtual import Virtual
from zofast.paired_layers import PairedVirtualLayers, Rows
from zofast.perturb_args import check_weight, matrix_shape
from zofast.trajectory import param_fingerprint

GROUP_KEYS = ("lr", "weight_decay")


class Setup:
    """Slots, parts and the pre-step checks (see zofast.optim.base)."""

    def add_param_group(self, param_group: dict) -> None:
        """Add a group (before the first step only: seeds and the trajectory index tensors).

        Groups may set "lr" and "weight_decay"; the other hyperparameters are optimizer-wide.
        """
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        if getattr(self, "_ready", False) and (
            self._step_count or len(self.trajectory.events) or self._pending is not None
        ):
            raise ValueError("parameter groups cannot be added after the first step")
        for key in param_group:
            fixed = key in self.defaults and key not in GROUP_KEYS and key != "params"
            if fixed and param_group[key] != self.defaults[key]:
                raise ValueError(
                    f"{key} is optimizer-wide: a group cannot set it to {param_group[key]!r}"
                )
        if "lr" in param_group:
            positive(param_group["lr"], "lr")
        if "weight_decay" in param_group:
            non_negative(param_group["weight_decay"], "weight_decay")
        super().add_param_group(param_group)
        if getattr(self, "_ready", False):
            self._build_slots()
            self.trajectory = self._new_trajectory()

    def _flat(self) -> list[tuple[int, torch.Tensor]]:
        return [(gi, p) for gi, group in enumerate(self.param_groups) for p in group["params"]]

    def _names(self) -> dict[int, str]:
        names = {}
        for group in self.param_groups:
            names.update(zip(map(id, group["params"]), group.get("param_names", ()), strict=False))
        if self._model is not None:
            for name, p in self._model.named_parameters():
                names.setdefault(id(p), name)
        return names

    def _build_slots(self) -> None:
        flat = self._flat()
        seen = set()
        for _, p in flat:
            if id(p) in seen:
                raise ValueError("a parameter appears more than once in the optimizer")
            seen.add(id(p))
        self._n_params = len(flat)
        self._trained = [p.requires_grad for _, p in flat]
        slots = []
        for index, (gi, p) in enumerate(flat):
            if not p.requires_grad:
                continue
            local, row_offset, sharded = local_shard(p)
            if sharded and local.numel() == 0:
                continue  # this rank holds no rows of it (FSDP2 pads the last shards)
            try:
                check_weight(local, f"parameter {index}")
            except TypeError as error:
                raise ValueError(str(error)) from None
            rank = 0
            if self._lowrank and p.dim() >= 2:
                m, n = matrix_shape(p.shape)  # the whole tensor's: every rank takes the same r
                rank = min(self._rank, m, n)
            slot = Slot(index, local, gi, tuple(local.shape), rank, row_offset=row_offset)
            slot.sharded = sharded
            slots.append(slot)
        if not slots:
            raise ValueError("no trainable parameters: every parameter has requires_grad=False")
        self._noise = NoisePlan(self._run_seed, self._n_params, self._nu, self._directions.q)
        stochastic = self._rounding == "stochastic"
        # Paired steps: the parts' hooks give each copy of the stacked batch its own sign.
        self._rows = Rows() if self._paired else None
        virtual = None
        if self._mode == "virtual":
            virtual = Virtual(
                slots,
                self._noise,
                self._model,
                self._virtual_request,
                self._names(),
                stochastic,
                owner=self,
            )
            virtual.check_decay([g["weight_decay"] for g in self.param_groups])
            if self._rows is not None:  # not attached yet: the paired hooks replace the plain
                virtual.layers = PairedVirtualLayers(virtual.layers.tensors, self._rows, self)
        # Shadow mode: every tensor; virtual mode for bf16 / fp16: those not through layers.
        exact = self._mode == "shadow" or self._rest == "shadow"
        rest = [s for s in slots if s.virtual is None] if exact else []
        in_place = [] if exact else [s for s in slots if s.virtual is None]
        if in_place and self._directions.shared:
            names = self._names()
            shown = [names.get(id(s.param), f"parameter {s.index}") for s in in_place[:3]]
            raise ValueError(
                "split='directions' needs an exact mode (the ranks evaluate different "
                "directions, so perturbations written into the weights would round differently "
                f"on each rank); {shown} would be perturbed in place: pass mode='shadow' (or "
                "mode='virtual' with virtual_rest='shadow')"
            )
        shadow = None
        if rest:
            shadow = Shadow(
                rest,
                self._noise,
                self._model,
                self._names(),
                stochastic,
                self,
                self._accumulate,
                rows=self._rows,
                trained_numel=sum(s.param.numel() for s in slots),
            )
        for part in (self._virtual, self._shadow):  # add_param_group before the first step
            if part is not None:
                part.layers.remove_hooks()
        self._slots = slots
        self._inplace = InPlace(in_place, self._noise, stochastic, self._fsdp)
        self._momentum = Momentum(self._beta, self._noise) if self._beta else None
        if self._paired and virtual is not None and shadow is not None:
            virtual.layers.fuse_biases(shadow.layers)  # Linear biases in their weights' products
        try:
            for part in (virtual, shadow):
                if part is not None:
                    part.attach()
        except ValueError:  # another optimizer holds a module: leave no hook behind
            for part in (virtual, shadow):
                if part is not None:
                    part.layers.remove_hooks()
            raise
        self._virtual, self._shadow = virtual, shadow

    def _check(self) -> tuple[list[float], list[float]]:
        """Validate everything a step needs before any write; return each group's lr and wd."""
        flat = self._flat()
        if len(flat) != self._n_params:
            raise ValueError("the optimizer's parameter list changed since it was created")
        changed = [i for i, (_, p) in enumerate(flat) if p.requires_grad != self._trained[i]]
        if changed:
            raise ValueError(
                f"requires_grad of parameter(s) {changed[:5]} changed since the optimizer was "
                "created; a trajectory covers one fixed set of trained tensors: call settle() and "
                "create a new optimizer"
            )
        for slot in self._slots:
            try:
                check_weight(slot.param, f"parameter {slot.index}")
            except TypeError as error:
                raise ValueError(str(error)) from None
            if tuple(slot.param.shape) != slot.shape:
                raise ValueError(
                    f"parameter {slot.index} changed shape to {tuple(slot.param.shape)}"
                )
        lrs, wds = [], []
        for group in self.param_groups:
            lrs.append(non_negative(group["lr"], "lr"))
            wds.append(non_negative(group["weight_decay"], "weight_decay"))
        if self._virtual is not None:
            self._virtual.check_decay(wds)
            self._virtual.check_step()
        if self._shadow is not None:
            self._shadow.check_step()
        return lrs, wds

    def _fingerprint(self) -> None:
        flat = self._flat()
        names = []
        for group in self.param_groups:
            names.extend(group.get("param_names", [None] * len(group["params"])))
        shards = [local_shard(p) for _, p in flat]
        described = param_fingerprint(
            [local for local, _, _ in shards], names, [gi for gi, _ in flat], self._trained
        )
        for row, (_, p), (_, _, sharded) in zip(described, flat, shards, strict=True):
            if sharded:  # the whole tensor's shape; a shard's values differ from rank to rank
                row.update(shape=list(p.shape), hash=None)
        self.trajectory.params = described
        self.trajectory.device = device_types(s.param for s in self._slots)
