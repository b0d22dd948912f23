"""The zeroth-order step protocol, over parts that each apply the perturbation their own way.

``step(closure)``: validate (nothing written yet) → for each direction k of the step: enter
(+ε) → L+ → minus (−ε) → L− → then the losses of every direction (combined over a process group)
→ g_k = (L+_k − L−_k)/(2ε) → finish (restore, update); any failure after the first write → abort
(undo the perturbation of the direction under way) and re-raise. With one direction per step
(the default) that is perturb → L+ → minus → L− → g → finish. A paired step
(zofast.optim.paired) evaluates each direction's (L+, L−) in one forward after enter, with no
minus. The parts:

* :class:`zofast.optim.inplace.InPlace`: tensors that carry the perturbation (engine passes);
* :class:`zofast.optim.virtual.Virtual`: LOZO's matrices applied through their layers' hooks;
* :class:`zofast.optim.shadow.Shadow`: exact mode, perturbed temporaries and layer hooks;
* :class:`zofast.optim.momentum.Momentum`: LOZO-M's buffers, computed before any write;
* :class:`zofast.optim.noise.NoisePlan`: which seeds every tensor gets at every step;
* :class:`zofast.optim.directions.Directions`: the q directions of a step (``directions=q``) and
  which of them this process evaluates.

Around the protocol, each in its own mixin: building the parts and the checks before a step
(zofast.optim.setup), state_dict / load_state_dict (zofast.optim.state), the read-only
properties and recorded hyperparameters (zofast.optim.properties), settle / detach
(zofast.optim.settle) and replay (zofast.optim.replaying); checking the closure's losses and
turning them into g (zofast.optim.losses).

The methods (zofast.optim.methods) only add their hyperparameters.
"""

from __future__ import annotations

import torch

from zofast.optim.checks import deferred_interrupts, float32, update_finite
from zofast.optim.directions import Directions
from zofast.optim.group import DataParallel, check_examples
from zofast.optim.losses import estimate, loss_pair, loss_scalar, loss_value, mean
from zofast.optim.modes import LOW_PRECISION, check_modes, resolve, resolve_accumulate
from zofast.optim.properties import Properties
from zofast.optim.replaying import Replaying
from zofast.optim.settle import Settling
from zofast.optim.setup import Setup
from zofast.optim.shadow import Shadow
from zofast.optim.sharding import check_shards, fsdp_modules
from zofast.optim.state import Checkpoint
from zofast.optim.virtual import Virtual
from zofast.rng import as_seed
from zofast.trajectory import ABORT_MINUS, ABORT_PLUS


