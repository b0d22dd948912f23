"""The perturbation engine: seeded Gaussian noise added to weights in place.

The noise contract (zofast.rng has the stream ``normal(seed, i)``):

* Full-rank noise of a tensor: ``Z[i] = normal(seed, offset + i)`` over the row-major flattened
  index i (`offset` = 0 unless the tensor is a contiguous shard of a larger one).
* Low-rank noise of an m×n matrix, rank r: ``U[i, k] = normal(u_seed, (row_offset + i)·r + k)``,
  ``V[j, k] = normal(v_seed, (col_offset + j)·r + k)``, ``Z = U·Vᵀ`` (scaling s = 1, as LOZO's
  code has it: entries of Z have variance r, not 1). Rows and columns are global indices, so the
  first k rows of an m×n matrix get exactly the noise of a k×n matrix with the same seeds.
* Tensors of rank ≥ 3 are viewed as (shape[0], prod(shape[1:])) matrices (a conv weight's
  output channels are its rows); 1-D tensors take full-rank noise only.
* Weights may be float32, bfloat16 or float16; arithmetic is float32 in registers and each pass
  rounds once to the weight's dtype: ``w = round(fma(s_T, z_T, ... fma(s_1, z_1, float(w))))``.
  Low-rank terms: ``u_t = fl(s_t · U_t)`` (terms that share a v_seed are summed into one u, in term
  order), then per element ``acc = fma(u[t, i, k], v[t, j, k], acc)`` for t, then k.

Several terms go through in one read and one write of w: pass sequences of seeds and scales, e.g.
"restore the last perturbation, apply the update and perturb for the next step" is one pass.

Options of every pass (gaussian_, lowrank_, outer_add_; each default leaves the bits as above):

* ``round_seed``: a uint64 seed makes the pass's one float32 -> weight-dtype rounding stochastic
  (round up with probability remainder / spacing, so tiny updates survive in expectation). Element
  (r, c) takes the random word ``bits(round_seed, r, c)``: word c mod 4 of Philox4x32-10 with
  counter (lo32(c // 4), hi32(c // 4), lo32(r), hi32(r)) and key (lo32(seed), hi32(seed)), where
  (r, c) is the element's global row and column in the m×n view (row_offset + i, col_offset + j)
  for lowrank_ / outer_add_, and (0, offset + i) for gaussian_. bfloat16: NaN -> NaN (0x7FFF),
  else the high 16 bits of (float32 bits + (word & 0xFFFF)); float16: the same at 13 bits below
  fp16's precision (|x| < 2^-14 through a = |x| + 2^-14, fp16's subnormal step); float32 weights:
  no effect. Integer arithmetic on the float32 result: bit-identical on every backend (the exact
  definition is in zofast.kernels.philox's docstring).
* ``w_scale``: acc starts as ``fl(w_scale · float(w))`` (one rounded float32 multiply) instead of
  ``float(w)``: weight decay W <- (1 - lr·wd)·W fused into the pass and its rounding. 1.0: no
  multiply.
* ``out``: w is only read and the result goes into out (same shape, dtype and device,
  contiguous); out may be w itself (in place), and must not otherwise overlap it.

Backends: "auto" (Triton for CUDA tensors, the C++ extension for CPU tensors), "triton" (on CPU
tensors it runs Triton's interpreter), "cpp" (zofast._C, CPU and CUDA), "torch" (the pure-torch
reference). All validate their inputs before anything is written: a bad argument raises a
TypeError / ValueError naming it, and w is left untouched.

For CUDA-graph capture, pass seeds as an int64 tensor and scales as a float32 tensor on w's device
(seed bit patterns are taken as they are); the kernels read them from device memory.
"""

from __future__ import annotations

import functools
import math
import numbers
import struct

import torch

from zofast._ext import require_extension, resolve_backend
from zofast.perturb_args import (
    _check_offset,
    _check_out,
    _check_rank,
    _check_round_seed,
    _check_scales,
    _check_seeds,
    _check_w_scale,
    _matrix,
    check_weight,
    matrix_shape,
)
from zofast.rng import as_seed, to_signed64

