"""Probe: low-rank apply-kernel variants (pre-made factors) and a PDL factor->apply pair, bf16.
Prints JSON lines; python lowrank.py."""

import functools
import json
import sys

import torch
import triton
import triton.testing

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import variants  # noqa: E402

from zofast.kernels import lowrank  # noqa: E402


def bench(fn):
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


src = torch.empty(2**29, dtype=torch.bfloat16, device="cuda")
dst = torch.empty_like(src)
copy_gbps = 4 * src.numel() / bench(lambda: dst.copy_(src)) / 1e6
print(json.dumps({"copy_gbps": copy_gbps}), flush=True)

CONFIGS = [
    ("current", 32, 128, 4),
    ("even", 32, 128, 4),
    ("even", 64, 64, 4),
    ("even", 64, 64, 8),
    ("even", 64, 128, 8),
    ("even", 128, 64, 8),
    ("even", 32, 64, 4),
    ("even", 128, 128, 8),
]


def apply_launch(kind, w, u, v, rank, bm, bn, warps):
    m, n = w.shape
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    if kind == "current":
        kernel, extra = lowrank._lowrank_kernel[grid], {"N_TERMS": 1}
    else:
        kernel, extra = variants.lowrank_even[grid], {}
    return functools.partial(
        kernel, w, u, v, m, n, RANK=rank, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, **extra
    )


for m, n in [(4096, 4096), (8192, 8192), (5120, 20480)]:
    for rank in [1, 2, 4, 8, 16]:
        w = torch.randn(m, n, device="cuda").to(torch.bfloat16)
        u = torch.randn(1, rank, m, device="cuda")
        v = torch.randn(1, rank, n, device="cuda")
        for kind, bm, bn, warps in CONFIGS:
            ms = bench(apply_launch(kind, w, u, v, rank, bm, bn, warps))
            pct = 100 * 2 * w.numel() * 2 / ms / 1e6 / copy_gbps
            row = {"shape": [m, n], "rank": rank, "kind": kind, "tile": [bm, bn]}
            print(json.dumps({**row, "warps": warps, "us": ms * 1e3, "pct": pct}), flush=True)


def pdl_pair(w, uv, rank, pdl):
    """A factor-sized normal kernel, then the apply kernel that loads w before waiting."""
    m, n = w.shape
    u, v = uv[: rank * m], uv[rank * m :]
    grid = (triton.cdiv(m, 32) * triton.cdiv(n, 128),)

    def pair():
        variants.factors_pdl[(triton.cdiv(uv.numel(), 1024),)](uv, uv.numel(), 1, 2, BLOCK=256)
        variants.lowrank_pdl[grid](
            w, u, v, m, n, RANK=rank, BLOCK_M=32, BLOCK_N=128, launch_pdl=pdl
        )

    return pair


for m, n in [(4096, 4096), (8192, 8192)]:
    for rank in [1, 2, 8]:
        w = torch.randn(m, n, device="cuda").to(torch.bfloat16)
        uv = torch.empty(rank * (m + n), device="cuda")
        for pdl in [False, True]:
            pair = pdl_pair(w, uv, rank, pdl)
            try:
                pair()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    pair()
                pct = {
                    f"{how}_pct": 100 * 4 * w.numel() / bench(fn) / 1e6 / copy_gbps
                    for how, fn in (("graph", g.replay), ("eager", pair))
                }
                print(json.dumps({"pdl": pdl, "shape": [m, n], "rank": rank, **pct}), flush=True)
            except Exception as e:  # noqa: BLE001
                print(json.dumps({"pdl": pdl, "error": repr(e)[:300]}), flush=True)
