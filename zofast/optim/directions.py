"""Several directions per step (``directions=q``) and how a process group shares them out.

Step t evaluates q directions k = 0 .. q − 1, each a pair of forwards at W ± ε·Z on the same
batch. Direction k has the direction index d = t·q + k, which selects its seeds (roles "u" and
"full", zofast.optim.noise; q = 1 gives d = t, the seeds of a run without this option); the q
directions of a LOZO step share the step's V (epoch t // nu) and differ in U. Each gives
g_k = (L+_k − L−_k)/(2ε), rounded to float32 and recorded; the update is the average of the q
estimates, (1/q)·Σ_k g_k·Z_(d_k), applied in the step's one update pass with the scales
−lr·g_k/q (the parts receive c_k = g_k/q; LOZO-M's momentum takes the averaged estimate,
virtual mode adds −lr·Σ_k c_k·U_k to A). Stochastic rounding and weight decay stay one per step.

On one process the directions run one after another (in place, one pass moves the weights from
−ε·Z_(d_k) to +ε·Z_(d_(k+1))). Under ``process_group`` (zofast.optim.group):

* ``split="batch"`` (default): data parallelism; every rank evaluates all q directions on its
  shard of the batch, and one all-reduce averages the 2q losses;
* ``split="directions"``: every rank evaluates its directions, k with k % world_size == rank,
  on the whole batch, and one all-gather gives every rank all q pairs of losses; every rank then
  applies all q terms from the seeds alone. The weights must not be written by perturbations
  (the ranks evaluate different directions, so in-place roundings would differ): an exact mode
  is needed (``mode="shadow"``, or ``"virtual"`` with every tensor through its layers or
  ``virtual_rest="shadow"``), and q ≥ world size (every rank has a direction).

Failures: an exception in any of the 2q evaluations aborts the step at the direction under way
(in place: its perturbation is undone as a one-direction step's would be; exact modes write
nothing, so the weights stay bit-identical); the trajectory records the abort with k, and
replay repeats the passes of directions 0 .. k − 1 before it.
"""

from __future__ import annotations

from zofast.optim.checks import count

SPLITS = ("batch", "directions")


class Directions:
    """The directions of a step and which of them this process evaluates.

    Args:
        q: directions per step (an integer ≥ 1).
        split: "batch" or "directions" (see the module docstring).
        group: the optimizer's zofast.optim.group.DataParallel, or None.

    Example:
        >>> Directions(4, "batch", None).mine
        [0, 1, 2, 3]
    """

    def __init__(self, q, split: str, group):
        self.q = count(q, "directions")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if split == "directions":
            if group is None:
                raise ValueError(
                    "split='directions' shares a step's directions among the ranks of a "
                    "process_group: pass process_group=..."
                )
            if self.q < group.size:
                raise ValueError(
                    f"split='directions' needs directions ≥ the process group's size "
                    f"({group.size}), got {self.q}: every rank evaluates at least one"
                )
        self.split, self.group = split, group

    @property
    def shared(self) -> bool:
        """Whether the ranks share the directions out (split="directions")."""
        return self.split == "directions"

    @property
    def mine(self) -> list[int]:
        """The directions k this process evaluates, in order."""
        if not self.shared:
            return list(range(self.q))
        rank, size = self.group.rank, self.group.size
        return [k for k in range(self.q) if k % size == rank]

    def owner(self, k: int) -> int:
        """The rank that evaluates direction k (split="directions")."""
        return k % self.group.size

    def combine(self, losses: dict[int, tuple], examples: float) -> list[tuple]:
        """Every direction's (L+, L−), in direction order: this process's own (one process),
        their weighted means over the ranks (split="batch", one all-reduce), or each from the
        rank that evaluated it (split="directions", one all-gather)."""
        if self.group is None:
            return [losses[k] for k in range(self.q)]
        if self.shared:
            return self.group.gather(losses, self.q, self.owner)
        return self.group.mean([losses[k] for k in range(self.q)], examples)

    def recorded(self, k: int) -> int:
        """The direction an abort at direction k is recorded with: k, or under
        split="directions" q − 1 on every rank (the ranks stop at different directions, and
        exact modes write nothing on an abort, so k changes no replayed pass)."""
        return self.q - 1 if self.shared else k
