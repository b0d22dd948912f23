"""Which mode and rounding an optimizer runs: "auto" resolved by the trained weights' dtype.

float32 weights: in place (pipelined if asked), rounding to nearest: in-place rounding errors stay
at float32's level and in place is fastest. bf16 / fp16 weights: an exact mode (the stored weights
are written by updates only) with stochastic rounding: LOZO's "virtual" (its updates summed in a
float32 low-rank factor, written once per V epoch; the other tensors in "shadow" mode) where no
group has weight decay, "shadow" otherwise and for MeZO. The shadow part of a bf16 / fp16 run
without momentum writes its updates every ACCUMULATE steps (zofast.optim.shadow).

Paired steps (LOZO's ``paired=True``, zofast.optim.paired) need an exact mode whatever the dtype:
"auto" then stands for "virtual" (its other tensors in "shadow" mode) without weight decay and
"shadow" with it, rounding as above.
"""

from __future__ import annotations

import warnings

import torch

MODES = ("auto", "inplace", "shadow", "virtual")
# accumulate="auto" for bf16 / fp16 shadow tensors without momentum: steps per write (one
# rounding). The 64-input teacher (MeZO, bf16 ÷ fp32's loss reduction): 90 % at 32, 93 % at 64,
# 99 % at 128; 64 keeps the forwards at most 63 updates behind.
ACCUMULATE = 64
ROUNDINGS = ("auto", "nearest", "stochastic")
LOW_PRECISION = (torch.bfloat16, torch.float16)
_warned_inplace = False


def check_modes(
    mode, rounding, lowrank: bool, virtual_indices, virtual_rest, paired: bool = False
) -> None:
    """ValueError for a mode, rounding or paired argument that no weights make valid."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    if mode == "virtual" and not lowrank:
        raise ValueError(
            "mode='virtual' is LOZO's: full-rank noise cannot be applied through the "
            "layers cheaply; use mode='shadow' (exact) or mode='inplace'"
        )
    if (virtual_indices is not None or virtual_rest is not None) and mode != "virtual":
        raise ValueError("virtual_indices and virtual_rest are for mode='virtual' only")
    if virtual_rest not in (None, "inplace", "shadow"):
        raise ValueError(f"virtual_rest must be 'inplace' or 'shadow', got {virtual_rest!r}")
    if not isinstance(paired, bool):
        raise ValueError(f"paired must be True or False, got {paired!r}")
    if paired and not lowrank:
        raise ValueError(
            "paired=True is LOZO's: one forward gives each copy of the batch its own sign of the "
            "perturbation through per-row low-rank terms, which MeZO's full-rank noise on the "
            "big matrices does not have (pair LOZO / LOZO-M; MeZO takes two forwards)"
        )
    if paired and (mode == "inplace" or virtual_rest == "inplace"):
        raise ValueError(
            "paired=True needs an exact mode (the weights cannot carry +ε and −ε at once): use "
            "mode='auto', 'virtual' or 'shadow' (and virtual_rest='shadow')"
        )


def auto_mode(*, low: bool, lowrank: bool, decay: bool, paired: bool = False) -> str:
    """What mode="auto" stands for (see the module docstring).

    Args:
        low: some trained tensor is bf16 / fp16.
        lowrank: the method's noise is low-rank (LOZO).
        decay: some group has weight decay.
        paired: paired steps (an exact mode whatever the dtype).
    """
    if not low and not paired:
        return "inplace"
    return "virtual" if lowrank and not decay else "shadow"


def resolve(
    mode, rounding, pipeline, rest, *, low, lowrank, decay, has_model, replay_only, paired=False
):
    """(mode, rounding, rest): "auto" resolved (see the module docstring); rest is how virtual
    mode perturbs the tensors that do not go through layers ("shadow" for bf16 / fp16 and for
    paired steps, "inplace" for float32), None in the other modes.

    Args:
        low, lowrank, decay, paired: as for :func:`auto_mode`.
        has_model: the optimizer was given the model.
        replay_only: built by zofast.replay (no model needed).
    """
    if mode == "auto":
        if low and pipeline:
            raise ValueError(
                "pipeline=True keeps a perturbation in the stored weights, which bf16 / fp16 "
                "weights cannot hold exactly: drop pipeline=True (the default exact mode "
                "writes the weights once per step), or pass mode='inplace'"
            )
        if paired and not has_model and not replay_only:
            raise ValueError(
                "paired=True applies the perturbation through the model's forward: pass the "
                "model (LOZO(model, ...) or model=model)"
            )
        if low and not has_model:
            raise ValueError(
                "bf16 / fp16 weights need an exact mode, which applies the perturbation "
                "through the model's forward: pass the model (LOZO(model, ...) or "
                "model=model), or mode='inplace' to accept the rounding drift"
            )
        mode = auto_mode(low=low, lowrank=lowrank, decay=decay, paired=paired)
    if mode == "virtual" and not has_model and not replay_only:
        raise ValueError(
            "mode='virtual' needs the model whose layers apply the perturbation: pass "
            "model=... (or the model itself as params)"
        )
    if mode == "virtual" and rest is None:
        rest = "shadow" if low or paired else "inplace"
    if pipeline and (mode == "shadow" or rest == "shadow"):
        raise ValueError(
            "pipeline=True is for tensors perturbed in place: exact modes never leave a "
            "perturbation in the stored weights, so there is nothing to fuse"
        )
    if mode == "inplace" and low:
        _warn_inplace()
    if rounding == "auto":
        rounding = "stochastic" if low else "nearest"
    return mode, rounding, rest


def _warn_inplace() -> None:
    """Once per process: in-place perturbation of bf16 / fp16 weights does not train well."""
    global _warned_inplace
    if not _warned_inplace:
        _warned_inplace = True
        warnings.warn(
            "mode='inplace' on bfloat16 / float16 weights: every perturbation pass rounds the "
            "weights and the roundings random-walk (12.8 % relative drift after 1,000 steps at "
            "lr = 0 in bf16, bench/tools/precision.py drift), larger than the updates at usual "
            "learning rates; mode='auto' (the default) applies the perturbation exactly",
            RuntimeWarning,
            stacklevel=5,
        )


def resolve_accumulate(accumulate, *, shadow: bool, low: bool, momentum: bool) -> int:
    """Steps per write of the shadow part's updates: "auto" is ACCUMULATE for bf16 / fp16
    weights without momentum, else 1; ValueError for a K > 1 that cannot apply.

    Args:
        accumulate: "auto" or an integer ≥ 1.
        shadow: the optimizer has a shadow part (mode="shadow", or virtual mode's rest).
        low: some trained tensor is bf16 / fp16.
        momentum: LOZO-M (its update is the momentum, which changes every step).
    """
    if accumulate == "auto":
        return ACCUMULATE if shadow and low and not momentum else 1
    if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1:
        raise ValueError(f"accumulate must be 'auto' or an integer ≥ 1, got {accumulate!r}")
    if accumulate > 1 and not shadow:
        raise ValueError(
            "accumulate > 1 defers the updates of shadow-mode tensors; this optimizer has none "
            "(mode='shadow', or mode='virtual' with bf16 / fp16 tensors outside the layers)"
        )
    if accumulate > 1 and momentum:
        raise ValueError("accumulate > 1 needs momentum=0: LOZO-M writes its momentum every step")
    return accumulate
