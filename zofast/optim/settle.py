"""settle() and detach(): making the stored weights the current iterate (a pipelined
perturbation removed, pending virtual or accumulated updates written) and leaving the model a
plain model. A mixin of zofast.optim.base.ZerothOrder."""

from __future__ import annotations

import torch

from zofast.optim.checks import deferred_interrupts
from zofast.trajectory import SETTLE


class Settling:
    """settle / detach (see zofast.optim.base)."""

    @torch.no_grad()
    def settle(self) -> None:
        """Make the stored weights the current iterate (idempotent; nothing to do: no-op).

        * ``pipeline=True``: removes the next step's +ε perturbation, which the in-place weights
          carry between steps (one pass).
        * ``mode="virtual"``: writes the pending low-rank updates into the virtual weights,
          W += A·V_Aᵀ, one fused pass per tensor, and A = 0. Between steps the layers already
          compute with W + A·V_Aᵀ, so evaluation needs no settle; saving or exporting
          ``model.state_dict()``, copying the model or reading ``.weight`` does.
        * ``accumulate`` > 1 (bf16 / fp16 shadow tensors by default): writes the steps not
          yet written, in one pass. Between writes the forwards see the last written weights.

        Call it before evaluating (pipelined, accumulating) or saving / exporting the model.
        It is recorded in the trajectory, so replay repeats it.

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
                self._shift(self._index(self._pending, 0), -self._eps)
            if self._virtual is not None:
                self._virtual.settle(self.state, self._step_count)
            if self._shadow is not None:
                self._shadow.write()
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
