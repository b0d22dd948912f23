"""Zeroth-order optimizers on the perturbation engine: LOZO, LOZO-M and MeZO.

Both estimate the gradient from two forward passes at W ± ε·Z on the same batch and step along Z.
Weights are only ever written through :mod:`zofast.perturb` (plus one documented ``mul_`` for weight
decay), every noise tensor is regenerated from seeds, and every step is recorded in
``opt.trajectory`` (see :mod:`zofast.trajectory`), so a run can be replayed bit for bit.

The step
    ``step(closure)``, with ``closure()`` evaluating the loss of one batch (it is run under
    ``torch.no_grad()``):

    1. perturb: W += ε·Z_t (one engine pass per tensor);
    2. L+ = closure();
    3. W −= 2ε·Z_t (one pass); L− = closure();
    4. g = (L+ − L−)/(2ε), rounded to float32 (the value that is recorded and used);
    5. restore and update fused into ONE pass per tensor: W += ε·Z_t − lr·g·Z_t (LOZO-M: the
       momentum term instead of −lr·g·Z_t). The update uses exactly the U, V, z of the
       perturbation that produced g, also on V-refresh steps (LOZO's public code redraws U there).

    ``step`` returns (L+ + L−)/2 as a Python float: the loss at the unperturbed weights up to
    O(ε²), a better training-loss signal than L+ alone. ``opt.last_losses`` holds (L+, L−).

Noise
    Seeds come from ``zofast.rng.RunSeeds(seed)`` with tensor index = the tensor's position in
    the optimizer's flat parameter list (frozen tensors included, so freezing does not shift
    seeds). LOZO: every tensor with ndim ≥ 2 gets Z = U·Vᵀ (U: m×r from role "u" at index = step,
    V: n×r from role "v" at index = step // nu, a ≥3-D tensor viewed as (shape[0], rest), no 1/√r
    scaling as in the authors' code, r clamped to min(rank, m, n) per tensor); 1-D (and 0-D)
    tensors get full-rank z from role "full" at index = step. MeZO: everything full-rank.

LOZO-M (``momentum`` = β > 0)
    Matrices keep N (m×r, float32), the left factor of the momentum N·Vᵀ; 1-D tensors keep a
    full-size float32 buffer m, as in the authors' code (g·U is the left factor of the estimate
    g·U·Vᵀ):

    * first step of the run: N = g·U (the authors' initialisation; same for m = g·z);
    * steps inside a V epoch: N ← β·N + (1 − β)·g·U;
    * V-refresh steps (step % nu == 0): N ← β·N·(V_oldᵀ·V_new)/n + (1 − β)·g·U, i.e. the old
      momentum N·V_oldᵀ is projected onto the new subspace (V_newᵀ·V_new ≈ n·I for Gaussian V),
      as in the authors' code (computed in float64, rounded once to float32);
    * update: W ← W − lr·N·Vᵀ (1-D: b ← b − lr·m), fused with the restore through
      ``outer_add_`` in one pass.

Weight decay
    W ← (1 − lr·wd)·W − lr·(update). The engine adds terms but cannot scale W, so decay is one
    plain ``p.mul_(1 − lr·wd)`` (an extra pass over decayed tensors only), done on the
    −ε-perturbed weights right before the fused pass, whose restore term is scaled by the same
    factor (c·ε): the result is exactly c·W − lr·update up to rounding. No decay is applied where
    wd = 0 (use :func:`param_groups` to exempt biases and norm weights).

Pipelining (``pipeline=True``)
    The fused pass of step t also adds +ε·Z_{t+1}, so a steady-state step costs two weight passes
    instead of three. BETWEEN STEPS THE WEIGHTS THEN CARRY THE NEXT STEP'S +ε PERTURBATION.
    Call ``opt.settle()`` (one pass; idempotent) before evaluating, saving or exporting the model;
    the next ``step`` re-perturbs. ``state_dict()`` records the pending step, so a checkpoint of
    the unsettled weights together with the optimizer state resumes bit-identically.

Failures inside a step
    Any exception or KeyboardInterrupt in the closure, a closure result that is not a real scalar
    (ValueError), one that requires grad (ValueError), or a NaN/inf loss, g or momentum
    (FloatingPointError): the perturbation is undone through the engine (−ε after the first
    evaluation, +ε after the second) and the exception propagates; the step counter does not
    advance and the trajectory records the abort (its passes round the weights, so replay repeats
    them). KeyboardInterrupts arriving during an engine pass are held until the pass is over
    (main thread only). A loss returned as a CUDA tensor is read (synchronised) only after the
    second evaluation has been queued, so a NaN L+ from the GPU is caught after the second
    evaluation and undone from there (+ε).

    Rounding bound of such a restore, per element, with M = |w| + 2ε·|Z| the largest magnitude
    the element passes through (ulp taken at M): an engine pass rounds once per fused
    multiply-add in float32 registers (k = 1 per pass for full-rank noise, k = r for rank-r noise)
    and once more to the weight dtype. An abort at the first evaluation costs two passes (+ε, −ε),
    at the second three (+ε, −2ε, +ε). float32 weights: |w_restored − w| ≤ (passes·k/2) ulp, i.e.
    ≤ 1 ulp (full-rank) / r ulp (LOZO) at the first evaluation, ≤ 1.5 ulp / 1.5·r ulp at the
    second. bfloat16 / float16 weights: ≤ (passes/2) ulp of that dtype (1 ulp, 1.5 ulp), plus at
    most passes·k·2⁻¹⁴ of its ulp from the float32 registers. Most elements come back
    bit-identical (measured: ~95 % after a first-evaluation abort, ~50 % after a second), but not
    all: undoing a rounded addition exactly would need a copy of the weights.
    Errors detected before any write (bad hyperparameters, no trainable parameters, a missing
    closure, changed requires_grad, a parameter the engine cannot take) leave the weights
    untouched.

Trained parameters
    Only tensors with requires_grad=True when the optimizer is created are trained (torch
    optimizers likewise skip tensors without .grad). Changing requires_grad later raises
    ValueError from ``step`` (a trajectory covers one fixed set of trained tensors: create a new
    optimizer). Each trained tensor must be contiguous float32 / bfloat16 / float16.

Speed
    On one GPU every pass is a CUDA graph (zofast.perturb.GraphedPass) per term count, replayed
    with the step's seeds and scales: no Python call per tensor (a V-refresh step's last pass,
    whose terms span the old and the new V, is a graph of its own). LOZO-M's momentum pass runs
    eagerly. Both give bit-identical results; ZOFAST_CUDA_GRAPHS=0 turns the graphs off. When
    the closure returns its loss as a GPU tensor, the step's last pass is queued right behind
    the second forward, its −lr·g computed on the GPU (no momentum, virtual tensors or weight
    decay): the GPU does not idle while the host reads the losses.

Modes
    ``mode="inplace"`` (default): the forwards see the perturbation because the weights carry it;
    every step writes every trained tensor (three passes, two pipelined).

    ``mode="virtual"`` (LOZO only; ``LOZO(model, ...)`` or ``LOZO(params, ..., model=model)``):
    a trained matrix whose every use in the model is as the ``.weight`` of an ``nn.Linear``,
    transformers' GPT-2 ``Conv1D`` or an ``nn.Embedding`` (stock forward; tied embedding / LM
    head pairs included) is never written during a step. Forward hooks on those layers add the
    low-rank term, ``y += (x·V)·(A + c·U_t)ᵀ`` for a Linear (see :mod:`zofast.virtual` for all
    three), with c = +ε in the first forward, −ε in the second, 0 otherwise. A (m×r, float32,
    ``state[p]["virtual_factor"]``, on the V epoch ``state[p]["virtual_epoch"]``) holds the
    updates not yet written: A ← A − lr·g·U_t (LOZO-M: A ← A − lr·N); at the end of a V-refresh
    step the old A goes into W in one fused pass, W += A·V_oldᵀ (during that step's forwards the
    hooks apply [A | c·U_t]·[V_old | V_new]ᵀ), and A restarts on the new V. The iterates are
    those of in-place LOZO / LOZO-M (same seeds, same g's up to the float rounding of the
    forwards). Every other tensor (1-D ones, matrices of other layers, e.g. OPT's learned
    positional embedding) runs in place as above. ``opt.virtual_names`` lists the virtual ones.

    * Between steps the hooks apply A·V_Aᵀ, so evaluating the model needs nothing; the STORED
      weights lack it: ``opt.settle()`` (one pass per tensor, recorded, replayed) before saving,
      exporting or copying the model. ``opt.detach()`` settles and removes the hooks (the
      optimizer cannot step afterwards); ``zofast.virtual.detach(model)`` does it for a model
      whose optimizer is gone. A second virtual optimizer on the same layers is refused.
    * weight_decay must be 0 on the groups of virtual tensors (ValueError at construction and in
      step): decay would need a full pass every step.
    * Failures: nothing was written to a virtual tensor, c returns to 0: bit-identical.
    * ``state_dict()`` holds A (float32); stored weights + optimizer state resume bit-identically.
      The trajectory records the mode and ``virtual_indices`` (which tensors were virtual), so
      :func:`zofast.replay` repeats the flushes and rebuilds the weights bit for bit.
    * ``pipeline=True``: the in-place tensors pipeline as above; virtual tensors need no passes.
    * Limits: code that reads ``layer.weight`` itself, or calls ``layer.forward`` directly, sees
      the stored W (such models need mode="inplace"). MeZO has no virtual mode.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import signal
import threading
from dataclasses import dataclass

import numpy as np
import torch

from zofast._ext import triton_available
from zofast.perturb import (
    GraphedPass,
    check_weight,
    gaussian_,
    gaussian_noise,
    lowrank_,
    lowrank_factors,
    matrix_shape,
    outer_add_,
)
from zofast.rng import RunSeeds, as_seed
from zofast.trajectory import (
    ABORT_MINUS,
    ABORT_PLUS,
    SETTLE,
    STEP,
    Trajectory,
    param_fingerprint,
)
from zofast.virtual import VirtualLayers, VirtualTensor, plan

__all__ = ["LOZO", "MeZO", "param_groups", "MODES"]

MODES = ("inplace", "virtual")
_GROUP_KEYS = ("lr", "weight_decay")


def _real(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _positive(value, name: str) -> float:
    value = _real(value, name)
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def _non_negative(value, name: str) -> float:
    value = _real(value, name)
    if value < 0:
        raise ValueError(f"{name} must be ≥ 0, got {value}")
    return value


def _count(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer ≥ 1, got {value!r}")
    return int(value)


def _float32(x: float) -> float:
    return torch.tensor(x, dtype=torch.float64).to(torch.float32).item()


def _update_finite(g: float, lrs: list[float]) -> bool:
    """Whether g and every group's update scale −lr·g are finite float32 numbers."""
    return math.isfinite(g) and all(math.isfinite(_float32(-lr * g)) for lr in lrs)


