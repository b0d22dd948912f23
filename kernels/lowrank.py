"""Low-rank update in place: w (m, n) += sum_t U_t · V_tᵀ, never materialising an m×n product.

Shape contract (shared by the kernel and the reference): w is a contiguous 2-D float32 / bfloat16 /
float16 tensor; u is float32 (T, R, m) and v float32 (T, R, n), both contiguous on w's device
(column k of U contiguous, so loads coalesce; zofast.perturb builds them from seeds: (m + n)·R·T
numbers, a few hundred KiB at most). Per element, in float32: acc = float(w[i, j]) (with a weight
scale a: acc = fl(a · float(w[i, j])), one rounded multiply); for t, then k:
acc = fma(u[t, k, i], v[t, k, j], acc); w[i, j] = round(acc): one rounding to w's dtype per pass,
in an order that no tiling changes. The rounding is to nearest even, or stochastic with a round
seed: element (i, j) takes the word bits(round_seed, row_offset + i, col_offset + j) (the global
row and column; kernels.philox's docstring). With `out` the result goes there, w is only read.
"""

import torch

from ._triton import cdiv, on_device, tl, triton
from .philox import (
    CONTRACT_OPTIONS,
    _check_interpretable,
    load_seed,
    narrow,
    narrow_stochastic,
    normal4,
    round_words_ref,
    stochastic_round_ref,
    triton_interpreting,
)


def default_tile(rank: int, many_tensors: bool = False, row_aligned: bool = True):
    """(BLOCK_M, BLOCK_N). Swept on the H200, bf16, CUDA-graph replayed (bench/results): one
    8192² matrix peaks at 32×128 for every rank (64×128 lost 66 → 59 % of copy at rank 8); the
    multi-tensor pass over OPT-1.3B / 6.7B weights peaks at 32×128 up to rank 4 (97–99 % at
    rank 2) and at 64×64 from rank 8 (62 / 46 % at ranks 8 / 16 against 60 / 40 % for 32×128).
    Rows of a length that is not a multiple of 16 (4099×4093 graph-replayed: 17–36 % of copy at
    ranks 1–8 with 32×128) cannot be loaded in vectors, and Triton then gives each thread one
    column of the tile, so every thread loads its BLOCK_M rows' u per rank; a flat 8×512 tile
    loads 8 (sm_90 PTX: 96 u / v loads per thread at rank 8 against 264; not yet timed:
    bench/probes/eager.py --sweep times both)."""
    if not row_aligned:
        return (8, 512)
    return (64, 64) if many_tensors and rank >= 8 else (32, 128)


