"""Data parallelism: every rank of a ``torch.distributed`` process group takes the same step.

Each rank evaluates L+ and L− on its own shard of the batch, with the same seeds (the noise is a
pure function of the run seed and the step). One all-reduce per step sums (w·L+, w·L−, w), where
w is the rank's weight in the mean (its number of examples): every rank then holds the same
mean losses, hence the same g, the same update and the same trajectory, and its weights stay
bit-identical to the others'. Nothing else travels: 24 bytes per rank and step.

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

    def mean(self, loss_plus, loss_minus, examples: float) -> tuple[float, float]:
        """The weighted means of L+ and L− over the ranks (one all-reduce), in float64. A
        non-finite loss on any rank makes the means non-finite on every rank."""
        import torch.distributed as dist

        plus, minus = (
            float(x.item() if isinstance(x, torch.Tensor) else x) for x in (loss_plus, loss_minus)
        )
        sums = torch.tensor([examples * plus, examples * minus, examples], dtype=torch.float64)
        sums = self._all_reduce(sums, dist.ReduceOp.SUM)
        total = float(sums[2])
        return float(sums[0]) / total, float(sums[1]) / total


def check_examples(examples) -> float:
    """A rank's weight in the mean of the losses: a finite number > 0."""
    if isinstance(examples, bool) or not isinstance(examples, numbers.Real):
        raise ValueError(f"examples must be a number > 0, got {examples!r}")
    examples = float(examples)
    if not (math.isfinite(examples) and examples > 0):
        raise ValueError(f"examples must be a finite number > 0, got {examples}")
    return examples
