"""Streamed offload's host memory: every block parameter in one host buffer, page-locked in place
with ``cudaHostRegister``. A ``pin_memory()`` copy per tensor goes through torch's caching host
allocator, which rounds each size up to a power of two (up to twice the weights' bytes of host
memory, on a model that fills the host); one registered buffer costs the weights' bytes.

Parameters that are already views of one host storage (a model built into one buffer, as
bench/probes/offload.py does) are registered where they are, never copied.
"""

from __future__ import annotations

import torch

ALIGN = 256  # bytes: where every packed tensor starts (the copy engines' preferred alignment)


def cuda_register(ptr: int, size: int) -> None:
    """Page-lock `size` bytes of host memory at `ptr` (cudaHostRegister, default flags)."""
    if not torch.cuda.is_available():
        raise RuntimeError("pinning host memory needs CUDA; pass pin=False on a CPU-only machine")
    torch.cuda.check_error(torch.cuda.cudart().cudaHostRegister(ptr, size, 0))


def cuda_unregister(ptr: int) -> None:
    torch.cuda.check_error(torch.cuda.cudart().cudaHostUnregister(ptr))


class HostBuffer:
    """The block parameters' host memory, registered as pinned.

    Args:
        params: the parameters (moved in place: each ``.data`` becomes a view of the buffer,
            unless all of them already are views of one host storage).
        register, unregister: the page-locking calls; None: :func:`cuda_register` /
            :func:`cuda_unregister` (looked up at the call: CPU tests put fakes there).

    Attributes:
        ptr, nbytes: the registered range (None while unregistered).
        packed: whether the parameters were copied into a new buffer.
    """

    def __init__(self, params: list, register=None, unregister=None):
        self._unregister = unregister or cuda_unregister
        storages = {p.data.untyped_storage().data_ptr() for p in params}
        self.packed = len(storages) != 1 or any(p.device.type != "cpu" for p in params)
        if self.packed:
            self._pack(params)
        storage = params[0].data.untyped_storage()
        self.ptr, self.nbytes = storage.data_ptr(), storage.nbytes()
        (register or cuda_register)(self.ptr, self.nbytes)

    @staticmethod
    def _pack(params: list) -> None:
        offsets, total = [], 0
        for p in params:
            offsets.append(total)
            total += -(-p.numel() * p.element_size() // ALIGN) * ALIGN
        buffer = torch.empty(total, dtype=torch.uint8)
        with torch.no_grad():
            for p, start in zip(params, offsets, strict=True):
                size = p.numel() * p.element_size()
                view = buffer[start : start + size].view(p.dtype).view(p.shape)
                view.copy_(p.data)
                p.data = view  # the old tensor is freed here: peak host memory ≈ one model

    def release(self) -> None:
        """Unregister the buffer (the parameters stay in it, pageable). Idempotent."""
        if self.ptr is not None:
            self._unregister(self.ptr)
            self.ptr = self.nbytes = None
