"""``zofast train`` under torchrun: data parallelism on torch.distributed, one run's files.

Every process holds the whole model and the same data order; each takes its slice of every
batch, and the optimizer all-reduces the two losses (``process_group=``, zofast.optim.group), so
every process takes the same steps and ends with the same weights. With ``split="directions"``
each process evaluates its own directions of every step on the whole batch instead, and the
optimizer all-gathers the losses (zofast.optim.directions). Rank 0 writes the run's
files (log, checkpoints, trajectory, result); the other ranks write theirs into a temporary
folder that is removed at the end, and no checkpoints. Under torchrun zofast starts the process
group itself (gloo on CPUs, NCCL on GPUs, one GPU per process by LOCAL_RANK).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from zofast.train.config import ZO_METHODS, ConfigError, TrainConfig


@dataclass
class Ranks:
    """This process's place: rank, world size and the process group (None when alone)."""

    rank: int = 0
    world: int = 1
    group: object = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, batch: list) -> list:
        """This rank's contiguous slice of a batch (every rank gets at least one example)."""
        n = len(batch)
        return batch[self.rank * n // self.world : (self.rank + 1) * n // self.world]


def from_environment(config: TrainConfig) -> Ranks:
    """The Ranks torchrun's environment describes (WORLD_SIZE, RANK, LOCAL_RANK); starts the
    process group. ConfigError for a method or batch that cannot be split."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    if config.method not in ZO_METHODS:
        raise ConfigError(
            f"torchrun runs data-parallel {', '.join(ZO_METHODS)}; --method {config.method} "
            "runs in one process"
        )
    if config.device_map is not None:
        raise ConfigError(
            "under torchrun every process holds the whole model on its own GPU: drop "
            "--device-map (it splits one model over this process's devices)"
        )
    if config.offload:
        raise ConfigError(
            "offload runs in one process: under torchrun every process would stream the whole "
            "model over its host's link (untested); drop --offload or torchrun"
        )
    if config.split == "batch" and config.batch_size < world:
        raise ConfigError(
            f"batch_size {config.batch_size} is smaller than the {world} processes: every "
            "process needs an example of each batch"
        )
    if config.split == "directions" and config.directions < world:
        raise ConfigError(
            f"directions {config.directions} is fewer than the {world} processes: with split "
            "'directions' every process evaluates at least one"
        )
    import torch
    import torch.distributed as dist

    cuda = config.device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Ranks(dist.get_rank(), world, dist.group.WORLD)


def worker_config(config: TrainConfig, folder: str) -> TrainConfig:
    """What a rank other than 0 runs: the same run, its files in `folder`, no checkpoints."""
    return dataclasses.replace(
        config, output_dir=folder, checkpoint_every=0, plot=False, save_model=False
    )