__all__ = [
    "gaussian_",
    "lowrank_",
    "outer_add_",
    "gaussian_noise",
    "lowrank_factors",
    "matrix_shape",
]

# Host tensors whose in-place passes run elsewhere (zofast.offload_update, streamed offload's
# update="gpu"): data_ptr -> handler(fn, w, args, kwargs), which runs fn and returns w.
_WRITES_ELSEWHERE: dict = {}


def _redirectable(fn):
    """Hand an in-place pass over a registered host tensor to its handler (``_WRITES_ELSEWHERE``);
    a pass that only reads it (``out`` another tensor) runs here."""

    @functools.wraps(fn)
    def wrapper(w, *args, **kwargs):
        if _WRITES_ELSEWHERE and isinstance(w, torch.Tensor) and w.device.type == "cpu":
            handler = _WRITES_ELSEWHERE.get(w.data_ptr())
            out = kwargs.get("out")
            if handler is not None and (out is None or out is w):
                return handler(fn, w, args, kwargs)
        return fn(w, *args, **kwargs)

    return wrapper


def _device_terms(
    ints: list[int], floats: list[float], device
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint64 values (seeds, as int64 bit patterns) and float32 values (scales) as an int64 and a
    float32 tensor on `device`: views of one buffer that reaches a GPU in one copy through pinned
    memory, without a sync (an eager call pays host time for every copy, so one, not one per
    table)."""
    # The floats start 16-byte aligned, as a tensor of their own would (Triton specialises on it).
    pad = len(ints) % 2
    raw = struct.pack(
        f"<{len(ints) + pad}q{len(floats)}f", *map(to_signed64, ints), *[0] * pad, *floats
    )
    buf = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    if device.type != "cpu":
        buf = buf.pin_memory().to(device, non_blocking=True)
    return buf[: 8 * len(ints)].view(torch.int64), buf[8 * (len(ints) + pad) :].view(torch.float32)


def _staged_pass(seeds: list[int], scales: list[float], round_seed, w_scale, device):
    """(seeds, scales, round seed, weight scale) of a pass as device tensors in one copy
    (_device_terms); a round seed / weight scale that is None or a tensor passes through."""
    extra_int = isinstance(round_seed, int)
    extra_float = isinstance(w_scale, float)
    ints, floats = _device_terms(
        seeds + [round_seed] * extra_int, scales + [w_scale] * extra_float, device
    )
    if extra_int:
        ints, round_seed = ints[:-1], ints[-1:]
    if extra_float:
        floats, w_scale = floats[:-1], floats[-1:]
    return ints, floats, round_seed, w_scale


# Eager Triton passes with int seeds run in one launch (kernels.lowrank_seeded; gaussian_'s kernel
# reading its seeds as arguments); False: the factor + apply launches from staged tables, which
# bench/probes/eager.py --two-launch times against them. On the H200 (Triton 3.6, bf16 8192²,
# bench/results/2026-12-03-session8) one launch gives 92 / 84 % of the copy ceiling at ranks 1 / 2
# against 73 / 70 %, bit for bit the two launches (tests/test_one_launch.py runs there too).
_ONE_LAUNCH = True
MAX_ARGUMENT_TERMS = 4  # terms passed as kernel arguments (no device copy); more: one staged copy
# Each program holds its tiles' factor values, 4·rank·(32 + 128) bytes: up to rank 16 in registers.
MAX_ONE_LAUNCH_RANK = 16


def _as_arguments(scales: list[float], round_seed, w_scale) -> bool:
    """Whether a pass's host values go to the kernel as arguments: a few terms, and no round
    seed or weight scale already on the device."""
    return (
        _ONE_LAUNCH
        and len(scales) <= MAX_ARGUMENT_TERMS
        and not isinstance(round_seed, torch.Tensor)
        and not isinstance(w_scale, torch.Tensor)
    )


def _pass_options(w: torch.Tensor, out, round_seed, w_scale):
    """(where the pass writes, round seed, weight scale), each checked (see _check_out,
    _check_round_seed, _check_w_scale)."""
    return _check_out(out, w), _check_round_seed(round_seed, w), _check_w_scale(w_scale, w)


def _on_device(value, dtype: torch.dtype, device: torch.device):
    """A round seed / weight scale as a one-element device tensor (None stays None; tensors are
    already there), copied without a sync (_device_terms)."""
    if value is None or isinstance(value, torch.Tensor):
        return value
    if dtype == torch.int64:
        return _device_terms([value], [], device)[0]
    return _device_terms([], [value], device)[1]


def _host_value(value, kind):
    """A round seed (uint64) / weight scale (float) for the pure-torch reference."""
    if isinstance(value, torch.Tensor):
        value = value.item()
        return value % 2**64 if kind is int else value
    return value


def _graph_terms(seed, scale, device, name: str):
    """Seeds/scales given as device tensors (graph-capture form), checked without a sync."""
    if not isinstance(scale, torch.Tensor):
        raise TypeError(f"with {name} given as a tensor, scale must be a float32 tensor too")
    for t, label, dtype in ((seed, name, torch.int64), (scale, "scale", torch.float32)):
        if t.dtype != dtype or t.dim() != 1 or t.device != device or not t.is_contiguous():
            raise ValueError(f"{label} tensor must be contiguous 1-D {dtype} on {device}")
    if seed.numel() != scale.numel() or seed.numel() == 0:
        raise ValueError(f"{name} and scale tensors must have the same non-zero length")
    return seed, scale


@_redirectable
@torch.no_grad()
def gaussian_(
    w: torch.Tensor,
    seed,
    scale,
    *,
    offset: int = 0,
    round_seed=None,
    w_scale=1.0,
    out: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """w += Σ_t scale_t · Z_t in place, Z_t[i] = normal(seed_t, offset + i); one pass over w.

    Args:
        w: contiguous float32 / bfloat16 / float16 tensor of any shape.
        seed: a uint64 seed, or a sequence of them (one per term), or an int64 device tensor.
        scale: a finite float, or one per seed (a float32 device tensor with tensor seeds).
        offset: global index of w's first element (for a contiguous shard of a larger tensor).
        round_seed: None (round to nearest even) or a uint64 seed: stochastic rounding, element
            i taking bits(round_seed, 0, offset + i) (module docstring); or a one-element int64
            device tensor (graph capture). No effect on float32 weights.
        w_scale: finite float32 factor applied to w before the terms (fused weight decay), or a
            one-element float32 device tensor.
        out: None (in place) or a tensor like w that receives the result; w is then only read.
        backend: "auto", "triton", "cpp" or "torch".

    Returns:
        w, modified in place (out, when given).

    Example:
        >>> w = torch.zeros(3, 5)
        >>> _ = gaussian_(w, seed=1, scale=1e-3)        # perturb
        >>> _ = gaussian_(w, seed=[1, 2], scale=[-1e-3, 1e-3])  # revert and perturb anew
        >>> b = torch.zeros(3, 5, dtype=torch.bfloat16)
        >>> _ = gaussian_(b, seed=3, scale=1e-6, round_seed=4, w_scale=0.999)
    """
    check_weight(w)
    offset = _check_offset(offset, "offset", w.numel())
    target, round_seed, w_scale = _pass_options(w, out, round_seed, w_scale)
    if isinstance(seed, torch.Tensor):
        seeds_t, scales_t = _graph_terms(seed, scale, w.device, "seed")
        seeds = None
    else:
        seeds = _check_seeds(seed, "seed")
        scales = _check_scales(scale, len(seeds))
    backend = resolve_backend(backend, w.device)
    if seeds is not None and backend == "triton" and _as_arguments(scales, round_seed, w_scale):
        from zofast.kernels import gaussian

        return gaussian.gaussian_triton(
            w, seeds, scales, offset, out=target, round_seed=round_seed, w_scale=w_scale
        )
    if seeds is not None:
        seeds_t, scales_t, round_seed, w_scale = _staged_pass(
            seeds, scales, round_seed, w_scale, w.device
        )
    if backend == "torch":
        from zofast.kernels import gaussian

        seeds = seeds if seeds is not None else [s % 2**64 for s in seeds_t.tolist()]
        result = gaussian.gaussian_ref(
            w, seeds, scales_t, offset, _host_value(round_seed, int), _host_value(w_scale, float)
        )
        return target.copy_(result)
    round_t = _on_device(round_seed, torch.int64, w.device)
    w_scale_t = _on_device(w_scale, torch.float32, w.device)
    if backend == "cpp":
        ops = require_extension(w.device)
        if target is w and round_t is None and w_scale_t is None:
            ops.gaussian_(w, seeds_t, scales_t, offset)
        else:
            ops.gaussian_into(w, target, seeds_t, scales_t, offset, round_t, w_scale_t)
        return target
    from zofast.kernels import gaussian

    return gaussian.gaussian_triton(
        w, seeds_t, scales_t, offset, out=target, round_seed=round_t, w_scale=w_scale_t
    )


def _noise(n: int, seed_t: torch.Tensor, scale_t: torch.Tensor, offset: int, backend: str):
    """float32 (n,) = scale * normal(seed, offset + i); seed_t / scale_t: one-element tensors
    on the output device (read there by the kernels)."""
    out = torch.empty(n, dtype=torch.float32, device=seed_t.device)
    if backend == "cpp":
        require_extension(out.device).noise_(out, seed_t, scale_t, offset)
        return out
    from zofast.kernels import philox

    if backend == "triton":
        return philox.noise_triton(out, seed_t, scale_t, offset)
    index = offset + torch.arange(n, dtype=torch.int64, device=out.device)
    return out.copy_(philox.sample_ref(index, int(seed_t) % 2**64, normal=True) * scale_t)


def _term_factors(m, n, rank, seeds, scales, row_offset, col_offset, backend):
    """Every term's u_t = fl(s_t·U_t) and V_t from device tensors seeds = [u seeds, v seeds]
    (2T,) and scales (T,), stored transposed as the kernels read them: u (T, r, m), v (T, r, n)."""
    if backend == "triton":
        from zofast.kernels import lowrank

        return lowrank.factors_triton(seeds, scales, m, n, rank, row_offset, col_offset)
    one = torch.ones(1, dtype=torch.float32, device=scales.device)
    terms = range(scales.numel())
    u_seeds, v_seeds = seeds[: len(terms)], seeds[len(terms) :]
    u = [
        _noise(m * rank, u_seeds[t : t + 1], scales[t : t + 1], row_offset * rank, backend)
        for t in terms
    ]
    v = [_noise(n * rank, v_seeds[t : t + 1], one, col_offset * rank, backend) for t in terms]
    u = torch.stack(u).view(-1, m, rank).transpose(1, 2).contiguous()
    return u, torch.stack(v).view(-1, n, rank).transpose(1, 2).contiguous()


def _merge_shared_v(u_all, v_all, v_seeds: list[int]):
    """Terms that share a v_seed summed into one u, in term order: (G, r, m), (G, r, n)."""
    groups: dict[int, list[int]] = {}
    for t, v_seed in enumerate(v_seeds):
        groups.setdefault(v_seed, []).append(t)
    if len(groups) == len(v_seeds):
        return u_all, v_all
    u = torch.stack([functools.reduce(torch.add, (u_all[t] for t in ts)) for ts in groups.values()])
    # Stacked views, not list indexing: no host-to-device copy (the op may be graph-captured).
    return u, torch.stack([v_all[ts[0]] for ts in groups.values()])


def _apply_factors(
    w2d: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    backend: str,
    out2d: torch.Tensor,
    round_seed=None,
    w_scale=None,
    row_offset: int = 0,
    col_offset: int = 0,
) -> None:
    """out2d = round(w_scale·w2d + Σ u·vᵀ) on checked inputs (out2d may be w2d)."""
    if backend == "torch":
        from zofast.kernels import lowrank

        result = lowrank.lowrank_ref(
            w2d,
            u,
            v,
            round_seed=_host_value(round_seed, int),
            w_scale=_host_value(w_scale, float),
            row_offset=row_offset,
            col_offset=col_offset,
        )
        out2d.copy_(result)
        return
    round_t = _on_device(round_seed, torch.int64, w2d.device)
    w_scale_t = _on_device(w_scale, torch.float32, w2d.device)
    if backend == "cpp":
        ops = require_extension(w2d.device)
        if out2d is w2d and round_t is None and w_scale_t is None:
            ops.lowrank_apply_(w2d, u, v)
        else:
            ops.lowrank_apply_into(w2d, out2d, u, v, row_offset, col_offset, round_t, w_scale_t)
        return
    from zofast.kernels import lowrank

    lowrank.lowrank_triton(
        w2d,
        u,
        v,
        out=out2d,
        round_seed=round_t,
        w_scale=w_scale_t,
        row_offset=row_offset,
        col_offset=col_offset,
    )


def _lowrank_one_launch(w2d, out2d, terms, rank, round_seed, w_scale, row_offset, col_offset):
    """out2d = round(w_scale·w2d + Σ s_t·U_t·V_tᵀ) in one Triton launch on checked inputs,
    terms = (u seeds, v seeds, scales); host values as kernel arguments where _as_arguments
    allows, else in one staged copy."""
    from zofast.kernels import lowrank_seeded

    u_seeds, v_seeds, scales, same_v = lowrank_seeded.group_terms(*terms)
    seeds = u_seeds + v_seeds
    if not _as_arguments(scales, round_seed, w_scale):
        seeds, scales, round_seed, w_scale = _staged_pass(
            seeds, scales, round_seed, w_scale, w2d.device
        )
    lowrank_seeded.lowrank_seeded_triton(
        w2d,
        seeds,
        scales,
        rank,
        same_v,
        out=out2d,
        round_seed=round_seed,
        w_scale=w_scale,
        row_offset=row_offset,
        col_offset=col_offset,
    )


@_redirectable
@torch.no_grad()
def lowrank_(
    w: torch.Tensor,
    u_seed,
    v_seed,
    rank: int,
    scale,
    *,
    row_offset: int = 0,
    col_offset: int = 0,
    round_seed=None,
    w_scale=1.0,
    out: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """w += Σ_t scale_t · U_t·V_tᵀ in place, without materialising any m×n product; one pass.

    U_t and V_t are regenerated from their seeds (see the module docstring for the contract):
    on the Triton backend with int seeds inside the one kernel that reads and writes w once
    (each tile draws the values it needs; ranks up to 16), otherwise into (m + n)·r float32
    numbers per term that a second kernel applies.

    Args:
        w: contiguous float32 / bfloat16 / float16 tensor with ≥ 2 dims (viewed as a matrix).
        u_seed, v_seed: uint64 seeds, or equal-length sequences of them (one pair per term), or
            int64 device tensors (graph-capture form: a one-element v_seed is shared by every
            term, whose u's are then merged; otherwise one v_seed per term, never merged).
        rank: r, 1 ≤ r ≤ min(m, n).
        scale: a finite float, or one per term (a float32 device tensor with tensor seeds).
        row_offset, col_offset: global row / column index of w's first row / column (shards).
        round_seed: None (round to nearest even) or a uint64 seed: stochastic rounding, element
            (i, j) taking bits(round_seed, row_offset + i, col_offset + j) (module docstring);
            or a one-element int64 device tensor. No effect on float32 weights.
        w_scale: finite float32 factor applied to w before the terms (fused weight decay), or a
            one-element float32 device tensor.
        out: None (in place) or a tensor like w that receives the result; w is then only read.
        backend: "auto", "triton", "cpp" or "torch".

    Returns:
        w, modified in place (out, when given).

    Example:
        >>> w = torch.zeros(64, 32)
        >>> _ = lowrank_(w, u_seed=1, v_seed=2, rank=2, scale=1e-3)
        >>> torch.linalg.matrix_rank(w).item()
        2
        >>> tmp = lowrank_(w, 3, 4, 2, 1e-3, out=torch.empty_like(w))  # w unchanged
    """
    check_weight(w)
    m, n = matrix_shape(w.shape)
    rank = _check_rank(rank, m, n)
    row_offset = _check_offset(row_offset, "row_offset", m, rank)
    col_offset = _check_offset(col_offset, "col_offset", n, rank)
    target, round_seed, w_scale = _pass_options(w, out, round_seed, w_scale)
    seeds_given = not isinstance(u_seed, torch.Tensor)
    if not seeds_given:
        u_seeds_t, scales_t = _graph_terms(u_seed, scale, w.device, "u_seed")
        if not isinstance(v_seed, torch.Tensor):
            raise TypeError("with u_seed given as a tensor, v_seed must be an int64 tensor too")
        # One v_seed shared by every term: their u's are summed (the structure is static).
        shared = v_seed.numel() == 1
        _graph_terms(v_seed, scale[:1] if shared else scale, w.device, "v_seed")
        v_seeds_t = v_seed.expand(u_seeds_t.numel()) if shared else v_seed
        seeds_t = torch.cat([u_seeds_t, v_seeds_t])
        v_seeds = [0] * u_seeds_t.numel() if shared else None
    else:
        u_seeds = _check_seeds(u_seed, "u_seed")
        v_seeds = _check_seeds(v_seed, "v_seed")
        if len(u_seeds) != len(v_seeds):
            raise ValueError(f"u_seed and v_seed must pair up: {len(u_seeds)} vs {len(v_seeds)}")
        scales = _check_scales(scale, len(u_seeds))
    backend = resolve_backend(backend, w.device)
    if seeds_given and backend == "triton" and _ONE_LAUNCH and rank <= MAX_ONE_LAUNCH_RANK:
        _lowrank_one_launch(
            _matrix(w, m, n),
            _matrix(target, m, n),
            (u_seeds, v_seeds, scales),
            rank,
            round_seed,
            w_scale,
            row_offset,
            col_offset,
        )
        return target
    if seeds_given:
        seeds_t, scales_t, round_seed, w_scale = _staged_pass(
            u_seeds + v_seeds, scales, round_seed, w_scale, w.device
        )
    u, v = _term_factors(m, n, rank, seeds_t, scales_t, row_offset, col_offset, backend)
    if v_seeds is not None:
        u, v = _merge_shared_v(u, v, v_seeds)
    _apply_factors(
        _matrix(w, m, n),
        u,
        v,
        backend,
        _matrix(target, m, n),
        round_seed,
        w_scale,
        row_offset,
        col_offset,
    )
    return target


@_redirectable
@torch.no_grad()
def outer_add_(
    w: torch.Tensor,
    left: torch.Tensor,
    right: torch.Tensor,
    *,
    row_offset: int = 0,
    col_offset: int = 0,
    round_seed=None,
    w_scale=1.0,
    out: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """w += left·rightᵀ in place for explicit factors, in one fused pass (no m×n product).

    Used where a factor is state rather than noise (LOZO-M's momentum N·Vᵀ, flushing updates
    gathered in low-rank form). Same arithmetic as lowrank_: fma over k in order, one rounding.

    Args:
        w: contiguous float32 / bfloat16 / float16 tensor with ≥ 2 dims, viewed as m×n.
        left: float32 (m, K); right: float32 (n, K), on w's device.
        row_offset, col_offset: global row / column of w's first row / column: only the
            stochastic rounding's words depend on them (a shard rounds as the whole tensor).
        round_seed, w_scale, out: as for lowrank_ (module docstring).
        backend: "auto", "triton", "cpp" or "torch".

    Returns:
        w, modified in place (out, when given).

    Example:
        >>> w = torch.zeros(4, 3)
        >>> _ = outer_add_(w, torch.ones(4, 1), torch.ones(3, 1))
    """
    check_weight(w)
    m, n = matrix_shape(w.shape)
    row_offset = _check_offset(row_offset, "row_offset", m)
    col_offset = _check_offset(col_offset, "col_offset", n)
    target, round_seed, w_scale = _pass_options(w, out, round_seed, w_scale)
    for t, name, rows in ((left, "left", m), (right, "right", n)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
            raise TypeError(f"{name} must be a float32 tensor")
        if t.dim() != 2 or t.shape[0] != rows or t.device != w.device:
            raise ValueError(
                f"{name} must be ({rows}, K) on {w.device}, got {tuple(t.shape)} on {t.device}"
            )
    if left.shape[1] != right.shape[1] or left.shape[1] == 0:
        raise ValueError(
            f"left and right must share K ≥ 1, got {left.shape[1]} and {right.shape[1]}"
        )
    backend = resolve_backend(backend, w.device)
    _apply_factors(
        _matrix(w, m, n),
        left.T.contiguous()[None],
        right.T.contiguous()[None],
        backend,
        _matrix(target, m, n),
        round_seed,
        w_scale,
        row_offset,
        col_offset,
    )
    return target


@torch.no_grad()
def gaussian_noise(
    shape,
    seed: int,
    *,
    offset: int = 0,
    dtype: torch.dtype = torch.float32,
    device=None,
    backend: str = "auto",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The materialised full-rank noise Z of a tensor of `shape` (for references, tests, momentum).

    Args:
        shape: the tensor's shape.
        seed: uint64 seed.
        offset: global index of the first element.
        dtype: dtype of the result (computed in float32, rounded once).
        device: where to put it (default: CPU).
        backend: "auto", "triton", "cpp" or "torch".
        out: optional float32 contiguous tensor of `shape` to write into.

    Returns:
        Z, shaped `shape`.

    Example:
        >>> z = gaussian_noise((3, 4), seed=9)
    """
    seed = as_seed(seed)
    try:
        shape = tuple(shape)
    except TypeError:
        raise TypeError(f"shape must be a sequence of sizes, got {shape!r}") from None
    if not all(
        isinstance(d, numbers.Integral) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise ValueError(f"shape must hold non-negative integer sizes, got {shape}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    n = math.prod(shape)
    offset = _check_offset(offset, "offset", n)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
        if out.dtype != torch.float32 or tuple(out.shape) != shape or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous float32 tensor of shape {shape}")
        device = out.device
    backend = resolve_backend(backend, device)
    z = _noise(n, *_device_terms([seed], [1.0], device), offset, backend)
    if out is not None:
        return out.copy_(z.view(shape))
    return z.view(shape).to(dtype)


@torch.no_grad()
def lowrank_factors(
    shape,
    u_seed: int,
    v_seed: int,
    rank: int,
    *,
    row_offset: int = 0,
    col_offset: int = 0,
    dtype: torch.dtype = torch.float32,
    device=None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors (U, V), (m, r) and (n, r), of a tensor's low-rank noise Z = U·Vᵀ.

    Args:
        shape: the tensor's shape (≥ 2 dims; see matrix_shape).
        u_seed, v_seed: uint64 seeds.
        rank: r, 1 ≤ r ≤ min(m, n).
        row_offset, col_offset: global index of the first row / column.
        dtype, device, backend: as for gaussian_noise.

    Returns:
        (U, V).

    Example:
        >>> U, V = lowrank_factors((8, 6), u_seed=1, v_seed=2, rank=2)
        >>> (U @ V.T).shape
        torch.Size([8, 6])
    """
    m, n = matrix_shape(shape)
    rank = _check_rank(rank, m, n)
    u_seed, v_seed = as_seed(u_seed, "u_seed"), as_seed(v_seed, "v_seed")
    row_offset = _check_offset(row_offset, "row_offset", m, rank)
    col_offset = _check_offset(col_offset, "col_offset", n, rank)
    device = torch.device(device) if device is not None else torch.device("cpu")
    backend = resolve_backend(backend, device)
    seeds_t, ones = _device_terms([u_seed, v_seed], [1.0, 1.0], device)
    u = _noise(m * rank, seeds_t[:1], ones[:1], row_offset * rank, backend).view(m, rank)
    v = _noise(n * rank, seeds_t[1:], ones[1:], col_offset * rank, backend).view(n, rank)
    return u.to(dtype), v.to(dtype)


def __getattr__(name: str):
    # GraphedPass lives in zofast.graphed (it builds on this module's checks).
    if name == "GraphedPass":
        from zofast.graphed import GraphedPass

        return GraphedPass
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
