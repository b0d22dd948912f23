"""Full-rank perturbation in place: w += sum_t scale_t * Z_t, Z_t[i] = normal(seed_t, offset + i).

Shape contract (shared by the kernel and the reference): w is any contiguous float32 / bfloat16 /
float16 tensor read as its row-major flattening; `offset` is the global index of w's first element
in the stream (non-zero for a shard of a larger tensor); seeds is an int64 (T,) tensor holding the
uint64 seeds' bit patterns and scales a float32 (T,) tensor, both on w's device. Arithmetic is
float32: acc = float(w) (with a weight scale a: acc = fl(a · float(w)), one rounded multiply);
acc = fma(scale_t, z_t, acc) for t = 1..T in order; w = round(acc), one rounding to w's dtype per
pass: to nearest even, or stochastic with a round seed, element i taking the word
bits(round_seed, 0, offset + i) (kernels.philox's docstring). With `out` the result goes there
and w is only read.
"""

import torch

from ._triton import cdiv, on_device, tl, triton
from .philox import (
    CONTRACT_OPTIONS,
    _check_interpretable,
    add_normals,
    narrow,
    pass_arguments,
    round_words4,
    round_words_ref,
    sample_ref,
    stochastic_round,
    stochastic_round_ref,
    term_scale,
    term_seed,
    triton_interpreting,
)

DEFAULT_BLOCK = 512  # counter blocks per program: 2048 elements


@triton.jit
def _gaussian_kernel(
    w_ptr,
    seeds,
    scales,
    n,
    offset,
    N_TERMS: tl.constexpr,
    BLOCK: tl.constexpr,
    EXACT: tl.constexpr,
    out_ptr=None,
    round_seed=None,
    w_scale=None,
    TABLE: tl.constexpr = True,
):
    """None: in place, round to nearest even, no weight scale (the defaults). TABLE: seeds,
    scales, round_seed, w_scale are device pointers; otherwise tuples of kernel arguments
    (kernels.philox.term_seed / term_scale)."""
    blocks = offset // 4 + tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    local = (blocks * 4 - offset)[:, None] + tl.arange(0, 4)[None, :]
    mask = (local >= 0) & (local < n)
    acc = tl.load(w_ptr + local, mask=mask, other=0.0).to(tl.float32)
    if w_scale is not None:
        acc = acc * term_scale(w_scale, 0, TABLE)
    acc = add_normals(acc, seeds, scales, blocks, N_TERMS, TABLE)
    dst = w_ptr if out_ptr is None else out_ptr
    if round_seed is None:
        tl.store(dst + local, narrow(acc, dst, EXACT), mask=mask)
    else:
        seed_lo, seed_hi = term_seed(round_seed, 0, TABLE)
        words = round_words4(seed_lo, seed_hi, 0, blocks)
        tl.store(dst + local, stochastic_round(acc, dst, words), mask=mask)


def gaussian_triton(
    w: torch.Tensor,
    seeds,
    scales,
    offset: int,
    block: int = DEFAULT_BLOCK,
    *,
    out: torch.Tensor | None = None,
    round_seed=None,
    w_scale=None,
) -> torch.Tensor:
    """Launch the kernel on validated inputs (see the module docstring); returns out (w when
    None). Either device tables, seeds an int64 and scales a float32 tensor, round_seed a
    one-element int64 and w_scale a one-element float32 tensor (None: off), all on w's device
    (graph-safe); or host values, seeds a list of uint64 ints, scales of float32-exact floats,
    round_seed an int and w_scale a float (None: off), passed as kernel arguments: no device
    table, no copy. round_seed is ignored for float32 w."""
    _check_interpretable(w)
    n = w.numel()
    n_blocks = (offset + n + 3) // 4 - offset // 4
    table, seeds, scales, round_seed, w_scale = pass_arguments(
        w.dtype, seeds, scales, round_seed, w_scale
    )
    with on_device(w):
        _gaussian_kernel[(cdiv(n_blocks, block),)](
            w,
            seeds,
            scales,
            n,
            offset,
            N_TERMS=len(scales),
            BLOCK=block,
            EXACT=not triton_interpreting(),
            out_ptr=None if out is w else out,
            round_seed=round_seed,
            w_scale=w_scale,
            TABLE=table,
            **CONTRACT_OPTIONS,
        )
    return w if out is None else out


def fma_ref(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """float32 a*b + c rounded once (through float64, where a*b is exact)."""
    return (a.double() * b.double() + c.double()).float()


def gaussian_ref(
    w: torch.Tensor,
    seeds: list[int],
    scales: torch.Tensor,
    offset: int,
    round_seed: int | None = None,
    w_scale: float | None = None,
) -> torch.Tensor:
    """Pure-torch reference of the kernel; returns a new tensor shaped and typed like w."""
    index = offset + torch.arange(w.numel(), dtype=torch.int64, device=w.device)
    acc = w.reshape(-1).float()
    if w_scale is not None:
        acc = acc * torch.tensor(w_scale, dtype=torch.float32)
    for seed, scale in zip(seeds, scales.tolist(), strict=True):
        z = sample_ref(index, seed, normal=True)
        acc = fma_ref(torch.tensor(scale, dtype=torch.float32), z, acc)
    if round_seed is None:
        return acc.to(w.dtype).reshape(w.shape)
    words = round_words_ref(round_seed, torch.zeros_like(index), index)
    return stochastic_round_ref(acc, w.dtype, words).reshape(w.shape)
