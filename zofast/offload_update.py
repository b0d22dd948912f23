"""Streamed offload's ``update="gpu"``: the optimizer's writes to the block weights run on the GPU.

Every in-place engine pass (``gaussian_``, ``lowrank_``, ``outer_add_``) over a block's host
tensor is handed to :class:`DeviceWrites` (zofast.perturb's redirect registry): the tensor is
uploaded, the same pass runs on the device copy, and the result is copied back into the host
tensor before the call returns, so the host copy is never stale for anything that reads it (an
upload, a preset copy, a checkpoint).

The numbers are the GPU engine's: the stochastic rounding's words are the same on every backend,
the normals' float32 bits are not (Box-Muller through libdevice on the GPU, libm on the host), so
a weight may end one ulp away from where the host engine would put it, where its float32 value
straddles a rounding boundary (tests/test_offload.py). The forwards' perturbations on the GPU
copies use the GPU's normals too: with update="gpu" a step's Z is one set of numbers.

Each write waits for its copy back (one synchronisation per tensor and pass): the cost is the
tensor's bytes both ways over the host link, against the host engine's pass over them.
"""

from __future__ import annotations

import torch

from zofast import perturb


class DeviceWrites:
    """Runs the engine writes to registered host tensors on `device`, then writes them back.

    Args:
        device: where the passes run.
        backend: the engine backend there ("auto": Triton on a GPU; "triton" on a CPU stand-in
            runs the GPU kernels in Triton's interpreter).

    Attributes:
        writes: passes run so far; bytes: bytes moved (both ways).
    """

    def __init__(self, device: torch.device, backend: str = "auto"):
        self.device, self.backend = device, backend
        self.writes = self.bytes = 0
        self._ptrs: list[int] = []

    def register(self, tensors) -> None:
        """Hand the engine writes to `tensors` (host tensors) to this object."""
        for t in tensors:
            perturb._WRITES_ELSEWHERE[t.data_ptr()] = self
            self._ptrs.append(t.data_ptr())

    def release(self) -> None:
        """Give the writes back to the host engine. Idempotent."""
        for ptr in self._ptrs:
            perturb._WRITES_ELSEWHERE.pop(ptr, None)
        self._ptrs = []

    def _moved(self, value, home: torch.device):
        if isinstance(value, torch.Tensor) and value.device == home:
            return value.to(self.device, non_blocking=True)
        if isinstance(value, (list, tuple)):
            return type(value)(self._moved(v, home) for v in value)
        return value

    @torch.no_grad()
    def __call__(self, fn, w: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        copy = torch.empty_like(w, device=self.device).copy_(w, non_blocking=True)
        args = tuple(self._moved(a, w.device) for a in args)
        kwargs = {k: self._moved(v, w.device) for k, v in kwargs.items() if k != "out"}
        fn(copy, *args, **{**kwargs, "backend": self.backend})
        w.copy_(copy)  # synchronous: the host tensor is current when the call returns
        self.writes += 1
        self.bytes += 2 * w.numel() * w.element_size()
        return w
