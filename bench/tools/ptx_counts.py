"""Per-thread instruction counts of the low-rank kernels compiled for sm_90, on a machine without
a GPU: how many Philox calls, shared-memory and global loads each thread issues per tile.

Usage (repo root): TRITON_INTERPRET=0 python bench/tools/ptx_counts.py
Prints one line per (row alignment, rank, tile, warps): the one-launch kernel's Philox calls
(mul.hi.u32 / 20), shared-memory ops and barriers, and the apply kernel's global loads. The
static counts of unrolled code; the GPU sweep (bench/probes/eager.py --sweep) times them.
"""

import re

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from zofast.kernels import lowrank, lowrank_seeded

TILES = [(32, 128, 4), (8, 512, 4), (16, 256, 4), (64, 128, 8)]


def compiled(fn, types: dict, constants: dict, aligned: list[str], warps: int):
    names = fn.arg_names
    signature = {name: types.get(name, "constexpr") for name in names}
    src = ASTSource(
        fn,
        signature,
        constexprs={(names.index(k),): v for k, v in constants.items()},
        attrs={(names.index(k),): [["tt.divisibility", 16]] for k in aligned},
    )
    options = {"num_warps": warps, "enable_fp_fusion": True}
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]


def count(ptx: str, pattern: str) -> int:
    return len(re.findall(pattern, ptx))


def main() -> None:
    common = dict(row_offset=0, col_offset=0, COL_ALIGNED=True, EXACT=True, out_ptr=None)
    for row_aligned in (True, False):
        aligned = ["w_ptr", "u_ptr", "v_ptr"] + (["m", "n"] if row_aligned else [])
        for rank in (1, 2, 4, 8):
            for bm, bn, warps in TILES:
                seeded = compiled(
                    lowrank_seeded._lowrank_seeded_kernel,
                    {"w_ptr": "*bf16", "m": "i32", "n": "i32", "seeds": ("i32",) * 4},
                    dict(
                        common,
                        scales=(1e-3,),
                        N_TERMS=1,
                        SAME_V=0,
                        RANK=rank,
                        BLOCK_M=bm,
                        BLOCK_N=bn,
                        U_BLOCKS=lowrank_seeded.segment_blocks(bm, rank),
                        V_BLOCKS=lowrank_seeded.segment_blocks(bn, rank),
                        TABLE=False,
                        round_seed=None,
                        w_scale=None,
                    ),
                    [a for a in aligned if a in ("w_ptr", "m", "n")],
                    warps,
                )
                apply = compiled(
                    lowrank._lowrank_kernel,
                    {"w_ptr": "*bf16", "u_ptr": "*fp32", "v_ptr": "*fp32", "m": "i32", "n": "i32"},
                    dict(
                        common,
                        N_TERMS=1,
                        RANK=rank,
                        BLOCK_M=bm,
                        BLOCK_N=bn,
                        round_seed_ptr=None,
                        w_scale_ptr=None,
                    ),
                    aligned,
                    warps,
                )
                philox = count(seeded, r"mul\.hi\.u32") // 20
                shared = count(seeded, r"(st|ld)\.shared")
                barriers = count(seeded, r"bar\.sync")
                loads = count(apply, r"ld\.global")
                print(
                    f"rows aligned {row_aligned!s:5} rank {rank} tile {bm}x{bn} warps {warps}: "
                    f"seeded philox {philox}, shared {shared}, barriers {barriers}"
                    f" | apply global loads {loads}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
