"""What an optimizer says about its run: the resolved mode and rounding, its progress, and the
hyperparameters that its trajectory records and the ranks of a process group agree on. A mixin
of zofast.optim.base.ZerothOrder."""

from __future__ import annotations

from zofast.trajectory import Trajectory


class Properties:
    """Read-only properties and the recorded hyperparameters (see zofast.optim.base)."""

    def _hyperparameters(self) -> dict:
        """What replay needs besides the seeds and the g's (methods add theirs)."""
        hyper = {
            "eps": self._eps,
            "mode": self._mode,
            "rounding": self._rounding,
            "pipeline": self._pipeline,
        }
        if self._accumulate > 1:  # (absent: 1, as in runs recorded before it existed)
            hyper["accumulate"] = self._accumulate
        if self._directions.q > 1:  # absent for one direction: the records of earlier versions
            hyper["directions"] = self._directions.q
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

    def _agreement(self, lrs, wds) -> dict:
        """What every rank of a process group must agree on (DataParallel.check_agreement)."""
        return {
            "method": self.method,
            "run_seed": self._run_seed,
            "hyperparameters": self._hyperparameters(),
            "directions": [self._directions.q, self._directions.split],
            "groups": [lrs, wds],
            "params": self.trajectory.params,
            "step": self._step_count,
        }

    @property
    def mode(self) -> str:
        """The mode in use: "inplace", "shadow" or "virtual" ("auto" resolved)."""
        return self._mode

    @property
    def paired(self) -> bool:
        """Whether a step evaluates each direction's (L+, L−) in one forward over the batch
        stacked twice (zofast.optim.paired)."""
        return self._paired

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
        """Whether updates are pending outside the stored weights (settle() writes them):
        mode="virtual"'s factors, or the steps that accumulate > 1 has not written yet; always
        False in place."""
        deferred = self._shadow is not None and bool(self._shadow.deferred)
        return deferred or (self._virtual is not None and self._virtual.unflushed)

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
