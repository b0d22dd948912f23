"""The closure's losses: checked without a host sync where possible, read into floats, and
turned into a direction's estimate g = (L+ − L−)/(2ε). Used by zofast.optim.base's step."""

from __future__ import annotations

import math
import numbers

import torch

from zofast.optim.checks import float32, update_finite


def loss_scalar(loss):
    """Check a closure result without reading it: a one-element real tensor (returned as it is,
    so a GPU loss is not synchronised yet) or a Python real (returned as a float)."""
    if isinstance(loss, torch.Tensor):
        if loss.requires_grad:
            raise ValueError(
                "closure returned a tensor that requires grad: the closure must run under "
                "torch.no_grad() (step() calls it under no_grad; do not re-enable grad inside)"
            )
        if loss.numel() != 1:
            raise ValueError(
                f"closure must return a scalar loss, got a tensor of shape {tuple(loss.shape)}"
            )
        if loss.is_complex() or loss.dtype == torch.bool:
            raise ValueError(f"closure must return a real loss, got dtype {loss.dtype}")
        return loss
    if isinstance(loss, numbers.Real) and not isinstance(loss, bool):
        return float(loss)
    kind = type(loss).__name__
    raise ValueError(f"closure must return a Python number or a one-element tensor, got {kind}")


def loss_value(loss, where: str, which: str) -> float:
    """The float of a checked closure result; FloatingPointError if it is not finite."""
    value = float(loss.item()) if isinstance(loss, torch.Tensor) else loss
    if not math.isfinite(value):
        raise FloatingPointError(
            f"the loss at the {which}ε perturbation of {where} is {value}; the weights were "
            "restored"
        )
    return value


def loss_pair(result) -> tuple:
    """Check a paired closure's result without reading it: (L+, L−) from a two-element tensor
    (two one-element views; a GPU one is not synchronised) or a pair of closure results (each
    as :func:`loss_scalar`)."""
    if isinstance(result, torch.Tensor) and result.numel() == 2:
        flat = result.reshape(-1)
        return loss_scalar(flat[0]), loss_scalar(flat[1])
    if isinstance(result, (tuple, list)) and len(result) == 2:
        return loss_scalar(result[0]), loss_scalar(result[1])
    shape = tuple(result.shape) if isinstance(result, torch.Tensor) else None
    got = f"a tensor of shape {shape}" if shape is not None else type(result).__name__
    raise ValueError(
        "a paired step's closure returns (L+, L−), the losses of the first and the second copy "
        f"of the batch stacked twice, as a two-element tensor or a pair of numbers; got {got} "
        "(zofast.paired.losses(model, inputs) makes them for a transformers model)"
    )


def estimate(loss_plus, loss_minus, eps: float, q: int, lrs, where: str) -> tuple[float, ...]:
    """(g, L+, L−) of one direction of `where` from its (combined) losses; FloatingPointError
    where a loss, g or an update scale −lr·g/q is not finite."""
    loss_plus = loss_value(loss_plus, where, "+")
    loss_minus = loss_value(loss_minus, where, "−")
    g = float32((loss_plus - loss_minus) / (2.0 * eps))
    if not math.isfinite(g):
        raise FloatingPointError(f"g of {where} is {g}; the weights were restored")
    if not update_finite(g / q, lrs):
        raise FloatingPointError(
            f"the update −lr·g of {where} overflows float32 (g = {g}, lr = {max(lrs)}); "
            "the weights were restored"
        )
    return g, loss_plus, loss_minus


def mean(values: list[float]) -> float:
    return values[0] if len(values) == 1 else math.fsum(values) / len(values)