@triton.jit
def _lowrank_kernel(
    w_ptr,
    u_ptr,
    v_ptr,
    m,
    n,
    N_TERMS: tl.constexpr,
    RANK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    EXACT: tl.constexpr = True,  # launchers pass it; the default is the GPU's (bench/ scripts)
    out_ptr=None,
    round_seed_ptr=None,
    w_scale_ptr=None,
    row_offset=0,
    col_offset=0,
    COL_ALIGNED: tl.constexpr = True,
):
    """None pointers: in place, round to nearest even, no weight scale (the defaults).
    COL_ALIGNED: col_offset is a multiple of 4 (stochastic rounding draws per 4 columns)."""
    pid = tl.program_id(0).to(tl.int64)
    tiles_n = tl.cdiv(n, BLOCK_N)
    rows = (pid // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    col_start = (pid % tiles_n) * BLOCK_N
    cols = col_start + tl.arange(0, BLOCK_N)
    row_ok = rows < m
    col_ok = cols < n
    offsets = rows[:, None] * n + cols[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    acc = tl.load(w_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if w_scale_ptr is not None:
        acc = acc * tl.load(w_scale_ptr)
    for t in tl.static_range(N_TERMS):
        for k in tl.static_range(RANK):
            u = tl.load(u_ptr + (t * RANK + k) * m + rows, mask=row_ok, other=0.0)
            v = tl.load(v_ptr + (t * RANK + k) * n + cols, mask=col_ok, other=0.0)
            acc = tl.fma(u[:, None], v[None, :], acc)
    dst = w_ptr if out_ptr is None else out_ptr
    if round_seed_ptr is None:
        result = narrow(acc, dst, EXACT)
    else:
        seed_lo, seed_hi = load_seed(round_seed_ptr)
        result = narrow_stochastic(
            acc, dst, seed_lo, seed_hi, row_offset + rows, col_offset + col_start, COL_ALIGNED
        )
    tl.store(dst + offsets, result, mask=mask)


@triton.jit
def _factors_kernel(
    u_ptr,
    v_ptr,
    seeds_ptr,
    scales_ptr,
    m_r,
    n_r,
    u_offset,
    v_offset,
    N_TERMS: tl.constexpr,
    RANK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """U_t[i, k] = scale_t * normal(u_seed_t, u_offset + i·R + k) stored at u[t, k, i], and V_t
    likewise into v[t, k, j]; seeds = [u_seed_0.., v_seed_0..]. Programs cover u, then v."""
    pid = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1)
    u_programs = tl.cdiv(u_offset % 4 + m_r, 4 * BLOCK)
    is_u = pid < u_programs
    offset = tl.where(is_u, u_offset, v_offset)
    count = tl.where(is_u, m_r, n_r)
    blocks = offset // 4 + tl.where(is_u, pid, pid - u_programs) * BLOCK + tl.arange(0, BLOCK)
    local = (blocks * 4 - offset)[:, None] + tl.arange(0, 4)[None, :]
    mask = (local >= 0) & (local < count)
    seed_lo, seed_hi = load_seed(seeds_ptr + tl.where(is_u, t, N_TERMS + t))
    scale = tl.where(is_u, tl.load(scales_ptr + t), 1.0)
    z = normal4(seed_lo, seed_hi, blocks) * scale
    rows = tl.where(is_u, m_r, n_r) // RANK
    transposed = (local % RANK) * rows + local // RANK
    tl.store(tl.where(is_u, u_ptr + t * m_r, v_ptr + t * n_r) + transposed, z, mask=mask)


def factors_triton(
    seeds: torch.Tensor,
    scales: torch.Tensor,
    m: int,
    n: int,
    rank: int,
    row_offset: int,
    col_offset: int,
    block: int = 256,
):
    """Every term's scaled U and its V, stored as u (T, r, m) and v (T, r, n), in one launch;
    seeds = [u_seeds, v_seeds] (int64, 2T) and scales (float32, T) on the output device."""
    _check_interpretable(seeds)
    terms = scales.numel()
    u = torch.empty(terms, rank, m, dtype=torch.float32, device=seeds.device)
    v = torch.empty(terms, rank, n, dtype=torch.float32, device=seeds.device)
    u_offset, v_offset = row_offset * rank, col_offset * rank
    u_programs = cdiv(u_offset % 4 + m * rank, 4 * block)
    v_programs = cdiv(v_offset % 4 + n * rank, 4 * block)
    grid = (u_programs + v_programs, terms)
    with on_device(seeds):
        _factors_kernel[grid](
            u,
            v,
            seeds,
            scales,
            m * rank,
            n * rank,
            u_offset,
            v_offset,
            N_TERMS=terms,
            RANK=rank,
            BLOCK=block,
            **CONTRACT_OPTIONS,
        )
    return u, v


def lowrank_triton(
    w: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    block_m: int | None = None,
    block_n: int | None = None,
    *,
    out: torch.Tensor | None = None,
    round_seed: torch.Tensor | None = None,
    w_scale: torch.Tensor | None = None,
    row_offset: int = 0,
    col_offset: int = 0,
    num_warps: int = 4,
) -> torch.Tensor:
    """Launch the kernel on validated inputs (see the module docstring); returns out (w when
    None). Tiles default to default_tile's (by rank and row alignment). round_seed: a
    one-element int64 tensor (stochastic rounding; ignored for float32 w); w_scale: a
    one-element float32 tensor; both on w's device. row_offset / col_offset: w's first global
    row / column (the rounding words). num_warps: per program (Triton's default, 4;
    bench/probes/eager.py sweeps it)."""
    _check_interpretable(w)
    m, n = w.shape
    if block_m is None or block_n is None:
        block_m, block_n = default_tile(u.shape[1], row_aligned=n % 16 == 0)
    if w.dtype == torch.float32:
        round_seed = None  # nothing to round
    grid = (cdiv(m, block_m) * cdiv(n, block_n),)
    with on_device(w):
        _lowrank_kernel[grid](
            w,
            u,
            v,
            m,
            n,
            N_TERMS=u.shape[0],
            RANK=u.shape[1],
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            EXACT=not triton_interpreting(),
            out_ptr=None if out is w else out,
            round_seed_ptr=round_seed,
            w_scale_ptr=w_scale,
            row_offset=row_offset,
            col_offset=col_offset,
            COL_ALIGNED=col_offset % 4 == 0 and block_n % 4 == 0,
            num_warps=num_warps,
        )
    return w if out is None else out


def lowrank_ref(
    w: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    *,
    round_seed: int | None = None,
    w_scale: float | None = None,
    row_offset: int = 0,
    col_offset: int = 0,
) -> torch.Tensor:
    """Pure-torch reference of the kernel (same fma order); returns a new tensor like w."""
    acc = w.float()
    if w_scale is not None:
        acc = acc * torch.tensor(w_scale, dtype=torch.float32)
    for t in range(u.shape[0]):
        for k in range(u.shape[1]):
            acc = (u[t, k, :, None].double() * v[t, k, None, :].double() + acc.double()).float()
    if round_seed is None:
        return acc.to(w.dtype)
    m, n = acc.shape
    rows = row_offset + torch.arange(m, dtype=torch.int64, device=w.device)
    cols = col_offset + torch.arange(n, dtype=torch.int64, device=w.device)
    words = round_words_ref(round_seed, rows[:, None], cols[None, :])
    return stochastic_round_ref(acc, w.dtype, words)
