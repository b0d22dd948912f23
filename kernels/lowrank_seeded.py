"""Low-rank update from seeds in one launch: w (m, n) += Σ_t s_t · U_t·V_tᵀ, factors drawn in-kernel.

The eager form of zofast.perturb.lowrank_. Instead of a factor kernel that writes u (T, r, m) and
v (T, r, n) for kernels.lowrank's apply kernel, each program draws the values its tile needs:
its rows' U_t[i, k] = normal(u_seed_t, (row_offset + i)·r + k) and its columns'
V_t[j, k] = normal(v_seed_t, (col_offset + j)·r + k), pure functions of (seed, index), r·(BM + BN)
normals per BM×BN tile. The bits are those of the two-kernel path (kernels.lowrank's docstring):
u_t = fl(s_t·U_t); terms that share a v seed form a group whose u is Σ fl(s_t·U_t) in term order
(each sum rounded); acc = fl(w_scale · float(w)); for each group, then k,
acc = fma(u_g[i, k], V_g[j, k], acc); one rounding per element (to nearest even, or stochastic).

Shape contract: w (and out) contiguous 2-D float32 / bfloat16 / float16. Terms come grouped:
SAME_V bit t set when term t shares term t − 1's v seed (lowrank_seeded_triton sorts them so).
Seeds, scales, round seed and weight scale are kernel arguments (a few terms: no device table and
no host-to-device copy) or device tables (TABLE; kernels.philox.term_seed). The reference:
zofast.perturb's torch backend (factors from kernels.philox.sample_ref, kernels.lowrank.lowrank_ref).
"""

import torch

from ._triton import on_device, tl, triton
from .lowrank import default_tile
from .philox import (
    CONTRACT_OPTIONS,
    _check_interpretable,
    narrow,
    narrow_stochastic,
    normal_pair,
    rounded_product,
    seed_words,
    term_scale,
    term_seed,
    triton_interpreting,
)

MAX_SCALAR_TERMS = 4  # terms passed as kernel arguments; more go through a device table


@triton.jit
def _factor_pair(seed_lo, seed_hi, first, k: tl.constexpr, RANK: tl.constexpr):
    """normal(seed, first·RANK + k) and normal(seed, first·RANK + k + 1) for int64 global row /
    column indices `first`: one Box-Muller pair for an even rank (the index is even), else the
    pairs that hold each (the second is dead code, removed, where k + 1 = RANK)."""
    index = first * RANK + k
    a, b = normal_pair(seed_lo, seed_hi, index)
    if RANK % 2 == 0:
        return a, b
    c, _ = normal_pair(seed_lo, seed_hi, index + 1)
    odd = (index & 1) != 0
    return tl.where(odd, b, a), tl.where(odd, c, b)


@triton.jit
def _group_u(
    seeds, scales, rows, G: tl.constexpr, k: tl.constexpr, N_TERMS, SAME_V, RANK, EXACT, TABLE
):
    """Group G's u at ranks k and k + 1 for global rows `rows`: Σ fl(s_t·U_t) over terms G, G + 1,
    ... while SAME_V joins them, summed in term order."""
    lo, hi = term_seed(seeds, G, TABLE)
    z0, z1 = _factor_pair(lo, hi, rows, k, RANK)
    s = term_scale(scales, G, TABLE)
    u0 = rounded_product(z0, s, EXACT)
    u1 = rounded_product(z1, s, EXACT)
    for t in tl.static_range(G + 1, N_TERMS):
        span: tl.constexpr = (1 << (t - G)) - 1
        if ((SAME_V >> (G + 1)) & span) == span:
            lo, hi = term_seed(seeds, t, TABLE)
            z0, z1 = _factor_pair(lo, hi, rows, k, RANK)
            s = term_scale(scales, t, TABLE)
            u0 += rounded_product(z0, s, EXACT)
            u1 += rounded_product(z1, s, EXACT)
    return u0, u1