class ZerothOrder(Setup, Checkpoint, Properties, Settling, Replaying, torch.optim.Optimizer):
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
        accumulate="auto",
        directions=1,
        split="batch",
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
        # FSDP2 resharded first: the parameters taken are the shards (zofast.optim.sharding)
        self._fsdp = fsdp_modules(params if isinstance(params, torch.nn.Module) else model)
        if isinstance(params, torch.nn.Module):
            model = params if model is None else model
            params = list(params.named_parameters())
        check_modes(mode, rounding, lowrank, virtual_indices, virtual_rest, paired)
        self._paired = paired
        self._group = None if process_group is None else DataParallel(process_group)
        self._directions = Directions(directions, split, self._group)
        self._ready = False
        self._lowrank = lowrank
        self._virtual_request = None if virtual_indices is None else list(virtual_indices)
        self._virtual: Virtual | None = None
        self._shadow: Shadow | None = None
        super().__init__(params, defaults)
        trained = [p for group in self.param_groups for p in group["params"] if p.requires_grad]
        check_shards(trained, mode, self._fsdp)
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
        self._accumulate = resolve_accumulate(
            accumulate,
            shadow=self._mode == "shadow" or self._rest == "shadow",
            low=any(p.dtype in LOW_PRECISION for p in trained),
            momentum=bool(defaults.get("momentum")),
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

    # The protocol. Every write to the weights happens in the parts, called from here.

    def _index(self, t: int, k: int) -> int:
        """The direction index of direction k of step t (zofast.optim.noise)."""
        return t * self._directions.q + k

    def _shift(self, d: int, scale: float) -> None:
        self._inplace.shift(d, scale, len(self.param_groups))

    def _coef(self, d: int, c: float) -> None:
        """Virtual and shadow tensors: the forwards see W + c·Z_d (nothing is written)."""
        for part in (self._virtual, self._shadow):
            if part is not None:
                part.coef(d, c)

    def _enter(self, t: int, k: int, previous: int | None) -> None:
        """To +ε·Z of direction k of step t: from the stored weights (previous None; pipelined,
        they may already carry it) or from −ε·Z of direction `previous` of the same step."""
        d = self._index(t, k)
        if previous is not None:
            self._inplace.move(self._index(t, previous), d, self._eps, len(self.param_groups))
        elif self._pending is None:
            self._shift(d, self._eps)
        elif self._pending != t or k:
            raise RuntimeError(f"internal error: pending step {self._pending}, stepping {t}")
        self._pending = None
        self._coef(d, self._eps)

    def _minus(self, t: int, k: int) -> None:
        """From +ε to −ε."""
        d = self._index(t, k)
        self._shift(d, -2.0 * self._eps)
        self._coef(d, -self._eps)

    def _abort(self, t: int, k: int, stage: int) -> None:
        d = self._index(t, k)
        self._coef(d, 0.0)  # virtual tensors: nothing was written
        scale = -self._eps if stage == 1 else self._eps
        self._inplace.restore(d, scale, len(self.param_groups), t)
        kind = ABORT_PLUS if stage == 1 else ABORT_MINUS
        self.trajectory.record(kind, self._directions.recorded(k))
        self._pending = None

    def _finish(self, t: int, gs: list[float], lrs: list[float], wds: list[float]) -> None:
        """Restore and update (pipelined: perturb for step t + 1): new state first, then writes.
        gs: the g of every direction; the parts take g_k / q."""
        q = self._directions.q
        cs = [g / q for g in gs]
        nxt = self._index(t + 1, 0) if self._pipeline else None
        buffers, used = {}, {}
        if self._momentum is not None:  # all state first: a failure leaves the weights untouched
            flat = None if self._virtual is None else self._virtual.flat_step(t)
            buffers, used = self._momentum.buffers(self._slots, self.state, t, cs, flat)
        pending = []
        if self._virtual is not None:
            self._virtual.check_decay(wds)
            pending = self._virtual.updates(t, cs, lrs, buffers, used)
        self._inplace.finish(t, cs, lrs, wds, self._eps, nxt, self._momentum, buffers, used)
        if self._shadow is not None:
            self._shadow.finish(t, cs, lrs, wds, self._momentum, buffers, used)
        if self._virtual is not None:
            self._virtual.commit(pending, self.state, t)
        for slot in self._slots:
            if slot.index in buffers:
                self.state[slot.param]["momentum_buffer"] = buffers[slot.index]
        self._end_step(t, gs, lrs, wds)

    def _end_step(self, t: int, gs: list[float], lrs: list[float], wds: list[float]) -> None:
        self._coef(self._index(t, 0), 0.0)  # between steps the forwards see the stored weights
        self.trajectory.record_step(gs[0] if len(gs) == 1 else gs, lrs, wds)
        self._step_count = t + 1
        self._pending = t + 1 if self._pipeline else None

    def _finish_queued(self, t: int, loss_plus, loss_minus, lrs, wds):
        """The queued finish of the in-place or the shadow part where it applies (one direction,
        no momentum, virtual tensors or weight decay; see Passes.queued); None otherwise.
        Records the step, or an abort when g or an update is not finite."""
        if self._momentum is not None or self._virtual is not None or any(wds):
            return None
        if self._group is not None or self._directions.q != 1:  # (the losses are combined first)
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
            self._end_step(t, [g], lrs, wds)
        else:
            self._coef(t, 0.0)
            self.trajectory.record(ABORT_MINUS)
        return loss_plus, loss_minus

    def _read_now(self, loss) -> bool:
        """Whether to read a loss as soon as the closure returns it. Left unread where a later
        read costs nothing (a GPU loss, or one the graphed passes may take as it is: the queued
        finish), and under a process group (a rank must not stop before the collective)."""
        if self._group is not None:
            return False
        return not (isinstance(loss, torch.Tensor) and (loss.is_cuda or self._graphed))

    # Public API.

    @torch.no_grad()
    def step(self, closure, examples=1) -> float:
        """One zeroth-order step (see zofast.optim's docstring for the exact sequence).

        Args:
            closure: callable with no arguments that evaluates the loss of ONE batch (the same
                batch every time it is called in a step) and returns it as a Python number or a
                one-element tensor. It is called twice per direction this process evaluates
                (twice with the default directions=1), under torch.no_grad(). With
                ``paired=True`` it is called once per direction, runs the model on the batch
                stacked twice and returns (L+, L−), the two copies' losses (zofast.optim.paired).
            examples: with process_group and split="batch", this rank's weight in the mean of
                the ranks' losses (the number of examples its closure averages); ignored
                otherwise.

        Returns:
            (L+ + L−)/2, a Python float: the loss at the unperturbed weights up to O(ε²) (with
            several directions, its mean over them).

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
        t = self._step_count
        losses = {}
        at, stage = None, 0  # the direction the weights carry, at +ε (stage 1) or −ε (stage 2)
        try:
            for k in self._directions.mine:
                with deferred_interrupts():
                    self._enter(t, k, at)
                    at, stage = k, 1
                if self._paired:  # one forward: the first copy at +ε, the second at −ε
                    self._rows.reset()
                    loss_plus, loss_minus = loss_pair(closure())
                    stage = 2  # (both evaluated; nothing to undo in an exact mode)
                    losses[k] = (loss_plus, loss_minus)
                    continue
                loss_plus = loss_scalar(closure())
                if self._read_now(loss_plus):
                    loss_plus = loss_value(loss_plus, self._where(t, k), "+")
                with deferred_interrupts():
                    self._minus(t, k)
                    stage = 2
                # A GPU L+ is read only now: the −2ε pass and the second forward were queued
                # behind the first without waiting for it (one host sync per step at most).
                loss_minus = loss_scalar(closure())
                if self._read_now(loss_minus) and self._directions.q > 1:
                    loss_minus = loss_value(loss_minus, self._where(t, k), "−")
                losses[k] = (loss_plus, loss_minus)
            if self._directions.q == 1:
                with deferred_interrupts():
                    read = self._finish_queued(t, *losses[0], lrs, wds)
                    if read is not None:
                        stage = 3  # finished, or restored and recorded as an abort
                        losses[0] = read
            pairs = self._directions.combine(losses, examples)
            estimates = [
                estimate(*pair, self._eps, self._directions.q, lrs, self._where(t, k))
                for k, pair in enumerate(pairs)
            ]
            gs = [g for g, _, _ in estimates]
            if stage == 2:
                with deferred_interrupts():
                    self._finish(t, gs, lrs, wds)
                    stage = 3
        except BaseException:
            if stage in (1, 2):
                with deferred_interrupts():
                    self._abort(t, at, stage)
            raise
        if self._shadow is not None:
            self._shadow.warn_unused()
        self.last_losses = tuple(mean([e[i] for e in estimates]) for i in (1, 2))
        return 0.5 * (self.last_losses[0] + self.last_losses[1])

    def _where(self, t: int, k: int) -> str:
        return f"step {t}" if self._directions.q == 1 else f"step {t}, direction {k}"

    @property
    def _graphed(self) -> bool:
        """Whether the step's last pass is a CUDA graph (which may take a loss tensor as is)."""
        part = self._shadow if self._shadow is not None else self._inplace
        return part.passes.graphs is not None
