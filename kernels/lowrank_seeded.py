"""Low-rank update from seeds in one launch: w (m, n) += Σ_t s_t · U_t·V_tᵀ, factors drawn inside.

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
no host-to-device copy) or device tables (TABLE; kernels.philox.term_seed). The pure-torch
reference, lowrank_seeded_ref, draws the factors and applies them with kernels.lowrank.lowrank_ref.
"""

import torch

from ._triton import cdiv, next_power_of_2, on_device, tl, triton
from .lowrank import lowrank_ref
from .philox import (
    CONTRACT_OPTIONS,
    _check_interpretable,
    narrow,
    narrow_stochastic,
    normal4,
    pass_arguments,
    rounded_product,
    sample_ref,
    term_scale,
    term_seed,
    triton_interpreting,
)


def default_tile(rank: int, n: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N): the fastest of bench/probes/eager.py --sweep on the H200 (bf16,
    bench/results/2026-12-03-session8): 64×64 on rows whose length is a multiple of 16 (at
    8192²: 70 / 74 / 104 / 194 µs at ranks 1 / 2 / 4 / 8, against 32×128's 69 / 76 / 176 / 337);
    on other rows 16×256 up to rank 4 (4099×4093: 30 / 41 / 47 µs against 32×128's 35 / 46 /
    51) and 64×64 above (81 µs at rank 8 against 16×256's 96)."""
    return (16, 256) if n % 16 and rank <= 4 else (64, 64)


@triton.jit
def _segment(
    seeds, scales, G: tl.constexpr, first, N_BLOCKS: tl.constexpr, N_TERMS, SAME_V, EXACT, TABLE
):
    """Normals 4·first .. 4·(first + N_BLOCKS) − 1, flattened: of group G's merged u, Σ fl(s_t·U_t)
    in term order over terms G, G + 1, ... while SAME_V joins them (scales given), or of its v
    seed (scales None). Computed once per program in a 1-D layout (no thread computes another's
    values), then gathered per rank."""
    blocks = first + tl.arange(0, N_BLOCKS).to(tl.int64)
    if scales is None:
        lo, hi = term_seed(seeds, N_TERMS + G, TABLE)
        z = normal4(lo, hi, blocks)
    else:
        lo, hi = term_seed(seeds, G, TABLE)
        z = rounded_product(normal4(lo, hi, blocks), term_scale(scales, G, TABLE), EXACT)
        for t in tl.static_range(G + 1, N_TERMS):
            if ((SAME_V >> (G + 1)) & ((1 << (t - G)) - 1)) == (1 << (t - G)) - 1:
                lo, hi = term_seed(seeds, t, TABLE)
                z += rounded_product(normal4(lo, hi, blocks), term_scale(scales, t, TABLE), EXACT)
    return tl.reshape(z, (4 * N_BLOCKS,))


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
    U_BLOCKS: tl.constexpr,
    V_BLOCKS: tl.constexpr,
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
    nearest even, no weight scale. U_BLOCKS / V_BLOCKS: Philox blocks that cover a tile's rows'
    / columns' stream indices (segment_blocks). COL_ALIGNED: col_offset a multiple of 4
    (kernels.lowrank)."""
    pid = tl.program_id(0).to(tl.int64)
    tiles_n = tl.cdiv(n, BLOCK_N)
    row_start = (pid // tiles_n) * BLOCK_M
    col_start = (pid % tiles_n) * BLOCK_N
    rows = row_start + tl.arange(0, BLOCK_M)
    cols = col_start + tl.arange(0, BLOCK_N)
    offsets = rows[:, None] * n + cols[None, :]
    mask = (rows < m)[:, None] & (cols < n)[None, :]
    acc = tl.load(w_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if w_scale is not None:
        acc = acc * term_scale(w_scale, 0, TABLE)
    # Stream index of U[i, k]: (row_offset + i)·RANK + k; position in the tile's u segment:
    # that less 4·u_first (the same for V with columns).
    u_first = (row_offset + row_start) * RANK // 4
    v_first = (col_offset + col_start) * RANK // 4
    u_at = ((row_offset + rows) * RANK - 4 * u_first).to(tl.int32)
    v_at = ((col_offset + cols) * RANK - 4 * v_first).to(tl.int32)
    for g in tl.static_range(N_TERMS):
        if ((SAME_V >> g) & 1) == 0:  # term g opens a group
            u = _segment(seeds, scales, g, u_first, U_BLOCKS, N_TERMS, SAME_V, EXACT, TABLE)
            v = _segment(seeds, None, g, v_first, V_BLOCKS, N_TERMS, SAME_V, EXACT, TABLE)
            for k in tl.static_range(RANK):
                u_k = tl.gather(u, u_at + k, 0)
                v_k = tl.gather(v, v_at + k, 0)
                acc = tl.fma(u_k[:, None], v_k[None, :], acc)
    dst = w_ptr if out_ptr is None else out_ptr
    if round_seed is None:
        result = narrow(acc, dst, EXACT)
    else:
        seed_lo, seed_hi = term_seed(round_seed, 0, TABLE)
        result = narrow_stochastic(
            acc, dst, seed_lo, seed_hi, row_offset + rows, col_offset + col_start, COL_ALIGNED
        )
    tl.store(dst + offsets, result, mask=mask)


def segment_blocks(count: int, rank: int) -> int:
    """Philox blocks (a power of two) that hold the stream indices of `count` consecutive rows
    (or columns) at `rank`: count·rank normals, starting up to 3 into a block unless 4 | rank."""
    return next_power_of_2(cdiv(count * rank + (3 if rank % 4 else 0), 4))


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
    v_seeds = [v_seeds[t] for t in order]
    same_v = sum(1 << i for i in range(1, len(order)) if v_seeds[i] == v_seeds[i - 1])
    return [u_seeds[t] for t in order], v_seeds, [scales[t] for t in order], same_v


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
    ignored for float32 w; tiles default to default_tile."""
    _check_interpretable(w)
    m, n = w.shape
    if block_m is None or block_n is None:
        block_m, block_n = default_tile(rank, n)
    table, seeds, scales, round_seed, w_scale = pass_arguments(
        w.dtype, seeds, scales, round_seed, w_scale
    )
    grid = (cdiv(m, block_m) * cdiv(n, block_n),)
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
            U_BLOCKS=segment_blocks(block_m, rank),
            V_BLOCKS=segment_blocks(block_n, rank),
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


def lowrank_seeded_ref(
    w: torch.Tensor,
    u_seeds: list[int],
    v_seeds: list[int],
    scales: list[float],
    rank: int,
    *,
    round_seed: int | None = None,
    w_scale: float | None = None,
    row_offset: int = 0,
    col_offset: int = 0,
) -> torch.Tensor:
    """Pure-torch reference of the kernel, terms in any order (grouped as group_terms does);
    returns a new tensor like w. Its normals are kernels.philox.sample_ref's, which may differ
    from Triton's in their last bits (libm's log / sin / cos)."""
    u_seeds, v_seeds, scales, same_v = group_terms(u_seeds, v_seeds, scales)
    m, n = w.shape
    k = torch.arange(rank, dtype=torch.int64, device=w.device)
    u_index = ((row_offset + torch.arange(m, device=w.device))[:, None] * rank + k).reshape(-1)
    v_index = ((col_offset + torch.arange(n, device=w.device))[:, None] * rank + k).reshape(-1)
    us, vs = [], []
    for t, (u_seed, v_seed, scale) in enumerate(zip(u_seeds, v_seeds, scales, strict=True)):
        u = sample_ref(u_index, u_seed, normal=True).view(m, rank).T
        u = u * torch.tensor(scale, dtype=torch.float32)
        if same_v >> t & 1:
            us[-1] = us[-1] + u
        else:
            us.append(u)
            vs.append(sample_ref(v_index, v_seed, normal=True).view(n, rank).T)
    return lowrank_ref(
        w,
        torch.stack(us).contiguous(),
        torch.stack(vs).contiguous(),
        round_seed=round_seed,
        w_scale=w_scale,
        row_offset=row_offset,
        col_offset=col_offset,
    )
