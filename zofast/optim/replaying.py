"""An optimizer's replay of a trajectory: the engine calls of every recorded event, without a
forward (zofast.replay builds the optimizer and calls it). A mixin of
zofast.optim.base.ZerothOrder; the protocol's steps (_enter, _minus, _finish, _abort) are the
ones step() takes, so a replay writes bit for bit what the run wrote."""

from __future__ import annotations

from zofast.trajectory import ABORT_PLUS, SETTLE, STEP, Trajectory


class Replaying:
    """replay (see zofast.optim.base)."""

    def replay(self, trajectory: Trajectory) -> None:
        """Re-run the engine calls of `trajectory` (used by zofast.replay)."""
        q = self._directions.q
        for kind, g, lrs, wds in trajectory.iter_events():
            t = self._step_count
            if kind == SETTLE:
                self.settle()
            elif kind == STEP:
                self._walk(t, q)
                self._finish(t, [g] if q == 1 else list(g), lrs, wds)
            else:  # an abort at direction k = g
                stage = 1 if kind == ABORT_PLUS else 2
                self._walk(t, g)
                self._enter(t, g, g - 1 if g else None)
                if stage == 2:
                    self._minus(t, g)
                self._abort(t, g, stage)

    def _walk(self, t: int, n: int) -> None:
        """Replay: the passes of evaluating directions 0 .. n − 1 of step t (the weights end at
        −ε·Z of direction n − 1)."""
        for k in range(n):
            self._enter(t, k, k - 1 if k else None)
            self._minus(t, k)
