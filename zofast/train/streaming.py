"""``zofast train --offload``: the model's repeated blocks stream from host memory to the GPU
(:func:`zofast.offload.stream`) for the whole run, evaluations and saved files included.

The model is loaded on the host; :func:`streaming` keeps its blocks' weights there (pinned) and
moves the rest to the GPU before the optimizer is made, so the optimizer trains the host tensors.
Between two forwards every block parameter holds its host tensor, and the host tensor is always
current (``update="gpu"`` writes its passes back before they return), so the best snapshot,
checkpoints, resume and ``save_model`` read and write the host copy like any other tensor. At the
end the hooks come off and the pinned buffer is unregistered; the blocks stay on the host.
"""

from __future__ import annotations

import contextlib

import torch

from zofast.models import LoadedModel, resolve_device
from zofast.train.config import ConfigError, TrainConfig

#: The device types blocks stream to. CPU tests add "cpu": the CPU then stands in for the GPU and
#: every swap and copy still runs (as in tests/test_offload.py).
STREAM_TO = ("cuda",)


def target(config: TrainConfig) -> torch.device:
    """The device an offloaded run streams to: ``config.device`` ("auto": CUDA), a GPU.

    Raises:
        ConfigError: no such device here, or not a GPU.
    """
    try:
        device = resolve_device(config.device)
    except ValueError as error:
        raise ConfigError(f"offload: {error}") from None
    if device.type not in STREAM_TO:
        raise ConfigError(
            f"offload streams the blocks to a GPU, and the device is {device} (torch sees no "
            "CUDA device, or device says cpu): drop offload to train on the CPU"
        )
    return device


@contextlib.contextmanager
def streaming(config: TrainConfig, loaded: LoadedModel):
    """Stream ``loaded.model``'s blocks to :func:`target` within the block (nothing without
    ``config.offload``); the hooks come off at its end, however it ends.

    Yields:
        The :class:`zofast.offload.Streamed` handle, or None.

    Raises:
        ConfigError: no GPU, no repeated blocks, or a block weight tied to one outside the
            blocks; raised before any weight is moved.
    """
    if not config.offload:
        yield None
        return
    from zofast.offload import stream

    device = target(config)
    try:
        handle = stream(
            loaded.model, device, prefetch=config.prefetch, update=config.offload_update
        )
    except ValueError as error:
        raise ConfigError(f"cannot offload {loaded.name}: {error}") from None
    try:
        yield handle
    finally:
        handle.remove()
