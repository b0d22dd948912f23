"""Checks shared by the optimizers: hyperparameters, float32 range, interrupts held over a pass."""

from __future__ import annotations

import contextlib
import math
import numbers
import signal
import threading

import torch

FLOAT32_MAX = 3.4028234663852886e38
# The largest |normal| the stream can give: Box-Muller's radius with its uniform clamped at 1e-7
# (zofast.kernels.philox), sqrt(-2 ln 1e-7) = 5.68.
NORMAL_MAX = 5.6777


def is_int(value) -> bool:
    """An integer, not a bool (the test behind every integer hyperparameter, here and in
    zofast.train's configuration)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    """A finite real number, not a bool."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def real(value, name: str) -> float:
    """A finite real number that is also finite in float32 (every pass uses it as one)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    try:
        value = float(value)
    except OverflowError:
        value = math.inf
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if not math.isfinite(float32(value)):
        raise ValueError(f"{name} = {value} overflows float32, in which the passes use it")
    return value


def positive(value, name: str) -> float:
    value = real(value, name)
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if float32(value) == 0.0:
        raise ValueError(f"{name} = {value} underflows to 0 in float32: it would change nothing")
    return value


def non_negative(value, name: str) -> float:
    value = real(value, name)
    if value < 0:
        raise ValueError(f"{name} must be ≥ 0, got {value}")
    if value and float32(value) == 0.0:
        raise ValueError(f"{name} = {value} underflows to 0 in float32: it would change nothing")
    return value


def perturbation_scale(eps, rank: int = 0) -> float:
    """ε (> 0) such that the −2ε pass and every perturbed weight's noise term stay finite in
    float32: 2ε·max|Z| ≤ float32 max, where |Z| ≤ 5.68 for full-rank noise and ≤ r·5.68² for
    low-rank U·Vᵀ (otherwise the perturbation makes inf and restoring it NaN)."""
    eps = positive(eps, "eps")
    largest = NORMAL_MAX * NORMAL_MAX * rank if rank else NORMAL_MAX
    limit = FLOAT32_MAX / (2.0 * largest)
    if eps > limit:
        raise ValueError(
            f"eps = {eps} would overflow float32 in a perturbation (2ε·max|Z| with max|Z| = "
            f"{largest:.4g}{f' at rank {rank}' if rank else ''}); eps must be ≤ {limit:.3g}"
        )
    return eps


def count(value, name: str) -> int:
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be an integer ≥ 1, got {value!r}")
    return int(value)


def float32(x: float) -> float:
    return torch.tensor(x, dtype=torch.float64).to(torch.float32).item()


def update_finite(g: float, lrs: list[float]) -> bool:
    """Whether g and every group's update scale −lr·g are finite float32 numbers."""
    return math.isfinite(g) and all(math.isfinite(float32(-lr * g)) for lr in lrs)


@contextlib.contextmanager
def deferred_interrupts():
    """Hold SIGINT (KeyboardInterrupt) until the block is over, so no pass stops half-way."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(frame))
    except (ValueError, OSError):
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            if callable(previous):
                previous(signal.SIGINT, received[0])
            elif previous != signal.SIG_IGN:
                raise KeyboardInterrupt
