"""Times the lowrank_ apply kernel over tile shapes and warp counts (GPU); prints a table.

Usage: python bench/tools/tune_lowrank.py. Inputs: pre-made factors, so only the fused pass is
timed.
"""

import functools
import itertools

import torch
import triton
import triton.testing

from zofast.kernels import lowrank


def main():
    copy_src = torch.empty(2**29, dtype=torch.bfloat16, device="cuda")
    copy_dst = torch.empty_like(copy_src)
    copy_ms = triton.testing.do_bench(lambda: copy_dst.copy_(copy_src), return_mode="median")
    copy_gbps = 4 * copy_src.numel() / copy_ms / 1e6
    print(f"copy {copy_gbps:.0f} GB/s")
    configs = list(itertools.product([16, 32, 64, 128], [64, 128, 256], [4, 8]))
    for dtype, (m, n), rank in itertools.product(
        [torch.bfloat16, torch.float32], [(4096, 4096), (8192, 8192)], [1, 4, 16]
    ):
        w = torch.randn(m, n, device="cuda").to(dtype)
        u = torch.randn(1, rank, m, device="cuda")
        v = torch.randn(1, rank, n, device="cuda")
        results = []
        for block_m, block_n, warps in configs:
            grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)

            args = (w, u, v, m, n)
            run = functools.partial(
                lowrank._lowrank_kernel[grid],
                *args,
                N_TERMS=1,
                RANK=rank,
                BLOCK_M=block_m,
                BLOCK_N=block_n,
                num_warps=warps,
            )
            ms = triton.testing.do_bench(run, warmup=10, rep=40, return_mode="median")
            gbps = 2 * w.numel() * w.element_size() / ms / 1e6
            results.append((gbps, block_m, block_n, warps))
        results.sort(reverse=True)
        best = ", ".join(
            f"{bm}x{bn}/w{nw}: {100 * g / copy_gbps:.0f}%" for g, bm, bn, nw in results[:3]
        )
        worst = results[-1]
        print(f"{dtype} {m}x{n} r{rank}: best {best}; worst {100 * worst[0] / copy_gbps:.0f}%")


if __name__ == "__main__":
    main()
