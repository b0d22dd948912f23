"""Checks shared by the optimizers: hyperparameters, float32 range, interrupts held over a pass."""

from __future__ import annotations

import contextlib
import math
import numbers
import signal
import threading

import torch


def real(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def positive(value, name: str) -> float:
    value = real(value, name)
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def non_negative(value, name: str) -> float:
    value = real(value, name)
    if value < 0:
        raise ValueError(f"{name} must be ≥ 0, got {value}")
    return value


def count(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
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