@triton.jit
def _lowrank_seeded_kernel(
    w_ptr,
    m,
    n,
    seeds,
    scales,
    N_TERMS: tl.constexpr,
    SAME_V: tl.constexpr,
    RANK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    EXACT: tl.constexpr,
    TABLE: tl.constexpr,
    out_ptr=None,
    round_seed=None,
    w_scale=None,
    row_offset=0,
    col_offset=0,
    COL_ALIGNED: tl.constexpr = True,
):
    """seeds: N_TERMS u seeds then N_TERMS v seeds (term_seed); None: in place, round to
    nearest even, no weight scale. COL_ALIGNED: col_offset a multiple of 4 (kernels.lowrank)."""
    pid = tl.program_id(0).to(tl.int64)
    tiles_n = tl.cdiv(n, BLOCK_N)
    rows = (pid // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    col_start = (pid % tiles_n) * BLOCK_N
    cols = col_start + tl.arange(0, BLOCK_N)
    offsets = rows[:, None] * n + cols[None, :]
    mask = (rows < m)[:, None] & (cols < n)[None, :]
    acc = tl.load(w_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if w_scale is not None:
        acc = acc * term_scale(w_scale, 0, TABLE)
    global_rows = row_offset + rows
    global_cols = col_offset + cols
    for g in tl.static_range(N_TERMS):
        if ((SAME_V >> g) & 1) == 0:  # term g opens a group
            v_lo, v_hi = term_seed(seeds, N_TERMS + g, TABLE)
            for k in tl.static_range(0, RANK, 2):
                u0, u1 = _group_u(
                    seeds, scales, global_rows, g, k, N_TERMS, SAME_V, RANK, EXACT, TABLE
                )
                v0, v1 = _factor_pair(v_lo, v_hi, global_cols, k, RANK)
                acc = tl.fma(u0[:, None], v0[None, :], acc)
                if k + 1 < RANK:
                    acc = tl.fma(u1[:, None], v1[None, :], acc)
    dst = w_ptr if out_ptr is None else out_ptr
    if round_seed is None:
        result = narrow(acc, dst, EXACT)
    else:
        seed_lo, seed_hi = term_seed(round_seed, 0, TABLE)
        result = narrow_stochastic(
            acc, dst, seed_lo, seed_hi, global_rows, col_start + col_offset, COL_ALIGNED
        )
    tl.store(dst + offsets, result, mask=mask)


def group_terms(u_seeds: list[int], v_seeds: list[int], scales: list[float]):
    """The terms in kernel order, (u_seeds, v_seeds, scales, SAME_V): groups of one v seed in
    order of first appearance, each group's terms in their order (the order in which the
    two-kernel path sums and applies them); SAME_V bit t: term t joins term t − 1's group."""
    if len(set(v_seeds)) == len(v_seeds):
        return u_seeds, v_seeds, scales, 0
    groups: dict[int, list[int]] = {}
    for t, v_seed in enumerate(v_seeds):
        groups.setdefault(v_seed, []).append(t)
    order = [t for ts in groups.values() for t in ts]
    same_v = sum(1 << i for i in range(1, len(order)) if v_seeds[order[i]] == v_seeds[order[i - 1]])
    return [u_seeds[t] for t in order], [v_seeds[t] for t in order], [scales[t] for t in order], same_v


def lowrank_seeded_triton(
    w: torch.Tensor,
    seeds,
    scales,
    rank: int,
    same_v: int = 0,
    block_m: int | None = None,
    block_n: int | None = None,
    *,
    out: torch.Tensor | None = None,
    round_seed=None,
    w_scale=None,
    row_offset: int = 0,
    col_offset: int = 0,
    num_warps: int = 4,
) -> torch.Tensor:
    """Launch the kernel on validated inputs, terms in group_terms' order (module docstring);
    returns out (w when None). Host values: seeds the T u seeds then the T v seeds (uint64 ints),
    scales T float32-exact floats, round_seed an int and w_scale a float (None: off), passed as
    kernel arguments. Device tables (int64 seeds (2T,), float32 scales (T,), one-element round
    seed / weight scale tensors, on w's device): the same kernel reading them. round_seed is
    ignored for float32 w; tiles default to default_tile's."""
    _check_interpretable(w)
    m, n = w.shape
    if block_m is None or block_n is None:
        block_m, block_n = default_tile(rank, row_aligned=n % 16 == 0)
    if w.dtype == torch.float32:
        round_seed = None  # nothing to round
    table = isinstance(seeds, torch.Tensor)
    if not table:
        seeds, scales = seed_words(seeds), tuple(scales)
        round_seed = None if round_seed is None else seed_words([round_seed])
        w_scale = None if w_scale is None else (w_scale,)
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    with on_device(w):
        _lowrank_seeded_kernel[grid](
            w,
            m,
            n,
            seeds,
            scales,
            N_TERMS=len(scales),
            SAME_V=same_v,
            RANK=rank,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            EXACT=not triton_interpreting(),
            TABLE=table,
            out_ptr=None if out is w else out,
            round_seed=round_seed,
            w_scale=w_scale,
            row_offset=row_offset,
            col_offset=col_offset,
            COL_ALIGNED=col_offset % 4 == 0 and block_n % 4 == 0,
            num_warps=num_warps,
            **CONTRACT_OPTIONS,
        )
    return w if out is None else out
