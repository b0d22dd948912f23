"""Experiment: the low-rank update's k-loop of explicit fmas against tl.dot(ieee) (Triton's FMA
dot, which accumulates in k order onto the given accumulator), bit equality and speed, bf16
8192², on a GPU. Usage: python bench/tools/tune_dot.py"""

import functools

import torch
import triton
import triton.language as tl
import triton.testing

from zofast.kernels.lowrank import _lowrank_kernel


@triton.jit
def _dot_kernel(
    w_ptr,
    u_ptr,
    v_ptr,
    m,
    n,
    RANK: tl.constexpr,
    K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    tiles_n = tl.cdiv(n, BLOCK_N)
    rows = (pid // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (pid % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, K)
    row_ok = rows < m
    col_ok = cols < n
    ptrs = w_ptr + rows[:, None] * n + cols[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    acc = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    # Padding k >= RANK: u = -0.0 and v = +0.0, so each padded fma adds -0.0 (acc unchanged).
    u = tl.load(
        u_ptr + ks[None, :] * m + rows[:, None],
        mask=row_ok[:, None] & (ks[None, :] < RANK),
        other=-0.0,
    )
    v = tl.load(
        v_ptr + ks[:, None] * n + cols[None, :],
        mask=(ks[:, None] < RANK) & col_ok[None, :],
        other=0.0,
    )
    acc = tl.dot(u, v, acc, input_precision="ieee")
    tl.store(ptrs, acc.to(w_ptr.dtype.element_ty), mask=mask)


def grid(m: int, n: int, bm: int, bn: int) -> tuple[int]:
    return (triton.cdiv(m, bm) * triton.cdiv(n, bn),)


def main():
    m = n = 8192
    w0 = (torch.randn(m, n, device="cuda") * 0.02).to(torch.bfloat16)
    copy_src = torch.empty(2**29, dtype=torch.bfloat16, device="cuda")
    copy_dst = torch.empty_like(copy_src)
    copy_ms = triton.testing.do_bench(lambda: copy_dst.copy_(copy_src), return_mode="median")
    copy_gbps = 2 * copy_src.numel() * 2 / copy_ms / 1e6
    bytes_moved = 2 * w0.numel() * 2
    print(f"copy {copy_gbps:.0f} GB/s")
    for rank in (4, 8, 16):
        u = torch.randn(1, rank, m, device="cuda")
        v = torch.randn(1, rank, n, device="cuda")
        ref = w0.clone()
        _lowrank_kernel[grid(m, n, 32, 128)](
            ref, u, v, m, n, N_TERMS=1, RANK=rank, BLOCK_M=32, BLOCK_N=128
        )
        results = []
        configs = [
            (32, 128, 4),
            (64, 64, 4),
            (64, 64, 2),
            (64, 128, 4),
            (64, 128, 8),
            (128, 128, 8),
        ]
        for bm, bn, warps in configs:
            launch = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps}
            loop = functools.partial(
                _lowrank_kernel[grid(m, n, bm, bn)],
                w0.clone(),
                u,
                v,
                m,
                n,
                N_TERMS=1,
                RANK=rank,
                **launch,
            )
            pct = 100 * bytes_moved / triton.testing.do_bench(loop, return_mode="median") / 1e6
            results.append((f"loop {bm}x{bn}/w{warps}", pct / copy_gbps, True))
            w = w0.clone()
            dot = functools.partial(
                _dot_kernel[grid(m, n, bm, bn)], w, u, v, m, n, RANK=rank, K=16, **launch
            )
            try:
                dot()
            except Exception as error:  # noqa: BLE001
                results.append((f"dot  {bm}x{bn}/w{warps} failed: {str(error)[:80]}", 0.0, False))
                continue
            same = torch.equal(w, ref)
            pct = 100 * bytes_moved / triton.testing.do_bench(dot, return_mode="median") / 1e6
            results.append((f"dot  {bm}x{bn}/w{warps}", pct / copy_gbps, same))
        for name, pct, same in sorted(results, key=lambda r: -r[1]):
            print(f"rank {rank:2d} {name}: {pct:5.1f} % of copy, bit-identical to the loop: {same}")


if __name__ == "__main__":
    main()
