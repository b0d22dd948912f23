"""triton and triton.language, or stand-ins that let the kernel modules import without triton.

Each kernel module holds a Triton kernel beside its pure-torch reference. Triton is optional (a
CPU-only torch does not bring it), and the references must work without it: where triton cannot be
imported, ``triton.jit`` here returns a placeholder that raises an ImportError naming the fix when
a kernel is launched, and ``tl.constexpr`` and friends exist so that kernel signatures still
evaluate. ``backend="auto"`` never picks Triton then (zofast._ext.triton_available); an explicit
``backend="triton"`` is refused before any kernel is reached.

CI runs the core tests with triton and zofast._C hidden (tests/conftest.py, ZOFAST_HIDE_MODULES).
"""

from __future__ import annotations

import contextlib

import torch

MISSING = (
    "zofast's Triton kernels need the triton package (pip install triton); without it use "
    "backend='cpp' or backend='torch'"
)


class _Unavailable:
    """A kernel, or any attribute of triton / triton.language, without triton installed."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, name: str) -> _Unavailable:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Unavailable(f"{self._name}.{name}")

    def __call__(self, *args, **kwargs):
        raise ImportError(f"{MISSING} ({self._name} was called)")

    def __getitem__(self, key):
        raise ImportError(f"{MISSING} ({self._name} was launched)")

    def __repr__(self) -> str:
        return f"<{self._name}: triton is not installed>"


class _TritonStandIn(_Unavailable):
    """``triton`` without triton: ``jit`` gives a placeholder kernel of the function's name."""

    def jit(self, fn=None, **kwargs):
        if fn is None:
            return self.jit
        return _Unavailable(f"triton kernel {fn.__name__}")


try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

if not HAS_TRITON:
    triton = _TritonStandIn("triton")
    tl = _Unavailable("triton.language")

__all__ = ["HAS_TRITON", "MISSING", "cdiv", "next_power_of_2", "tl", "triton"]


# Host-side grid arithmetic in plain Python: triton.cdiv and triton.next_power_of_2 are constexpr
# functions whose host calls cost ~4 µs each (Triton 3.6 on the H200: a fifth of an eager
# lowrank_ call's host time, bench/results/2026-12-03-session8/eager-one-launch-profile.txt).
def cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ of non-negative a and positive b."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two ≥ n, for n ≥ 1."""
    return 1 << (n - 1).bit_length()


def on_device(t: torch.Tensor):
    """Triton launches on torch's current CUDA device, not on its tensors': a context in which
    t's device is current (a null context where it already is, and on the CPU). Tensors of a
    model split over several GPUs (a device map) need it."""
    device = t.device
    if device.type != "cuda" or device.index is None:
        return contextlib.nullcontext()
    if device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)
