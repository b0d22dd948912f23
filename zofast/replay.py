"""Rebuild fine-tuned weights from the base weights and a trajectory (see zofast.trajectory)."""

from __future__ import annotations

import warnings

import torch

from zofast.device_map import device_types
from zofast.optim import METHODS
from zofast.trajectory import Trajectory

__all__ = ["replay"]


def _resolve_params(model_or_params, entries: list[dict]) -> list[torch.Tensor]:
    """The tensors of `model_or_params` in the order the run's optimizer had them."""
    names = [e["name"] for e in entries]
    by_name = all(n is not None for n in names)
    if isinstance(model_or_params, torch.nn.Module):
        if by_name:
            named = dict(model_or_params.named_parameters())
            missing = [n for n in names if n not in named]
            if missing:
                raise ValueError(f"the model has no parameters named {missing[:5]}")
            return [named[n] for n in names]
        return list(model_or_params.parameters())
    if isinstance(model_or_params, torch.Tensor):
        raise TypeError("pass a module or a list of tensors, not a single tensor")
    items = []
    for item in model_or_params:
        if isinstance(item, dict):
            items.extend(item["params"])
        else:
            items.append(item)
    pairs = [isinstance(item, tuple) for item in items]
    if any(pairs) and not all(pairs):
        raise ValueError("pass either tensors or (name, tensor) pairs, not a mix")
    if items and all(pairs):
        if by_name:
            named = dict(items)
            missing = [n for n in names if n not in named]
            if missing:
                raise ValueError(f"no parameters named {missing[:5]} were given")
            return [named[n] for n in names]
        items = [t for _, t in items]
    for t in items:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"expected tensors, got {type(t).__name__}")
    return items


@torch.no_grad()
def replay(model_or_params, trajectory, *, settle: bool = True):
    """Rebuild fine-tuned weights from the base weights and a trajectory, in place.

    Re-runs exactly the engine calls of training (perturbations, restores, updates, weight decay,
    momentum), with the recorded g's instead of forward passes. Given the base weights on the same
    device type and dtype as training, the result is bit-identical to the trained weights (after
    ``opt.settle()`` for pipelined runs). On another device type the noise differs in the last bits
    of the normals (see zofast.rng), so a warning is issued and the result is close, not identical.

    Args:
        model_or_params: an nn.Module (parameters matched by name when the run recorded names, by
            order otherwise), or the tensors / (name, tensor) pairs / param groups in the run's
            optimizer order. They must hold the base weights the run started from.
        trajectory: a :class:`Trajectory` or the path of a saved one.
        settle: remove a pending pipelined perturbation at the end (the weights then equal the
            trained weights after ``opt.settle()``). With False the weights are left exactly as the
            trained ones were when the trajectory was taken.

    Returns:
        `model_or_params`, whose tensors now hold the fine-tuned weights.

    Raises:
        ValueError: the tensors do not match the trajectory's fingerprint (count, names, shapes,
            dtypes, or values other than the base weights).

    Example:
        See the module docstring.
    """
    if not isinstance(trajectory, Trajectory):
        trajectory = Trajectory.load(trajectory)
    if trajectory.params is None:
        return model_or_params
    if trajectory.method not in METHODS:
        raise ValueError(f"unknown method {trajectory.method!r} (known: {sorted(METHODS)})")
    tensors = _resolve_params(model_or_params, trajectory.params)
    trajectory.check_params(tensors)
    trained = zip(tensors, trajectory.params, strict=True)
    devices = device_types(t for t, entry in trained if entry["trained"])
    if trajectory.device is not None and devices != trajectory.device:
        warnings.warn(
            f"the trajectory was recorded on {trajectory.device}, replaying on {devices}: "
            "the result will be close to, not bit-identical with, the trained weights",
            RuntimeWarning,
            stacklevel=2,
        )
    groups = [{"params": []} for _ in range(trajectory.n_groups)]
    for t, entry in zip(tensors, trajectory.params, strict=True):
        groups[entry["group"]]["params"].append(t)
    flags = [t.requires_grad for t in tensors]
    try:
        for t, entry in zip(tensors, trajectory.params, strict=True):
            t.requires_grad_(entry["trained"])
        try:
            # Runs recorded before stochastic rounding existed rounded to nearest; those
            # without "accumulate" wrote every update at its step.
            defaults = {"rounding": "nearest", "accumulate": 1}
            hyperparameters = {**defaults, **trajectory.hyperparameters}
            if hyperparameters.get("mode") == "virtual":  # and perturbed the rest in place
                hyperparameters.setdefault("virtual_rest", "inplace")
            opt = METHODS[trajectory.method](
                groups, lr=1.0, seed=trajectory.run_seed, **hyperparameters
            )
        except TypeError as error:
            raise ValueError(f"malformed trajectory hyperparameters: {error}") from None
    finally:
        for t, flag in zip(tensors, flags, strict=True):
            t.requires_grad_(flag)
    opt.replay(trajectory)
    if settle:
        opt.settle()
    return model_or_params
