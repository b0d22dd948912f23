"""Data parallelism: every rank of a ``torch.distributed`` process group takes the same step.

Each rank evaluates L+ and L− on its own shard of the batch, with the same seeds (the noise is a
pure function of the run seed and the step). One all-reduce per step sums (w·L+, w·L−, w), where
w is the rank's weight in the mean (its number of examples): every rank then holds the same
mean losses, hence the same g, the same update and the same trajectory, and its weights stay
bit-identical to the others'. Nothing else travels: 24 bytes per rank and step (with
``directions=q``: one pair per direction, 16·q + 8 bytes).

With ``split="directions"`` (zofast.optim.directions) the ranks split a step's q directions
instead of the batch: each evaluates its own directions on the whole batch, and one all-gather
gives every rank every direction's losses (16·q bytes per rank and step).

At the first step one more all-reduce compares a fingerprint of what the ranks are about to
train (run seed, method, mode, rounding, hyperparameters, step, trained tensors' names, shapes,
dtypes and sampled values; a shard's values are not compared): ranks that disagree get a
ValueError before any weight is written.

An exception on one rank (a failing closure) is not seen by the others, which then wait in the
step's all-reduce, as with DistributedDataParallel; the failing rank restores its weights.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers

import torch


class DataParallel:
    """The process group of one optimizer (see the module docstring).

    Args:
        group: a ``torch.distributed`` process group, or ``torch.distributed.group.WORLD``;
            torch.distributed must be initialised.
    """

    def __init__(self, group):
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise ValueError(
                "process_group needs torch.distributed initialised first "
                "(torch.distributed.init_process_group, or run under torchrun)"
            )
        if not isinstance(group, dist.ProcessGroup):
            raise ValueError(
                "process_group must be a torch.distributed ProcessGroup, got "
                f"{type(group).__name__}"
            )
        self.group = group
        # NCCL reduces CUDA tensors only; gloo takes CPU tensors.
        self.device = None
        if dist.get_backend(group) == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.agreed = False

    def _all_reduce(self, values: torch.Tensor, op) -> torch.Tensor:
        import torch.distributed as dist

        if self.device is not None:
            values = values.to(self.device)
        dist.all_reduce(values, op=op, group=self.group)
        return values.cpu()

    def check_agreement(self, description: dict) -> None:
        """ValueError (on every rank) unless every rank gives the same `description`."""
        import torch.distributed as dist

        text = json.dumps(description, sort_keys=True, default=str)
        digest = int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "little")
        mine = torch.tensor([digest, -digest], dtype=torch.int64)
        top = self._all_reduce(mine.clone(), dist.ReduceOp.MAX)
        if not torch.equal(top, mine):
            raise ValueError(
                "the ranks of process_group disagree on what they train (run seed, method, "
                "mode, rounding, hyperparameters, step, or the trained tensors' names, shapes, "
                "dtypes and values): build the model and optimizer identically on every rank"
            )
        self.agreed = True

    def mean(self, losses: list[tuple], examples: float) -> list[tuple[float, float]]:
        """The weighted means over the ranks of every (L+, L−) pair in `losses` (one pair per
        direction; one all-reduce), in float64. A non-finite loss on any rank makes its means
        non-finite on every rank."""
        import torch.distributed as dist

        values = [_as_float(x) for pair in losses for x in pair]
        sums = torch.tensor([examples * x for x in values] + [examples], dtype=torch.float64)
        sums = self._all_reduce(sums, dist.ReduceOp.SUM)
        total = float(sums[-1])
        means = [float(x) / total for x in sums[:-1]]
        return list(zip(means[0::2], means[1::2], strict=True))

    @property
    def size(self) -> int:
        """The number of ranks."""
        import torch.distributed as dist

        return dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        """This process's rank in the group."""
        import torch.distributed as dist

        return dist.get_rank(self.group)

    def gather(self, losses: dict[int, tuple], q: int, owner) -> list[tuple[float, float]]:
        """Every direction's (L+, L−), each from the rank that evaluated it (one all-gather of
        q·2 float64 per rank; the values travel as they are, so every rank reads the same bits).

        Args:
            losses: this rank's pairs, by direction k.
            q: the number of directions.
            owner: the rank of direction k, ``owner(k)``.
        """
        import torch.distributed as dist

        mine = torch.zeros(q, 2, dtype=torch.float64)
        for k, pair in losses.items():
            mine[k] = torch.tensor([_as_float(x) for x in pair], dtype=torch.float64)
        if self.device is not None:
            mine = mine.to(self.device)
        parts = [torch.empty_like(mine) for _ in range(self.size)]
        dist.all_gather(parts, mine, group=self.group)
        parts = [part.cpu() for part in parts]
        return [tuple(parts[owner(k)][k].tolist()) for k in range(q)]


def _as_float(x) -> float:
    return float(x.item() if isinstance(x, torch.Tensor) else x)


def check_examples(examples) -> float:
    """A rank's weight in the mean of the losses: a finite number > 0."""
    if isinstance(examples, bool) or not isinstance(examples, numbers.Real):
        raise ValueError(f"examples must be a number > 0, got {examples!r}")
    examples = float(examples)
    if not (math.isfinite(examples) and examples > 0):
        raise ValueError(f"examples must be a finite number > 0, got {examples}")
    return examples
