"""An optimizer's state: torch's state_dict plus zofast's (step, run seed, pending perturbation,
trajectory), so that a resumed run continues bit for bit. A mixin of
zofast.optim.base.ZerothOrder."""

from __future__ import annotations

import torch

from zofast.trajectory import Trajectory


class Checkpoint:
    """state_dict / load_state_dict (see zofast.optim.base)."""

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
            "hyperparameters": self._hyperparameters(),
            "run_seed": str(self._run_seed),
            "step": self._step_count,
            "pending": self._pending,
            "trajectory": self.trajectory.to_dict(),
        }
        if self._shadow is not None and self._shadow.deferred:  # accumulate > 1: not written yet
            sd["zofast"]["deferred"] = [list(d) for d in self._shadow.deferred]
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
        if extra["hyperparameters"] != self._hyperparameters():
            raise ValueError(
                f"state_dict hyperparameters {extra['hyperparameters']} differ from this "
                f"optimizer's {self._hyperparameters()}"
            )
        trajectory = Trajectory.from_dict(extra["trajectory"])
        super().load_state_dict(state_dict)
        flat = [p for _, p in self._flat()]
        for key, value in state_dict["state"].items():
            for name in ("momentum_buffer", "virtual_factor"):
                buffer = value.get(name)
                if buffer is not None:
                    p = flat[key]
                    self.state[p][name] = buffer.to(p.device, torch.float32).clone()
        self._run_seed = int(extra["run_seed"])
        self._noise.reseed(self._run_seed)
        self._step_count = int(extra["step"])
        self._pending = None if extra["pending"] is None else int(extra["pending"])
        self.trajectory = trajectory
        if self._virtual is not None:
            self._virtual.load(self.state)
        if self._shadow is not None:
            self._shadow.deferred = [
                (
                    int(t),
                    [int(d) for d in directions],
                    [[float(x) for x in group] for group in updates],
                    [float(x) for x in decays],
                )
                for t, directions, updates, decays in extra.get("deferred", [])
            ]
