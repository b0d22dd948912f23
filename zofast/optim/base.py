"""The zeroth-order step protocol, over parts that each apply the perturbation their own way.

``step(closure)``: validate (nothing written yet) → begin (+ε) → L+ → minus (−ε) → L− →
g = (L+ − L−)/(2ε) → finish (restore, update); any failure after begin → abort (undo the
perturbation) and re-raise. A paired step (zofast.optim.paired) evaluates (L+, L−) in one
forward between begin and finish. The parts:

* :class:`zofast.optim.inplace.InPlace`: tensors that carry the perturbation (engine passes);
* :class:`zofast.optim.virtual.Virtual`: LOZO's matrices applied through their layers' hooks;
* :class:`zofast.optim.shadow.Shadow`: exact mode, perturbed temporaries and layer hooks;
* :class:`zofast.optim.momentum.Momentum`: LOZO-M's buffers, computed before any write;
* :class:`zofast.optim.noise.NoisePlan`: which seeds every tensor gets at every step.

Building the parts and the checks before a step are in zofast.optim.setup, state_dict /
load_state_dict in zofast.optim.state.

The methods (zofast.optim.methods) only add their hyperparameters.
"""

from __future__ import annotations

import math

import torch

from zofast.optim.checks import (
    deferred_interrupts,
    float32,
    loss_scalar,
    loss_value,
    update_finite,
)
from zofast.optim.group import DataParallel, check_examples
from zofast.optim.modes import LOW_PRECISION, check_modes, resolve
from zofast.optim.paired import PairedStep
from zofast.optim.setup import Setup
from zofast.optim.shadow import Shadow
from zofast.optim.state import Checkpoint
from zofast.optim.virtual import Virtual
from zofast.rng import as_seed
from zofast.trajectory import ABORT_MINUS, ABORT_PLUS, SETTLE, STEP, Trajectory


