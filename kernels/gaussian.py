"""Full-rank perturbation in place: w += sum_t scale_t * Z_t, Z_t[i] = normal(seed_t, offset + i).

Shape contract (shared by the kernel and the reference): w is any contiguous float32 / bfloat16 /
float16 tensor read as its row-major flattening; `offset` is the global index of w's first element
in the stream (non-zero for a shard of a larger tensor); seeds is an int64 (T,) tensor holding the
uint64 seeds' bit patterns and scales a float32 (T,) tensor, both on w's device. Arithmetic is
float32: acc = float(w); acc = fma(scale_t, z_t, acc) for t = 1..T in order; w = round(acc), one
rounding to w's dtype per pass.
"""

import torch
import triton
import triton.language as tl

from .philox import (
    CONTRACT_OPTIONS,
    _check_interpretable,
    add_normals,
    narrow,
    sample_ref,
    triton_interpreting,
)

DEFAULT_BLOCK = 512  # counter blocks per program: 2048 elements


@triton.jit
def _gaussian_kernel(
    w_ptr,
    seeds_ptr,
    scales_ptr,
    n,
    offset,
    N_TERMS: tl.constexpr,
    BLOCK: tl.constexpr,
    EXACT: tl.constexpr,
):
    blocks = offset // 4 + tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    local = (blocks * 4 - offset)[:, None] + tl.arange(0, 4)[None, :]
    mask = (local >= 0) & (local < n)
    acc = tl.load(w_ptr + local, mask=mask, other=0.0).to(tl.float32)
    acc = add_normals(acc, seeds_ptr, scales_ptr, blocks, N_TERMS)
    tl.store(w_ptr + local, narrow(acc, w_ptr, EXACT), mask=mask)


def gaussian_triton(
    w: torch.Tensor,
    seeds: torch.Tensor,
    scales: torch.Tensor,
    offset: int,
    block: int = DEFAULT_BLOCK,
) -> torch.Tensor:
    """Launch the kernel on validated inputs (see the module docstring); returns w."""
    _check_interpretable(w)
    n = w.numel()
    n_blocks = (offset + n + 3) // 4 - offset // 4
    _gaussian_kernel[(triton.cdiv(n_blocks, block),)](
        w,
        seeds,
        scales,
        n,
        offset,
        N_TERMS=seeds.numel(),
        BLOCK=block,
        EXACT=not triton_interpreting(),
        **CONTRACT_OPTIONS,
    )
    return w


def fma_ref(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """float32 a*b + c rounded once (through float64, where a*b is exact)."""
    return (a.double() * b.double() + c.double()).float()


def gaussian_ref(
    w: torch.Tensor, seeds: list[int], scales: torch.Tensor, offset: int
) -> torch.Tensor:
    """Pure-torch reference of the kernel; returns a new tensor shaped and typed like w."""
    index = offset + torch.arange(w.numel(), dtype=torch.int64, device=w.device)
    acc = w.reshape(-1).float()
    for seed, scale in zip(seeds, scales.tolist(), strict=True):
        z = sample_ref(index, seed, normal=True)
        acc = fma_ref(torch.tensor(scale, dtype=torch.float32), z, acc)
    return acc.to(w.dtype).reshape(w.shape)