@contextlib.contextmanager
def _deferred_interrupts():
    """Hold SIGINT (KeyboardInterrupt) until the block is over, so no pass stops half-way."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(frame))
    except (ValueError, OSError):
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            if callable(previous):
                previous(signal.SIGINT, received[0])
            elif previous != signal.SIG_IGN:
                raise KeyboardInterrupt


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Parameter groups with weight decay on matrices only (biases and norm weights exempt).

    Trainable tensors with ndim ≥ 2 go in a group with `weight_decay`, the 1-D ones (biases,
    LayerNorm / RMSNorm weights) and scalars in a group with weight_decay 0. Parameters are given
    with their names, so the optimizer's trajectory records names and :func:`zofast.replay` can
    match a module by name. Empty groups are left out.

    Args:
        model: the module.
        weight_decay: decay of the matrices (≥ 0).

    Returns:
        A list of param-group dicts for LOZO / MeZO (or any torch optimizer).

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
        >>> [len(g["params"]) for g in param_groups(model, 0.01)]  # Linear.weight | bias, LN w, b
        [1, 3]
        >>> opt = LOZO(param_groups(model, 0.01), lr=1e-3)
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    weight_decay = _non_negative(weight_decay, "weight_decay")
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append((name, p))
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


@dataclass
class _Slot:
    """A trained tensor: its flat index (seeds), group, and how it is perturbed."""

    index: int
    param: torch.Tensor
    group: int
    shape: tuple
    rank: int  # 0: full-rank noise
    virtual: VirtualTensor | None = None  # mode="virtual": applied through the layers


class _ZerothOrder(torch.optim.Optimizer):
    """Shared machinery of LOZO and MeZO (see the module docstring)."""

    method = ""

    def __init__(
        self,
        params,
        defaults: dict,
        *,
        seed,
        mode,
        pipeline,
        lowrank: bool,
        model=None,
        virtual_indices=None,
    ):
        try:
            run_seed = as_seed(seed, "seed")
        except (TypeError, ValueError) as error:
            raise ValueError(str(error)) from None
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not isinstance(pipeline, bool):
            raise ValueError(f"pipeline must be True or False, got {pipeline!r}")
        if model is not None and not isinstance(model, torch.nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(params, torch.nn.Module):
            model = params if model is None else model
            params = list(params.named_parameters())
        if mode == "virtual":
            if not lowrank:
                raise ValueError(
                    "mode='virtual' is LOZO's: full-rank noise cannot be applied through the "
                    "layers cheaply; use mode='inplace'"
                )
            if model is None and virtual_indices is None:
                raise ValueError(
                    "mode='virtual' needs the model whose layers apply the perturbation: pass "
                    "model=... (or the model itself as params)"
                )
        elif virtual_indices is not None:
            raise ValueError("virtual_indices is for mode='virtual' only")
        self._zo_ready = False
        self._zo_lowrank = lowrank
        self._zo_mode = mode
        self._zo_model = model if mode == "virtual" else None
        self._zo_virtual_request = None if virtual_indices is None else list(virtual_indices)
        self._zo_virtual: VirtualLayers | None = None
        self._zo_detached = False
        super().__init__(params, defaults)
        self._zo_eps = defaults["eps"]
        self._zo_rank = defaults.get("rank", 0)
        self._zo_nu = defaults.get("nu", 1)
        self._zo_beta = defaults.get("momentum", 0.0)
        self._zo_pipeline = pipeline
        self._zo_run = RunSeeds(run_seed)
        self._zo_step = 0
        self._zo_pending: int | None = None
        self._zo_seed_cache: dict = {}
        self._zo_host_buffers: dict[str, torch.Tensor] = {}  # _finish_queued's, see _zo_pinned
        self._zo_group_index: torch.Tensor | None = None
        self.last_losses: tuple[float, float] | None = None
        self._zo_build_slots()
        self.trajectory = Trajectory(
            self.method, self._zo_hyperparameters(), run_seed, len(self.param_groups)
        )
        self._zo_ready = True

    # Setup and validation.

    def _zo_hyperparameters(self) -> dict:
        raise NotImplementedError

    def add_param_group(self, param_group: dict) -> None:
        """Add a group (before the first step only: seeds and the trajectory index tensors).

        Groups may set "lr" and "weight_decay"; the other hyperparameters are optimizer-wide.
        """
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        if getattr(self, "_zo_ready", False) and (
            self._zo_step or len(self.trajectory.events) or self._zo_pending is not None
        ):
            raise ValueError("parameter groups cannot be added after the first step")
        for key in param_group:
            fixed = key in self.defaults and key not in _GROUP_KEYS and key != "params"
            if fixed and param_group[key] != self.defaults[key]:
                raise ValueError(
                    f"{key} is optimizer-wide: a group cannot set it to {param_group[key]!r}"
                )
        if "lr" in param_group:
            _positive(param_group["lr"], "lr")
        if "weight_decay" in param_group:
            _non_negative(param_group["weight_decay"], "weight_decay")
        super().add_param_group(param_group)
        if getattr(self, "_zo_ready", False):
            self._zo_build_slots()
            self.trajectory = Trajectory(
                self.method,
                self._zo_hyperparameters(),
                self._zo_run.run_seed,
                len(self.param_groups),
            )

    def _zo_flat(self) -> list[tuple[int, torch.Tensor]]:
        return [(gi, p) for gi, group in enumerate(self.param_groups) for p in group["params"]]

    def _zo_build_slots(self) -> None:
        flat = self._zo_flat()
        seen = set()
        for _, p in flat:
            if id(p) in seen:
                raise ValueError("a parameter appears more than once in the optimizer")
            seen.add(id(p))
        self._zo_n_params = len(flat)
        self._zo_trained = [p.requires_grad for _, p in flat]
        slots = []
        for index, (gi, p) in enumerate(flat):
            if not p.requires_grad:
                continue
            try:
                check_weight(p, f"parameter {index}")
            except TypeError as error:
                raise ValueError(str(error)) from None
            rank = 0
            if self._zo_lowrank and p.dim() >= 2:
                m, n = matrix_shape(p.shape)
                rank = min(self._zo_rank, m, n)
            slots.append(_Slot(index, p, gi, tuple(p.shape), rank))
        if not slots:
            raise ValueError("no trainable parameters: every parameter has requires_grad=False")
        virtual = self._zo_plan_virtual(slots) if self._zo_mode == "virtual" else None
        if self._zo_virtual is not None:  # add_param_group before the first step: plan anew
            self._zo_virtual.remove_hooks()
            self._zo_virtual = None
        self._zo_slots = slots
        self._zo_slots_by_index = {s.index: s for s in slots}
        self._zo_inplace = [s for s in slots if s.virtual is None]
        # Per in-place slot, as arrays: what a graphed pass's seed / scale tables are built from.
        self._zo_inplace_index = np.array([s.index for s in self._zo_inplace], dtype=np.int64)
        self._zo_inplace_lowrank = np.array([s.rank > 0 for s in self._zo_inplace], dtype=bool)
        self._zo_inplace_group = np.array([s.group for s in self._zo_inplace], dtype=np.int64)
        if virtual is not None and self._zo_model is not None:
            virtual.attach()
        self._zo_virtual = virtual
        on_gpu = triton_available() and os.environ.get("ZOFAST_CUDA_GRAPHS", "1") != "0"
        # Virtual tensors on one GPU draw each step's (U, V) for all of them in one launch.
        virtual_devices = {vt.param.device for vt in virtual.tensors} if virtual else set()
        self._zo_directions = None
        self._zo_batched_directions = (
            on_gpu and len(virtual_devices) == 1 and virtual_devices.pop().type == "cuda"
        )
        devices = {s.param.device for s in self._zo_inplace}
        # On one GPU every pass replays a CUDA graph per term count (see _pass).
        self._zo_graphs: dict[tuple[int, int], GraphedPass] | None = (
            {} if on_gpu and len(devices) == 1 and devices.pop().type == "cuda" else None
        )

    def _zo_plan_virtual(self, slots: list[_Slot]) -> VirtualLayers:
        """Decide which slots go virtual (mode="virtual"); mark them; raise before any hook."""
        matrices = [s for s in slots if s.rank]
        if self._zo_model is not None:
            layers = plan(self._zo_model, [s.param for s in matrices])
            chosen = {s.index: layers[id(s.param)] for s in matrices if id(s.param) in layers}
            request = self._zo_virtual_request
            if request is not None and sorted(request) != sorted(chosen):
                raise ValueError(
                    f"virtual_indices {sorted(request)} do not match the tensors this model "
                    f"applies through its layers: {sorted(chosen)}"
                )
        else:  # replay: the recorded indices, no hooks (no forward runs)
            by_index = {s.index: s for s in matrices}
            bad = [i for i in self._zo_virtual_request if i not in by_index]
            if bad:
                raise ValueError(
                    f"virtual_indices {bad[:5]} are not trained matrices of this optimizer"
                )
            chosen = {i: [] for i in self._zo_virtual_request}
        names = {}
        for group in self.param_groups:
            names.update(zip(map(id, group["params"]), group.get("param_names", ()), strict=False))
        if self._zo_model is not None:
            for name, p in self._zo_model.named_parameters():
                names.setdefault(id(p), name)
        for slot in slots:
            slot.virtual = None
            if slot.index in chosen:
                slot.virtual = VirtualTensor(
                    slot.index,
                    names.get(id(slot.param), f"parameter {slot.index}"),
                    slot.param,
                    slot.rank,
                    chosen[slot.index],
                )
        self._zo_check_decay([g["weight_decay"] for g in self.param_groups], slots)
        return VirtualLayers([s.virtual for s in slots if s.virtual is not None], owner=self)

    def _zo_check_decay(self, wds: list[float], slots: list[_Slot] | None = None) -> None:
        for slot in self._zo_slots if slots is None else slots:
            if slot.virtual is not None and wds[slot.group]:
                raise ValueError(
                    f"weight_decay {wds[slot.group]} on {slot.virtual.name}, a tensor of "
                    "mode='virtual': decay would need a full pass over it every step; use "
                    "weight_decay=0 for the groups of virtual tensors (or mode='inplace')"
                )

    def _zo_check(self) -> tuple[list[float], list[float]]:
        """Validate everything a step needs before any write; return each group's lr and wd."""
        flat = self._zo_flat()
        if len(flat) != self._zo_n_params:
            raise ValueError("the optimizer's parameter list changed since it was created")
        changed = [i for i, (_, p) in enumerate(flat) if p.requires_grad != self._zo_trained[i]]
        if changed:
            raise ValueError(
                f"requires_grad of parameter(s) {changed[:5]} changed since the optimizer was "
                "created; a trajectory covers one fixed set of trained tensors: call settle() and "
                "create a new optimizer"
            )
        for slot in self._zo_slots:
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
            lr = _non_negative(group["lr"], "lr")
            wds.append(_non_negative(group["weight_decay"], "weight_decay"))
            lrs.append(lr)
        if self._zo_virtual is not None:
            self._zo_check_decay(wds)
            if self._zo_detached:
                raise ValueError(
                    "this virtual-mode optimizer was detached from its model: create a new one "
                    "(load_state_dict continues the run)"
                )
            if self._zo_model is None:
                raise ValueError(
                    "this virtual-mode optimizer was built without a model (for replay): it "
                    "cannot step; pass model=..."
                )
        return lrs, wds

    def _zo_fingerprint(self) -> None:
        flat = self._zo_flat()
        names = []
        for group in self.param_groups:
            names.extend(group.get("param_names", [None] * len(group["params"])))
        self.trajectory.params = param_fingerprint(
            [p for _, p in flat], names, [gi for gi, _ in flat], self._zo_trained
        )
        self.trajectory.device = self._zo_slots[0].param.device.type

    # Noise.

    def _seeds(self, role: str, index: int) -> list[int]:
        key = (role, index)
        seeds = self._zo_seed_cache.get(key)
        if seeds is None:
            if len(self._zo_seed_cache) >= 32:
                self._zo_seed_cache.clear()
            seeds = self._zo_run.seeds(index, self._zo_n_params, role)
            self._zo_seed_cache[key] = seeds
        return seeds

    def _seed_array(self, role: str, index: int) -> np.ndarray:
        """_seeds as a uint64 numpy array (cached alongside), for building pass tables."""
        key = ("array", role, index)
        seeds = self._zo_seed_cache.get(key)
        if seeds is None:
            seeds = np.array(self._seeds(role, index), dtype=np.uint64)
            self._zo_seed_cache[key] = seeds
        return seeds

    def _factors(self, slot: _Slot, t: int, epoch: int | None = None):
        """Materialised (U_t, V_epoch) of a low-rank slot (epoch defaults to t // nu)."""
        epoch = t // self._zo_nu if epoch is None else epoch
        return lowrank_factors(
            slot.shape,
            self._seeds("u", t)[slot.index],
            self._seeds("v", epoch)[slot.index],
            slot.rank,
            device=slot.param.device,
        )

    def _noise(self, slot: _Slot, t: int) -> torch.Tensor:
        """Materialised full-rank z_t of a slot, flattened."""
        seed = self._seeds("full", t)[slot.index]
        return gaussian_noise((slot.param.numel(),), seed, device=slot.param.device)

    # The passes. Every write to the weights happens in _shift, _finish (and settle via _shift).

    def _shift(self, t: int, scale: float) -> None:
        """W += scale·Z_t for every in-place tensor, one engine pass each (virtual tensors: the
        coefficient c, see _virtual_coef)."""
        if self._zo_inplace:
            self._pass([t], [[scale]] * len(self.param_groups))

    def _virtual_coef(self, t: int, c: float) -> None:
        """Virtual tensors: the layers see W + A·V_Aᵀ + c·U_t·V_tᵀ (c = 0: no perturbation)."""
        virtual = self._zo_virtual
        if virtual is None or not virtual.attached:
            return  # no hooks (replay): no forward runs, the factors are not needed
        if c and any(vt.step != t for vt in virtual.tensors):
            for vt, (U, V) in zip(virtual.tensors, self._directions(t), strict=True):
                vt.set_direction(t, t // self._zo_nu, U, V)
        for vt in virtual.tensors:
            vt.set_coef(c)

    def _directions(self, t: int) -> list:
        """(U_t, V) of every virtual tensor: one launch on a GPU (zofast.kernels.multi, bit for
        bit lowrank_factors' numbers), one lowrank_factors call per tensor elsewhere."""
        slots = [self._zo_slots_by_index[vt.index] for vt in self._zo_virtual.tensors]
        if not self._zo_batched_directions:
            return [self._factors(slot, t) for slot in slots]
        from zofast.kernels.multi import MultiPass

        if self._zo_directions is None:
            params, ranks = [s.param for s in slots], [s.rank for s in slots]
            self._zo_directions = MultiPass(params, ranks, 1, factors_only=True)
        index = np.array([vt.index for vt in self._zo_virtual.tensors])
        table = np.stack(
            [self._seed_array("u", t)[index], self._seed_array("v", t // self._zo_nu)[index]], 1
        )
        device = slots[0].param.device
        seeds = torch.from_numpy(table.view(np.int64)).pin_memory().to(device, non_blocking=True)
        ones = torch.ones(len(slots), 1, device=device)
        return self._zo_directions.factors(seeds, ones)

    def _terms(self, slot: _Slot, steps: list[int], scales: list[float]):
        """(seeds, v_seeds or None, scales) of the terms scale_k·Z_(steps[k]) of one slot."""
        if slot.rank:
            us = [self._seeds("u", s)[slot.index] for s in steps]
            vs = [self._seeds("v", s // self._zo_nu)[slot.index] for s in steps]
            return us, vs, scales
        return [self._seeds("full", s)[slot.index] for s in steps], None, scales

    def _graph_plan(self, steps: list[int], group_scales: list[list[float]]):
        """(graph, seed table, scale table) of a pass over the in-place tensors that a CUDA graph
        can replay (see _pass), or None: no graphs, or low-rank terms on V epochs that are not
        one run, then at most one other (a V-refresh step's restore + update, then next)."""
        slots, index, lowrank = self._zo_inplace, self._zo_inplace_index, self._zo_inplace_lowrank
        epochs = [s // self._zo_nu for s in steps] if lowrank.any() else [0] * len(steps)
        split = epochs.index(epochs[-1])  # the first term on the last V: 0 if one V
        if self._zo_graphs is None or epochs[:split] != [epochs[0]] * split:
            return None
        # The v seeds per V (one column of zeros without low-rank tensors).
        v_rows = [self._seed_array("v", e)[index] for e in dict.fromkeys(epochs)]
        if split and np.any((v_rows[0] == v_rows[1]) & lowrank):
            return None  # one V after all: lowrank_ merges every term (eager path)
        key = (len(steps), split)
        graph = self._zo_graphs.get(key)
        if graph is None or graph.stale:  # first use, or a parameter was reallocated
            params, ranks = [s.param for s in slots], [s.rank for s in slots]
            same = [g for g in self._zo_graphs.values() if not g.stale and g.v_split == split]
            graph = self._zo_graphs[key] = GraphedPass(
                params, ranks, len(steps), share_with=same[0] if same else None, v_split=split
            )
        table = np.zeros((len(slots), len(steps) + len(v_rows)), dtype=np.uint64)
        for k, step in enumerate(steps):
            full = self._seed_array("full", step)[index] if not lowrank.all() else 0
            u = self._seed_array("u", step)[index] if lowrank.any() else 0
            table[:, k] = np.where(lowrank, u, full)
        for j, v in enumerate(v_rows):
            table[:, len(steps) + j] = np.where(lowrank, v, 0)
        scales = np.asarray(group_scales, dtype=np.float32)[self._zo_inplace_group]
        return graph, table, scales

    def _pass(self, steps: list[int], group_scales: list[list[float]]) -> None:
        """One engine pass over the in-place tensors: every one gets the terms
        scale_k·Z_(steps[k]), with its group's scales group_scales[group][k].

        On one GPU a CUDA graph of the whole pass is replayed with a seed table built in numpy
        (no Python call per tensor; see _graph_plan); its results are bit-identical to the eager
        calls."""
        plan = self._graph_plan(steps, group_scales)
        if plan is not None:
            graph, table, scales = plan
            graph.replay_table(table, scales)
            return
        for slot in self._zo_inplace:
            seeds, vs, scales = self._terms(slot, steps, group_scales[slot.group])
            if slot.rank:
                lowrank_(slot.param, seeds, vs, slot.rank, scales)
            else:
                gaussian_(slot.param, seeds, scales)

    def _momentum(self, slot: _Slot, t: int, g: float):
        """New momentum buffer of a slot after step t, and the direction tensors it used."""
        beta = self._zo_beta
        old = self.state[slot.param].get("momentum_buffer")
        if slot.rank:
            U, V = self._factors(slot, t)
            if old is None:
                new = U * g
            elif t % self._zo_nu == 0:
                _, V_old = self._factors(slot, t, t // self._zo_nu - 1)
                carry = (old.double() @ (V_old.double().T @ V.double())) * (beta / V.shape[0])
                new = (carry + U.double() * ((1.0 - beta) * g)).float()
            else:
                new = torch.add(old * beta, U, alpha=(1.0 - beta) * g)
            return new, (U, V)
        z = self._noise(slot, t)
        new = z * g if old is None else torch.add(old * beta, z, alpha=(1.0 - beta) * g)
        return new, (z,)

    def _finish(self, t: int, g: float, lrs: list[float], wds: list[float]) -> None:
        """Restore, update (and pipelined: perturb for step t + 1) in one pass per tensor."""
        eps, nxt = self._zo_eps, (t + 1 if self._zo_pipeline else None)
        buffers, used = {}, {}
        if self._zo_beta:  # all state first: a failure here leaves the weights untouched
            for slot in self._zo_slots:
                buffers[slot.index], used[slot.index] = self._momentum(slot, t, g)
            if not torch.stack([torch.isfinite(b).all() for b in buffers.values()]).all():
                raise FloatingPointError(f"the momentum overflowed at step {t} (g = {g})")
        pending = self._virtual_updates(t, g, lrs, wds, buffers, used)
        for slot in self._zo_inplace:
            lr, wd = lrs[slot.group], wds[slot.group]
            decay = 1.0 - lr * wd
            restore = decay * eps
            p = slot.param
            if decay != 1.0:
                p.mul_(decay)
            if not self._zo_beta:
                continue  # one fused pass for all, below
            if slot.rank:
                U, V = used[slot.index]
                left, right = [U * restore, buffers[slot.index] * -lr], [V, V]
                if nxt is not None:
                    U2, V2 = self._factors(slot, nxt)
                    left.append(U2 * eps)
                    right.append(V2)
                outer_add_(p, torch.cat(left, 1), torch.cat(right, 1))
            else:
                cols, scales = [used[slot.index][0], buffers[slot.index]], [restore, -lr]
                if nxt is not None:
                    cols.append(self._noise(slot, nxt))
                    scales.append(eps)
                right = torch.tensor([scales], dtype=torch.float32, device=p.device)
                outer_add_(p.view(-1, 1), torch.stack(cols, 1), right)
        if not self._zo_beta and self._zo_inplace:
            steps = [t, t] if nxt is None else [t, t, nxt]
            group_scales = [
                [(1.0 - lr * wd) * eps, -lr * g] + ([] if nxt is None else [eps])
                for lr, wd in zip(lrs, wds, strict=True)
            ]
            self._pass(steps, group_scales)
        for slot, A, epoch, V in pending:  # V refresh: the old A goes into W first, one pass
            vt = slot.virtual
            if vt.epoch is not None and vt.epoch != epoch:
                vt.flush()
            vt.set_coef(0.0)
            vt.set_pending(A, epoch, V)
            self.state[slot.param]["virtual_factor"] = A
            self.state[slot.param]["virtual_epoch"] = epoch
        for slot in self._zo_slots:
            if slot.index in buffers:
                self.state[slot.param]["momentum_buffer"] = buffers[slot.index]
        self._end_step(t, g, lrs, wds)

    def _end_step(self, t: int, g: float, lrs: list[float], wds: list[float]) -> None:
        self.trajectory.record_step(g, lrs, wds)
        self._zo_step = t + 1
        self._zo_pending = t + 1 if self._zo_pipeline else None

    def _finish_queued(self, t: int, loss_plus, loss_minus, lrs: list[float], wds: list[float]):
        """_finish with g computed where the losses are, so that the last pass of step t is
        queued right behind the second forward: the GPU does not wait for the host to read the
        losses, which it does (from a copy queued before the pass) while the pass runs.

        Only for a graphed pass (zofast.perturb.GraphedPass) with both losses tensors on the
        weights' device, no momentum, no virtual tensors and no weight decay; returns None
        otherwise (the caller reads the losses and runs _finish). Returns the losses as floats.

        The pass's terms are those of _finish, the update's scale −lr·g computed on the device
        in the same float64 arithmetic (so bit for bit the same). If g or any group's −lr·g is
        not finite in float32 (a non-finite loss gives such a g), the device zeroes the update
        and next-step terms: the pass is then the restore alone, bit for bit _abort's one-term
        pass (the zero terms add exact zeros), and is recorded as that abort; step() raises."""
        device = self._zo_inplace[0].param.device if self._zo_inplace else None
        on_device = all(
            isinstance(x, torch.Tensor) and x.device == device for x in (loss_plus, loss_minus)
        )
        if not on_device or self._zo_beta or self._zo_virtual is not None or any(wds):
            return None
        eps, nxt = self._zo_eps, (t + 1 if self._zo_pipeline else None)
        steps = [t, t] if nxt is None else [t, t, nxt]
        plan = self._graph_plan(steps, [[eps, 0.0] + ([] if nxt is None else [eps])] * len(lrs))
        if plan is None:
            return None
        graph, table, scales = plan
        losses = torch.stack([loss_plus.reshape(()).double(), loss_minus.reshape(()).double()])
        g = ((losses[0] - losses[1]) / (2.0 * eps)).float()
        # Host -> device through pinned memory: a pageable copy could wait for the forward.
        lr_host = self._zo_pinned("lrs", len(lrs), device)
        lr_host.copy_(torch.tensor(lrs, dtype=torch.float64))
        lr_groups = lr_host.to(device, non_blocking=True)
        updates = (lr_groups * -g.double()).float()  # per group, as _finish's float32 scales
        finite = torch.isfinite(g) & torch.isfinite(updates).all()

        def set_update(device_scales):  # columns: restore, update, (next)
            row_updates = updates[self._zo_inplace_group_index(device)]
            device_scales[:, 1] = torch.where(finite, row_updates, 0.0)
            device_scales[:, 2:] *= finite

        loss_host = self._zo_pinned("losses", 2, device)
        loss_host.copy_(losses, non_blocking=True)
        copied = torch.cuda.Event() if device.type == "cuda" else None
        if copied is not None:
            copied.record()
        graph.replay_table(table, scales, set_update)
        if copied is not None:
            copied.synchronize()
        loss_plus, loss_minus = loss_host.tolist()
        g_host = _float32((loss_plus - loss_minus) / (2.0 * eps))
        if _update_finite(g_host, lrs):
            self._end_step(t, g_host, lrs, wds)
        else:
            self.trajectory.record(ABORT_MINUS)
        return loss_plus, loss_minus

    def _zo_pinned(self, name: str, size: int, device) -> torch.Tensor:
        """A float64 host buffer of _finish_queued, pinned for a GPU; reused across steps (the
        copies that read or fill it are over when the step returns)."""
        buffer = self._zo_host_buffers.get(name)
        if buffer is None or buffer.numel() != size:
            pinned = device.type == "cuda"
            buffer = self._zo_host_buffers[name] = torch.empty(
                size, dtype=torch.float64, pin_memory=pinned
            )
        return buffer

    def _zo_inplace_group_index(self, device) -> torch.Tensor:
        """The group of every in-place tensor (rows of a graphed pass), on `device`."""
        cached = self._zo_group_index
        if cached is None or cached.device != device:
            cached = self._zo_group_index = torch.from_numpy(self._zo_inplace_group).to(device)
        return cached

    def _virtual_updates(self, t, g, lrs, wds, buffers, used) -> list[tuple]:
        """Virtual tensors' new pending factors after step t (computed before any write):
        A ← A − lr·g·U_t (LOZO-M: A ← A − lr·N), where A is on V_t; a fresh A (−lr·g·U_t) on a
        V refresh, the old one then being folded into W by _finish."""
        out = []
        virtual = self._zo_virtual
        if virtual is None:
            return out
        self._zo_check_decay(wds)
        epoch = t // self._zo_nu
        for vt in virtual.tensors:
            slot = self._zo_slots_by_index[vt.index]
            lr = lrs[slot.group]
            if slot.index in used:
                U, V = used[slot.index]
            elif vt.step == t:
                U, V = vt.U, vt.V
            else:
                U, V = self._factors(slot, t)
            delta = buffers[slot.index] * -lr if self._zo_beta else U * (-lr * g)
            same = vt.epoch == epoch
            out.append((slot, torch.add(vt.A, delta) if same else delta, epoch, V))
        return out

    def _begin(self, t: int) -> None:
        if self._zo_pending is None:
            self._shift(t, self._zo_eps)
        elif self._zo_pending != t:
            raise RuntimeError(f"internal error: pending step {self._zo_pending}, stepping {t}")
        self._zo_pending = None
        self._virtual_coef(t, self._zo_eps)

    def _minus(self, t: int) -> None:
        """From +ε to −ε: one pass over the in-place tensors, c = −ε for the virtual ones."""
        self._shift(t, -2.0 * self._zo_eps)
        self._virtual_coef(t, -self._zo_eps)

    def _abort(self, t: int, stage: int) -> None:
        self._virtual_coef(t, 0.0)  # virtual tensors: nothing was written
        self._shift(t, -self._zo_eps if stage == 1 else self._zo_eps)
        self.trajectory.record(ABORT_PLUS if stage == 1 else ABORT_MINUS)
        self._zo_pending = None

    # Public API.

    @staticmethod
    def _loss_scalar(loss):
        """Check a closure result without reading it: a one-element real tensor (returned as it
        is, so a GPU loss is not synchronised yet) or a Python real (returned as a float)."""
        if isinstance(loss, torch.Tensor):
            if loss.requires_grad:
                raise ValueError(
                    "closure returned a tensor that requires grad: the closure must run under "
                    "torch.no_grad() (step() calls it under no_grad; do not re-enable grad inside)"
                )
            if loss.numel() != 1:
                raise ValueError(
                    f"closure must return a scalar loss, got a tensor of shape {tuple(loss.shape)}"
                )
            if loss.is_complex() or loss.dtype == torch.bool:
                raise ValueError(f"closure must return a real loss, got dtype {loss.dtype}")
            return loss
        if isinstance(loss, numbers.Real) and not isinstance(loss, bool):
            return float(loss)
        kind = type(loss).__name__
        raise ValueError(f"closure must return a Python number or a one-element tensor, got {kind}")

    @staticmethod
    def _loss_value(loss, t: int, which: str) -> float:
        """The float of a checked closure result; FloatingPointError if it is not finite."""
        value = float(loss.item()) if isinstance(loss, torch.Tensor) else loss
        if not math.isfinite(value):
            raise FloatingPointError(
                f"the loss at the {which}ε perturbation of step {t} is {value}; the weights were "
                "restored"
            )
        return value

    @torch.no_grad()
    def step(self, closure) -> float:
        """One zeroth-order step (see the module docstring for the exact sequence).

        Args:
            closure: callable with no arguments that evaluates the loss of ONE batch (the same
                batch both times it is called in a step) and returns it as a Python number or a
                one-element tensor. It is called twice, under torch.no_grad().

        Returns:
            (L+ + L−)/2, a Python float: the loss at the unperturbed weights up to O(ε²).

        Raises:
            ValueError: no closure, a closure result that is not a real scalar or requires grad,
                an invalid group lr / weight_decay, changed requires_grad (weights untouched, or
                restored when detected after perturbing).
            FloatingPointError: NaN / inf loss or g (weights restored).

        Example:
            >>> model = torch.nn.Linear(4, 1)
            >>> opt = MeZO(model.parameters(), lr=1e-3)
            >>> x, y = torch.randn(8, 4), torch.randn(8, 1)
            >>> loss = opt.step(lambda: torch.nn.functional.mse_loss(model(x), y))
        """
        if closure is None or not callable(closure):
            raise ValueError("step() needs a closure that returns the loss of one batch")
        lrs, wds = self._zo_check()
        if self.trajectory.params is None:
            self._zo_fingerprint()
        t, eps = self._zo_step, self._zo_eps
        stage = 0
        try:
            with _deferred_interrupts():
                self._begin(t)
                stage = 1
            loss_plus = self._loss_scalar(closure())
            # Left unread where a later read costs nothing: a GPU loss, or one that the graphed
            # passes may take as it is (_finish_queued).
            if not (
                isinstance(loss_plus, torch.Tensor)
                and (loss_plus.is_cuda or self._zo_graphs is not None)
            ):
                loss_plus = self._loss_value(loss_plus, t, "+")
            with _deferred_interrupts():
                self._minus(t)
                stage = 2
            # A GPU L+ is read only now: the −2ε pass and the second forward were queued behind
            # the first without waiting for it (one host sync per evaluation pair, not two).
            loss_minus = self._loss_scalar(closure())
            with _deferred_interrupts():
                read = self._finish_queued(t, loss_plus, loss_minus, lrs, wds)
                if read is not None:
                    stage = 3  # finished, or restored and recorded as an abort
                    loss_plus, loss_minus = read
            loss_plus = self._loss_value(loss_plus, t, "+")
            loss_minus = self._loss_value(loss_minus, t, "−")
            g = _float32((loss_plus - loss_minus) / (2.0 * eps))
            if not math.isfinite(g):
                raise FloatingPointError(f"g of step {t} is {g}; the weights were restored")
            if not _update_finite(g, lrs):
                raise FloatingPointError(
                    f"the update −lr·g of step {t} overflows float32 (g = {g}, lr = {max(lrs)}); "
                    "the weights were restored"
                )
            if stage == 2:
                with _deferred_interrupts():
                    self._finish(t, g, lrs, wds)
                    stage = 3
        except BaseException:
            if stage in (1, 2):
                with _deferred_interrupts():
                    self._abort(t, stage)
            raise
        self.last_losses = (loss_plus, loss_minus)
        return 0.5 * (loss_plus + loss_minus)

    @torch.no_grad()
    def settle(self) -> None:
        """Make the stored weights the current iterate (idempotent; nothing to do: no-op).

        * ``pipeline=True``: removes the next step's +ε perturbation, which the in-place weights
          carry between steps (one pass).
        * ``mode="virtual"``: writes the pending low-rank updates into the virtual weights,
          W += A·V_Aᵀ, one fused pass per tensor, and A = 0. Between steps the layers already
          compute with W + A·V_Aᵀ, so evaluation needs no settle; saving or exporting
          ``model.state_dict()``, copying the model or reading ``.weight`` does.

        Call it before evaluating (pipelined) or saving / exporting the model. It is recorded in
        the trajectory, so replay repeats it.

        Example:
            >>> model = torch.nn.Linear(4, 1)
            >>> opt = MeZO(model.parameters(), lr=1e-3, pipeline=True)
            >>> _ = opt.step(lambda: model(torch.ones(1, 4)).sum())
            >>> opt.settle()  # model now holds the weights after step 1
        """
        if self._zo_pending is None and not self.unflushed:
            return
        with _deferred_interrupts():
            if self._zo_pending is not None:
                self._shift(self._zo_pending, -self._zo_eps)
            if self._zo_virtual is not None:
                for vt in self._zo_virtual.tensors:
                    if vt.epoch is not None:
                        vt.flush()
                        state = self.state[vt.param]
                        state.pop("virtual_factor", None)
                        state.pop("virtual_epoch", None)
            self.trajectory.record(SETTLE)
            self._zo_pending = None

    @torch.no_grad()
    def detach(self) -> None:
        """mode="virtual": settle(), then remove the forward hooks from the model's layers.

        After this the model is a plain model holding the trained weights, and this optimizer
        cannot step any more (a new one can continue the run through load_state_dict). In place
        it only settles. Idempotent.

        Example:
            >>> model = torch.nn.Linear(4, 1)
            >>> opt = LOZO(model, lr=1e-3, rank=1, mode="virtual")
            >>> _ = opt.step(lambda: model(torch.ones(1, 4)).sum())
            >>> opt.detach()  # model.weight holds the weights after step 1; no hooks left
        """
        self.settle()
        if self._zo_virtual is not None and self._zo_virtual.attached:
            self._zo_virtual.remove_hooks()
            self._zo_detached = True

    @property
    def pending(self) -> bool:
        """Whether the weights now carry a pipelined +ε perturbation (settle() removes it)."""
        return self._zo_pending is not None

    @property
    def unflushed(self) -> bool:
        """mode="virtual": whether updates are pending outside the stored weights (settle()
        writes them); always False in place."""
        virtual = self._zo_virtual
        return virtual is not None and any(vt.epoch is not None for vt in virtual.tensors)

    @property
    def virtual_names(self) -> list[str]:
        """mode="virtual": names of the tensors perturbed and updated through their layers (the
        others run in place); [] in place."""
        virtual = self._zo_virtual
        return [] if virtual is None else [vt.name for vt in virtual.tensors]

    @property
    def steps(self) -> int:
        """Number of completed steps."""
        return self._zo_step

    @property
    def run_seed(self) -> int:
        """The seed every perturbation of this run derives from."""
        return self._zo_run.run_seed

    def _zo_replay(self, trajectory: Trajectory) -> None:
        """Re-run the engine calls of `trajectory` (used by zofast.replay)."""
        for kind, g, lrs, wds in trajectory.iter_events():
            t = self._zo_step
            if kind == SETTLE:
                self.settle()
                continue
            self._begin(t)
            if kind == ABORT_PLUS:
                self._abort(t, 1)
                continue
            self._minus(t)
            if kind == ABORT_MINUS:
                self._abort(t, 2)
            elif kind == STEP:
                self._finish(t, g, lrs, wds)

    def state_dict(self) -> dict:
        """torch's optimizer state plus zofast's: step, run seed, pending perturbation, trajectory.

        Momentum buffers are in ``state`` (float32, whatever the weight dtype); the returned dict
        is a snapshot (later steps do not change it). With pipelining, ``pending`` says the weights
        carry the next step's +ε perturbation: save them together, or settle() first.

        Example:
            >>> model = torch.nn.Linear(4, 1)
            >>> opt = LOZO(model, lr=1e-3, rank=1)
            >>> sorted(opt.state_dict()["zofast"])
            ['hyperparameters', 'method', 'pending', 'run_seed', 'step', 'trajectory']
        """
        sd = super().state_dict()
        sd["state"] = {k: dict(v) for k, v in sd["state"].items()}
        sd["zofast"] = {
            "method": self.method,
            "hyperparameters": self._zo_hyperparameters(),
            "run_seed": str(self._zo_run.run_seed),
            "step": self._zo_step,
            "pending": self._zo_pending,
            "trajectory": self.trajectory.to_dict(),
        }
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Resume from :meth:`state_dict`; continuing is bit-identical to never having stopped.

        Load the weights saved with it (unsettled ones if ``pending``). Raises ValueError if the
        method or fixed hyperparameters differ.

        Example:
            >>> model = torch.nn.Linear(4, 1)
            >>> opt = LOZO(model, lr=1e-3, rank=1)
            >>> opt.load_state_dict(opt.state_dict())
        """
        state_dict = dict(state_dict)
        extra = state_dict.pop("zofast", None)
        if extra is None:
            raise ValueError("not a zofast optimizer state_dict (no 'zofast' entry)")
        if extra["method"] != self.method:
            raise ValueError(
                f"state_dict is for {extra['method']}, this optimizer is {self.method}"
            )
        if extra["hyperparameters"] != self._zo_hyperparameters():
            raise ValueError(
                f"state_dict hyperparameters {extra['hyperparameters']} differ from this "
                f"optimizer's {self._zo_hyperparameters()}"
            )
        trajectory = Trajectory.from_dict(extra["trajectory"])
        super().load_state_dict(state_dict)
        flat = [p for _, p in self._zo_flat()]
        for key, value in state_dict["state"].items():
            for name in ("momentum_buffer", "virtual_factor"):
                buffer = value.get(name)
                if buffer is not None:
                    p = flat[key]
                    self.state[p][name] = buffer.to(p.device, torch.float32).clone()
        self._zo_run = RunSeeds(int(extra["run_seed"]))
        self._zo_seed_cache = {}
        self._zo_step = int(extra["step"])
        self._zo_pending = None if extra["pending"] is None else int(extra["pending"])
        self.trajectory = trajectory
        if self._zo_virtual is not None:
            for vt in self._zo_virtual.tensors:
                state = self.state[vt.param]
                vt.set_coef(0.0)
                vt.set_direction(None, None, None, None)
                if "virtual_factor" in state:
                    epoch = int(state["virtual_epoch"])
                    slot = self._zo_slots_by_index[vt.index]
                    V = self._factors(slot, epoch * self._zo_nu, epoch)[1]
                    vt.set_pending(state["virtual_factor"], epoch, V)
                else:
                    vt.set_pending(None, None, None)


class LOZO(_ZerothOrder):
    """Low-rank zeroth-order SGD (LOZO, arXiv 2410.07698), with momentum LOZO-M.

    Matrices (ndim ≥ 2) are perturbed by ε·U·Vᵀ, U redrawn every step and V every `nu` steps;
    vectors by full-rank ε·z. See the module docstring for the step, momentum, weight decay,
    pipelining and failure handling.

    Args:
        params: an nn.Module, an iterable of tensors or (name, tensor) pairs, or param groups
            (groups may set "lr" and "weight_decay"; see :func:`param_groups`).
        lr: learning rate (> 0; schedulers may later set any value ≥ 0).
        eps: perturbation scale ε (> 0).
        rank: r of U·Vᵀ (≥ 1; clamped to min(m, n) per tensor).
        nu: steps between V redraws (≥ 1).
        momentum: β in [0, 1); > 0 gives LOZO-M.
        weight_decay: default decay (≥ 0) for groups that do not set one.
        seed: run seed, an integer in 0..2**64-1.
        mode: "inplace" (the weights carry the perturbations) or "virtual" (the model's layers
            apply them and the pending updates; see the module docstring and zofast.virtual).
        pipeline: fuse the next step's perturbation into the update (call settle() before
            evaluating or saving).
        model: mode="virtual": the module whose forward the closure runs (default: `params`
            when it is a module). Ignored in place.
        virtual_indices: set by :func:`zofast.replay` from the trajectory (the flat indices
            of the tensors a run kept virtual); an optimizer built with it and no model can
            only replay. With a model it must match what the model gives.

    Example:
        >>> model = torch.nn.Linear(16, 4)
        >>> opt = LOZO(param_groups(model, 0.0), lr=1e-3, rank=2, nu=50, seed=7)
        >>> x, y = torch.randn(32, 16), torch.randn(32, 4)
        >>> loss = opt.step(lambda: torch.nn.functional.mse_loss(model(x), y))
        >>> net = torch.nn.Linear(16, 4)
        >>> opt = LOZO(net, lr=1e-3, mode="virtual")  # net.weight goes through the layer
        >>> opt.virtual_names
        ['weight']
        >>> loss = opt.step(lambda: torch.nn.functional.mse_loss(net(x), y))
        >>> opt.settle()  # before saving net.state_dict(): W += A·Vᵀ
    """

    method = "LOZO"

    def __init__(
        self,
        params,
        lr: float,
        eps: float = 1e-3,
        rank: int = 2,
        nu: int = 50,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        seed: int = 0,
        mode: str = "inplace",
        pipeline: bool = False,
        model: torch.nn.Module | None = None,
        virtual_indices: list[int] | None = None,
    ):
        momentum = _real(momentum, "momentum")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        defaults = {
            "lr": _positive(lr, "lr"),
            "weight_decay": _non_negative(weight_decay, "weight_decay"),
            "eps": _positive(eps, "eps"),
            "rank": _count(rank, "rank"),
            "nu": _count(nu, "nu"),
            "momentum": momentum,
        }
        if virtual_indices is not None:
            items = virtual_indices if isinstance(virtual_indices, (list, tuple)) else [None]
            if not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in items):
                raise ValueError(
                    f"virtual_indices must be a list of integers, got {virtual_indices!r}"
                )
        super().__init__(
            params,
            defaults,
            seed=seed,
            mode=mode,
            pipeline=pipeline,
            lowrank=True,
            model=model,
            virtual_indices=None if virtual_indices is None else [int(i) for i in virtual_indices],
        )

    def _zo_hyperparameters(self) -> dict:
        hyper = {
            "eps": self._zo_eps,
            "rank": self._zo_rank,
            "nu": self._zo_nu,
            "momentum": self._zo_beta,
            "mode": self._zo_mode,
            "pipeline": self._zo_pipeline,
        }
        if self._zo_mode == "virtual":  # replay needs them: it has no model to find them in
            hyper["virtual_indices"] = [vt.index for vt in self._zo_virtual.tensors]
        return hyper


class MeZO(_ZerothOrder):
    """Memory-efficient zeroth-order SGD (MeZO, arXiv 2305.17333): full-rank Gaussian noise.

    Args:
        params: an nn.Module, an iterable of tensors or (name, tensor) pairs, or param groups.
        lr: learning rate (> 0; schedulers may later set any value ≥ 0).
        eps: perturbation scale ε (> 0).
        weight_decay: default decay (≥ 0) for groups that do not set one.
        seed: run seed, an integer in 0..2**64-1.
        mode: "inplace" (MeZO's full-rank noise cannot go through the layers cheaply: no
            "virtual" mode; ValueError).
        pipeline: fuse the next step's perturbation into the update (call settle() before
            evaluating or saving).

    Example:
        >>> model = torch.nn.Linear(16, 4)
        >>> opt = MeZO(model, lr=1e-3, seed=1)
        >>> x = torch.randn(32, 16)
        >>> loss = opt.step(lambda: model(x).pow(2).mean())
    """

    method = "MeZO"

    def __init__(
        self,
        params,
        lr: float,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        seed: int = 0,
        mode: str = "inplace",
        pipeline: bool = False,
    ):
        defaults = {
            "lr": _positive(lr, "lr"),
            "weight_decay": _non_negative(weight_decay, "weight_decay"),
            "eps": _positive(eps, "eps"),
        }
        super().__init__(params, defaults, seed=seed, mode=mode, pipeline=pipeline, lowrank=False)

    def _zo_hyperparameters(self) -> dict:
        return {"eps": self._zo_eps, "mode": self._zo_mode, "pipeline": self._zo_pipeline}


METHODS = {"LOZO": LOZO, "MeZO": MeZO}
