"""The engine's argument checks (zofast.perturb's passes call them before anything is written):
each bad argument raises one TypeError / ValueError naming it, in the dtype the value is used in."""

from __future__ import annotations

import math
import numbers
import struct
from collections.abc import Sequence

import torch

from zofast.rng import MAX_SEED, as_seed

WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_weight(w, name: str = "w") -> None:
    """Raise a TypeError / ValueError naming `name` unless w can be perturbed in place."""
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
    if w.device.type == "meta":
        raise ValueError(f"{name} is a meta tensor: it holds no data to perturb")
    if w.dtype not in WEIGHT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {w.dtype}")
    if w.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(w.shape)})")
    if not w.is_contiguous():  # (a contiguous tensor cannot overlap itself)
        raise ValueError(
            f"{name} must be contiguous and non-overlapping (shape {tuple(w.shape)}, strides "
            f"{w.stride()}); perturb a contiguous copy and copy it back"
        )


def matrix_shape(shape) -> tuple[int, int]:
    """The (m, n) matrix a weight of `shape` is perturbed as: (shape[0], prod(shape[1:]))."""
    shape = tuple(shape)
    if len(shape) < 2:
        raise ValueError(f"low-rank noise needs a tensor with ≥ 2 dims, got shape {shape}")
    return shape[0], math.prod(shape[1:])


def _matrix(t: torch.Tensor, m: int, n: int) -> torch.Tensor:
    """t as its (m, n) matrix view (t itself when it is one: a view costs host time)."""
    return t if t.dim() == 2 else t.view(m, n)


MAX_INDEX = 2**63 - 1  # stream indices are int64 in every backend


def _check_offset(value, name: str, size: int = 1, stride: int = 1) -> int:
    """A non-negative integer offset whose span (offset + size)·stride stays within int64."""
    if type(value) is int and value >= 0 and (value + size) * stride <= MAX_INDEX:
        return value  # the common case, without abc checks (eager calls pay for each)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    if (int(value) + size) * stride > MAX_INDEX:
        raise ValueError(
            f"{name} = {value} puts the stream indices past 2**63 - 1 ({size} elements"
            f"{f' × rank {stride}' if stride > 1 else ''})"
        )
    return int(value)


def _check_rank(rank, m: int, n: int) -> int:
    if type(rank) is int and 1 <= rank <= min(m, n):
        return rank
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
        raise TypeError(f"rank must be an integer, got {type(rank).__name__}")
    if not 1 <= rank <= min(m, n):
        raise ValueError(
            f"rank must be in 1..min(m, n) = 1..{min(m, n)} for a {m}×{n} matrix, got {rank}"
        )
    return int(rank)


def _as_list(value) -> list:
    if type(value) in (int, float):
        return [value]
    if isinstance(value, torch.Tensor):
        return value.reshape(-1).tolist()
    if isinstance(value, Sequence) and not isinstance(value, str):
        return list(value)
    return [value]


def as_float32(value, name: str, *, allow_zero: bool = True) -> float:
    """A real number as the float32 it is used as; ValueError naming `name` if it is not a finite
    float32 (overflows to inf), or, non-zero, rounds to 0 (underflow: it would do nothing)."""
    if type(value) is float:
        wide = value
    elif isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    else:
        try:
            wide = float(value)
        except OverflowError:
            wide = math.inf
    if math.isnan(wide):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    try:  # a C cast to float, rounding to nearest even as torch does, without a torch op
        narrow = struct.unpack("f", struct.pack("f", wide))[0]
    except OverflowError:
        narrow = math.inf
    if not math.isfinite(narrow):
        raise ValueError(f"{name} = {value!r} overflows float32 (largest finite: 3.4028235e38)")
    if narrow == 0.0 and wide != 0.0:
        raise ValueError(f"{name} = {value!r} underflows to 0 in float32 (smallest: 1.4e-45)")
    if narrow == 0.0 and not allow_zero:
        raise ValueError(f"{name} must be non-zero, got {value!r}")
    return narrow


def _check_scales(scale, n_terms: int) -> list[float]:
    scales = _as_list(scale)
    if len(scales) != n_terms:
        raise ValueError(
            f"scale must give one value per seed: {n_terms} seeds, {len(scales)} scales"
        )
    # Scales enter every backend as float32: checked as such.
    return [as_float32(s, "scale") for s in scales]


def _check_seeds(seed, name: str) -> list[int]:
    if isinstance(seed, torch.Tensor):
        raise TypeError(f"{name} must be integers here (device seed tensors: gaussian_ only)")
    seeds = [as_seed(s, name) for s in _as_list(seed)]
    if not seeds:
        raise ValueError(f"{name} must name at least one seed")
    return seeds


def _check_round_seed(round_seed, w: torch.Tensor):
    """None, a uint64 int, or (graph-capture form) a one-element int64 tensor on w's device;
    None for float32 weights (nothing to round)."""
    if round_seed is None:
        return None
    if isinstance(round_seed, torch.Tensor):
        if round_seed.dtype != torch.int64 or round_seed.numel() != 1:
            raise ValueError("round_seed given as a tensor must be one int64 element")
        if round_seed.device != w.device:
            raise ValueError(f"round_seed tensor must be on {w.device}, got {round_seed.device}")
        round_seed = round_seed.reshape(1)
    elif (
        isinstance(round_seed, bool)
        or not isinstance(round_seed, numbers.Integral)
        or not 0 <= int(round_seed) <= MAX_SEED
    ):
        raise ValueError(f"round_seed must be None or an integer in 0..2**64-1, got {round_seed!r}")
    else:
        round_seed = int(round_seed)
    return None if w.dtype == torch.float32 else round_seed


def _check_w_scale(w_scale, w: torch.Tensor):
    """The weight scale as a float32 value (None for 1.0: no multiply), or (graph-capture form)
    a one-element float32 tensor on w's device."""
    if isinstance(w_scale, torch.Tensor):
        if w_scale.dtype != torch.float32 or w_scale.numel() != 1:
            raise ValueError("w_scale given as a tensor must be one float32 element")
        if w_scale.device != w.device:
            raise ValueError(f"w_scale tensor must be on {w.device}, got {w_scale.device}")
        return w_scale.reshape(1)
    value = as_float32(w_scale, "w_scale")  # it is used in float32
    return None if value == 1.0 else value


def _check_out(out, w: torch.Tensor) -> torch.Tensor:
    """Where the pass writes: w when out is None or w; otherwise a checked tensor like w."""
    if out is None or out is w:
        return w
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if out.shape != w.shape or out.dtype != w.dtype or out.device != w.device:
        raise ValueError(
            f"out must be like w ({tuple(w.shape)} {w.dtype} on {w.device}), got "
            f"{tuple(out.shape)} {out.dtype} on {out.device}"
        )
    if not out.is_contiguous() or torch._debug_has_internal_overlap(out) != 0:
        raise ValueError("out must be contiguous and non-overlapping")
    start, size = out.data_ptr(), out.numel() * out.element_size()
    w_start = w.data_ptr()
    if start == w_start:
        return out  # exactly w's memory: in place
    if start < w_start + size and w_start < start + size:
        raise ValueError("out overlaps w without being w: pass out=w (in place) or a new tensor")
    return out
