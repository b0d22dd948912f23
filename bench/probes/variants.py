"""Kernel variants timed by lowrank.py (probes, not the engine)."""

import triton
import triton.language as tl

from zofast.kernels.philox import normal4


@triton.jit
def lowrank_even(
    w_ptr,
    u_ptr,
    v_ptr,
    m,
    n,
    RANK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """The apply kernel with 2-D u / v loads and no masks: shapes that divide by the tile."""
    pid = tl.program_id(0).to(tl.int64)
    tiles_n = tl.cdiv(n, BLOCK_N)
    rows = ((pid // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M))[:, None]
    cols = ((pid % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N))[None, :]
    ptrs = w_ptr + rows * n + cols
    acc = tl.load(ptrs).to(tl.float32)
    for k in tl.static_range(RANK):
        acc = tl.fma(tl.load(u_ptr + k * m + rows), tl.load(v_ptr + k * n + cols), acc)
    tl.store(ptrs, acc.to(w_ptr.dtype.element_ty))


@triton.jit
def factors_pdl(out_ptr, count, seed_lo, seed_hi, BLOCK: tl.constexpr):
    """Stand-in factor kernel: count normals (same cost per number as the real one)."""
    tl.extra.cuda.gdc_launch_dependents()
    blocks = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    local = blocks[:, None] * 4 + tl.arange(0, 4)[None, :]
    z = normal4(seed_lo, seed_hi, blocks)
    tl.store(out_ptr + local, z, mask=local < count)


@triton.jit
def lowrank_pdl(
    w_ptr, u_ptr, v_ptr, m, n, RANK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
):
    pid = tl.program_id(0).to(tl.int64)
    tiles_n = tl.cdiv(n, BLOCK_N)
    rows = ((pid // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M))[:, None]
    cols = ((pid % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N))[None, :]
    ptrs = w_ptr + rows * n + cols
    acc = tl.load(ptrs).to(tl.float32)
    tl.extra.cuda.gdc_wait()
    for k in tl.static_range(RANK):
        acc = tl.fma(tl.load(u_ptr + k * m + rows), tl.load(v_ptr + k * n + cols), acc)
    tl.store(ptrs, acc.to(w_ptr.dtype.element_ty))