class ZerothOrder(Setup, Checkpoint, PairedStep, torch.optim.Optimizer):
    """The step protocol shared by LOZO and MeZO (see zofast.optim's docstring)."""

    method = ""

    def __init__(
        self,
        params,
        defaults: dict,
        *,
        seed,
        mode,
        rounding,
        pipeline,
        lowrank: bool,
        model=None,
        virtual_indices=None,
        virtual_rest=None,
        process_group=None,
        paired=False,
    ):
        try:
            run_seed = as_seed(seed, "seed")
        except (TypeError, ValueError) as error:
            raise ValueError(str(error)) from None
        if not isinstance(pipeline, bool):
            raise ValueError(f"pipeline must be True or False, got {pipeline!r}")
        if model is not None and not isinstance(model, torch.nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(params, torch.nn.Module):
            model = params if model is None else model
            params = list(params.named_parameters())
        check_modes(mode, rounding, lowrank, virtual_indices, virtual_rest, paired)
        self._paired = paired
        self._group = None if process_group is None else DataParallel(process_group)
        self._ready = False
        self._lowrank = lowrank
        self._virtual_request = None if virtual_indices is None else list(virtual_indices)
        self._virtual: Virtual | None = None
        self._shadow: Shadow | None = None
        super().__init__(params, defaults)
        trained = [p for group in self.param_groups for p in group["params"] if p.requires_grad]
        self._mode, self._rounding, self._rest = resolve(
            mode,
            rounding,
            pipeline,
            virtual_rest,
            low=any(p.dtype in LOW_PRECISION for p in trained),
            lowrank=lowrank,
            decay=any(group["weight_decay"] for group in self.param_groups),
            has_model=model is not None,
            replay_only=self._virtual_request is not None,
            paired=paired,
        )
        self._model = model if self._mode in ("virtual", "shadow") else None
        self._eps = defaults["eps"]
        self._rank = defaults.get("rank", 0)
        self._nu = defaults.get("nu", 1)
        self._beta = defaults.get("momentum", 0.0)
        self._pipeline = pipeline
        self._run_seed = run_seed
        self._step_count = 0
        self._pending: int | None = None
        self.last_losses: tuple[float, float] | None = None
        self._build_slots()
        self.trajectory = self._new_trajectory()
        self._ready = True

    # Setup and validation.

    def _hyperparameters(self) -> dict:
        """What replay needs besides the seeds and the g's (methods add theirs)."""
        hyper = {
            "eps": self._eps,
            "mode": self._mode,
            "rounding": self._rounding,
            "pipeline": self._pipeline,
        }
        if self._mode == "virtual":  # replay needs them: it has no model to find them in
            hyper["virtual_indices"] = [s.index for s in self._virtual.slots]
            hyper["virtual_rest"] = self._rest
        if self._paired:  # the record says so (the updates, hence replay, are the same)
            hyper["paired"] = True
        return hyper

    def _new_trajectory(self) -> Trajectory:
        return Trajectory(
            self.method, self._hyperparameters(), self._run_seed, len(self.param_groups)
        )

    # The protocol. Every write to the weights happens in the parts, called from here.

    def _shift(self, t: int, scale: float) -> None:
        self._inplace.shift(t, scale, len(self.param_groups))

    def _coef(self, t: int, c: float) -> None:
        """Virtual and shadow tensors: the forwards see W + c·Z_t (nothing is written)."""
        for part in (self._virtual, self._shadow):
            if part is not None:
                part.coef(t, c)

    def _begin(self, t: int) -> None:
        if self._pending is None:
            self._shift(t, self._eps)
        elif self._pending != t:
            raise RuntimeError(f"internal error: pending step {self._pending}, stepping {t}")
        self._pending = None
        self._coef(t, self._eps)

    def _minus(self, t: int) -> None:
        """From +ε to −ε."""
        self._shift(t, -2.0 * self._eps)
        self._coef(t, -self._eps)

    def _abort(self, t: int, stage: int) -> None:
        self._coef(t, 0.0)  # virtual tensors: nothing was written
        self._shift(t, -self._eps if stage == 1 else self._eps)
        self.trajectory.record(ABORT_PLUS if stage == 1 else ABORT_MINUS)
        self._pending = None

    def _finish(self, t: int, g: float, lrs: list[float], wds: list[float]) -> None:
        """Restore and update (pipelined: perturb for step t + 1): new state first, then writes."""
        nxt = t + 1 if self._pipeline else None
        buffers, used = {}, {}
        if self._momentum is not None:  # all state first: a failure leaves the weights untouched
            buffers, used = self._momentum.buffers(self._slots, self.state, t, g)
        pending = []
        if self._virtual is not None:
            self._virtual.check_decay(wds)
            pending = self._virtual.updates(t, g, lrs, buffers, used)
        self._inplace.finish(t, g, lrs, wds, self._eps, nxt, self._momentum, buffers, used)
        if self._shadow is not None:
            self._shadow.finish(t, g, lrs, wds, self._momentum, buffers, used)
        if self._virtual is not None:
            self._virtual.commit(pending, self.state, t)
        for slot in self._slots:
            if slot.index in buffers:
                self.state[slot.param]["momentum_buffer"] = buffers[slot.index]
        self._end_step(t, g, lrs, wds)

    def _end_step(self, t: int, g: float, lrs: list[float], wds: list[float]) -> None:
        self._coef(t, 0.0)  # between steps the forwards see the stored (and pending) weights
        self.trajectory.record_step(g, lrs, wds)
        self._step_count = t + 1
        self._pending = t + 1 if self._pipeline else None

    def _finish_queued(self, t: int, loss_plus, loss_minus, lrs, wds):
        """The queued finish of the in-place or the shadow part where it applies (no momentum,
        virtual tensors or weight decay; see Passes.queued); None otherwise. Records the step,
        or an abort when g or an update is not finite."""
        if self._momentum is not None or self._virtual is not None or any(wds):
            return None
        if self._group is not None:  # the losses are all-reduced first
            return None
        if self._shadow is not None:
            read = self._shadow.finish_queued(t, loss_plus, loss_minus, lrs, self._eps)
        else:
            nxt = t + 1 if self._pipeline else None
            read = self._inplace.finish_queued(t, loss_plus, loss_minus, lrs, self._eps, nxt)
        if read is None:
            return None
        loss_plus, loss_minus = read
        g = float32((loss_plus - loss_minus) / (2.0 * self._eps))
        if update_finite(g, lrs):
            self._end_step(t, g, lrs, wds)
        else:
            self._coef(t, 0.0)
            self.trajectory.record(ABORT_MINUS)
        return loss_plus, loss_minus

    # Public API.

    @torch.no_grad()
    def step(self, closure, examples=1) -> float:
        """One zeroth-order step (see zofast.optim's docstring for the exact sequence).

        Args:
            closure: callable with no arguments that evaluates the loss of ONE batch (the same
                batch both times it is called in a step) and returns it as a Python number or a
                one-element tensor. It is called twice, under torch.no_grad(). With
                ``paired=True`` it is called once, runs the model on the batch stacked twice
                and returns (L+, L−), the losses of the two copies (see zofast.optim.paired).
            examples: with process_group, this rank's weight in the mean of the ranks' losses
                (the number of examples its closure averages); ignored otherwise.

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
        lrs, wds = self._check()
        if self._group is not None:
            examples = check_examples(examples)
        if self.trajectory.params is None:
            self._fingerprint()
        if self._group is not None and not self._group.agreed:
            self._group.check_agreement(self._agreement(lrs, wds))
        if self._paired:
            return self._step_paired(closure, lrs, wds, examples)
        t = self._step_count
        stage = 0
        try:
            with deferred_interrupts():
                self._begin(t)
                stage = 1
            loss_plus = loss_scalar(closure())
            # Left unread where a later read costs nothing: a GPU loss, or one that the graphed
            # passes may take as it is (the queued finish).
            lazy = isinstance(loss_plus, torch.Tensor) and (loss_plus.is_cuda or self._graphed)
            if not lazy and self._group is None:  # (a rank must not stop before the all-reduce)
                loss_plus = loss_value(loss_plus, t, "+")
            with deferred_interrupts():
                self._minus(t)
                stage = 2
            # A GPU L+ is read only now: the −2ε pass and the second forward were queued behind
            # the first without waiting for it (one host sync per evaluation pair, not two).
            loss_minus = loss_scalar(closure())
            with deferred_interrupts():
                read = self._finish_queued(t, loss_plus, loss_minus, lrs, wds)
                if read is not None:
                    stage = 3  # finished, or restored and recorded as an abort
                    loss_plus, loss_minus = read
            loss_plus, loss_minus, g = self._read(t, loss_plus, loss_minus, lrs, examples)
            if stage == 2:
                with deferred_interrupts():
                    self._finish(t, g, lrs, wds)
                    stage = 3
        except BaseException:
            if stage in (1, 2):
                with deferred_interrupts():
                    self._abort(t, stage)
            raise
        return self._returned(loss_plus, loss_minus)

    def _read(self, t, loss_plus, loss_minus, lrs, examples) -> tuple[float, float, float]:
        """(L+, L−, g) as floats: the losses all-reduced with a process group, then read; raises
        FloatingPointError where a loss, g or an update is not finite."""
        if self._group is not None:
            loss_plus, loss_minus = self._group.mean(loss_plus, loss_minus, examples)
        loss_plus = loss_value(loss_plus, t, "+")
        loss_minus = loss_value(loss_minus, t, "−")
        g = float32((loss_plus - loss_minus) / (2.0 * self._eps))
        if not math.isfinite(g):
            raise FloatingPointError(f"g of step {t} is {g}; the weights were restored")
        if not update_finite(g, lrs):
            raise FloatingPointError(
                f"the update −lr·g of step {t} overflows float32 (g = {g}, lr = {max(lrs)}); "
                "the weights were restored"
            )
        return loss_plus, loss_minus, g

    def _returned(self, loss_plus: float, loss_minus: float) -> float:
        """What a step ends with: the usage warning, last_losses and (L+ + L−)/2."""
        if self._shadow is not None:
            self._shadow.warn_unused()
        self.last_losses = (loss_plus, loss_minus)
        return 0.5 * (loss_plus + loss_minus)

    def _agreement(self, lrs, wds) -> dict:
        """What every rank of a process group must agree on (DataParallel.check_agreement)."""
        return {
            "method": self.method,
            "run_seed": self._run_seed,
            "hyperparameters": self._hyperparameters(),
            "groups": [lrs, wds],
            "params": self.trajectory.params,
            "step": self._step_count,
        }

    @property
    def _graphed(self) -> bool:
        """Whether the step's last pass is a CUDA graph (which may take a loss tensor as is)."""
        part = self._shadow if self._shadow is not None else self._inplace
        return part.passes.graphs is not None

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
        if self._pending is None and not self.unflushed:
            return
        with deferred_interrupts():
            if self._pending is not None:
                self._shift(self._pending, -self._eps)
            if self._virtual is not None:
                self._virtual.settle(self.state, self._step_count)
            self.trajectory.record(SETTLE)
            self._pending = None

    @torch.no_grad()
    def detach(self) -> None:
        """Virtual and shadow modes: settle(), then remove the forward hooks from the model.

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
        for part in (self._virtual, self._shadow):
            if part is not None:
                part.detach()

    @property
    def mode(self) -> str:
        """The mode in use: "inplace", "shadow" or "virtual" ("auto" resolved)."""
        return self._mode

    @property
    def rounding(self) -> str:
        """How update passes round to the weights' dtype: "nearest" or "stochastic"."""
        return self._rounding

    @property
    def exact(self) -> bool:
        """Whether the stored weights are written by updates only (never by a perturbation):
        shadow mode, or virtual mode where every trained tensor goes through the layers."""
        return self._mode == "shadow" or (self._mode == "virtual" and not self._inplace.slots)

    @property
    def pending(self) -> bool:
        """Whether the weights now carry a pipelined +ε perturbation (settle() removes it)."""
        return self._pending is not None

    @property
    def unflushed(self) -> bool:
        """mode="virtual": whether updates are pending outside the stored weights (settle()
        writes them); always False in place."""
        return self._virtual is not None and self._virtual.unflushed

    @property
    def virtual_names(self) -> list[str]:
        """mode="virtual": names of the tensors perturbed and updated through their layers (the
        others run in place); [] in place."""
        virtual = self._virtual
        return [] if virtual is None else [s.virtual.name for s in virtual.slots]

    @property
    def steps(self) -> int:
        """Number of completed steps."""
        return self._step_count

    @property
    def run_seed(self) -> int:
        """The seed every perturbation of this run derives from."""
        return self._run_seed

    def replay(self, trajectory: Trajectory) -> None:
        """Re-run the engine calls of `trajectory` (used by zofast.replay)."""
        for kind, g, lrs, wds in trajectory.iter_events():
            t = self._step_count
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
