"""Every store of a weight rounds its float32 result to the weight's dtype once, to nearest even,
on every backend: the bits equal torch's `.to(dtype)` of the float32 result. Triton's interpreter
truncates float32 -> bfloat16 (3.9), so its kernels store through kernels.philox.narrow."""

import pytest
import torch
import triton
import triton.language as tl
from helpers_backends import CPU_BACKENDS

from zofast import perturb
from zofast.kernels import lowrank as lowrank_kernels
from zofast.kernels.philox import narrow, triton_interpreting

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON = triton_interpreting() or torch.cuda.is_available()
needs_triton = pytest.mark.skipif(not TRITON, reason="Triton runs CPU tensors only interpreted")
NARROW = [torch.bfloat16, torch.float16]

# float32 bit patterns around the roundings to bfloat16 and float16, and the same negated.
EDGE_GROUPS = {
    "bf16 tie 1 + 2^-8 (to even: 1), below, above": (0x3F808000, 0x3F807FFF, 0x3F808001),
    "bf16 tie 1 + 3·2^-8 (to even: up), below, above": (0x3F818000, 0x3F817FFF, 0x3F818001),
    "9.2379: truncated to 9.1875 by the interpreter, rounded 9.25": (0x4113CD3A,),
    "float16 ties at 1 + 2^-11 and 1 + 3·2^-11, around": (0x3F801000, 0x3F803000, 0x3F800FFF),
    "inf, float32 max, the last to finite bf16, tie to inf, tie below": (
        0x7F800000,
        0x7F7FFFFF,
        0x7F7F7FFF,
        0x7F7F8000,
        0x7F7E8000,
    ),
    "float16 65504, the last value to it, the tie to inf": (0x477FE000, 0x477FEFFF, 0x477FF000),
    "zero, float32 subnormals and their bf16 ties": (0x0, 0x1, 0x7FFF, 0x8000, 0x8001, 0x18000),
    "the largest subnormal (to the smallest normal), the smallest normal": (0x7FFFFF, 0x800000),
    "float16 subnormals: ties 2^-25, 3·2^-25, around, 2^-24": (
        0x33000000,
        0x33000001,
        0x33400000,
        0x33800000,
    ),
    "NaNs: quiet, signalling, all ones, the largest signalling": (
        0x7FC00000,
        0x7F800001,
        0x7FFFFFFF,
        0x7FBFFFFF,
    ),
}
EDGES = [bits for group in EDGE_GROUPS.values() for bits in group]
EDGES += [bits | 0x80000000 for bits in EDGES]  # the same, negative


@triton.jit
def _narrow_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr, EXACT: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + i, narrow(tl.load(x_ptr + i, mask=i < n), y_ptr, EXACT), mask=i < n)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


@needs_triton
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # numpy, fp16
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_narrow_rounds_like_torch(dtype, fresh_seed):
    gen = torch.Generator().manual_seed(fresh_seed % 2**32)
    words = torch.tensor(EDGES, dtype=torch.int64)
    words = torch.cat([words, torch.randint(0, 2**32, (4096,), generator=gen)])
    x = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).view(torch.float32)
    y = torch.empty(x.shape, dtype=dtype, device=DEVICE)
    block = 1024
    _narrow_kernel[(triton.cdiv(x.numel(), block),)](
        x.to(DEVICE), y, x.numel(), BLOCK=block, EXACT=not triton_interpreting()
    )
    y = y.cpu()
    nan = torch.isnan(x)
    want = x.to(dtype)
    assert torch.equal(bits(y)[~nan], bits(want)[~nan]), f"seed {fresh_seed}"
    assert torch.isnan(y[nan]).all()
    if triton_interpreting() and dtype == torch.bfloat16:
        # The GPU's canonical NaN (torch's CPU cast gives 0xFFFF or 0x7FC0, the C++ path 0x7FC0).
        assert (bits(y)[nan] == 0x7FFF).all()


@needs_triton
@pytest.mark.parametrize("dtype", NARROW + [torch.float32])
def test_lowrank_apply_equals_reference_bit_for_bit(dtype, fresh_seed):
    gen = torch.Generator().manual_seed(fresh_seed % 2**32)
    w = torch.randn(67, 93, generator=gen).to(dtype).to(DEVICE)
    u = (0.1 * torch.randn(2, 3, 67, generator=gen)).to(DEVICE)
    v = torch.randn(2, 3, 93, generator=gen).to(DEVICE)
    got = lowrank_kernels.lowrank_triton(w.clone(), u, v, block_m=16, block_n=32)
    want = lowrank_kernels.lowrank_ref(w, u, v)
    assert torch.equal(bits(got), bits(want)), f"seed {fresh_seed}"


@pytest.mark.parametrize("dtype", NARROW)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_narrow_weights_take_the_float32_result_rounded_once(backend, dtype, fresh_seed):
    # The same fmas on a float32 copy (widening is exact), then torch's one rounding.
    gen = torch.Generator().manual_seed(fresh_seed % 2**32)
    w = torch.randn(37, 53, generator=gen).to(dtype)
    seeds, scales = [fresh_seed, fresh_seed ^ 1], [0.05, -0.03]
    out = perturb.gaussian_(w.clone(), seeds, scales, offset=5, backend=backend)
    wide = perturb.gaussian_(w.float(), seeds, scales, offset=5, backend=backend)
    assert torch.equal(bits(out), bits(wide.to(dtype))), f"gaussian_, seed {fresh_seed}"
    args = ([fresh_seed, fresh_seed + 1], [7, 7], 3, [0.5, -0.25])
    out = perturb.lowrank_(w.clone(), *args, row_offset=2, backend=backend)
    wide = perturb.lowrank_(w.float(), *args, row_offset=2, backend=backend)
    assert torch.equal(bits(out), bits(wide.to(dtype))), f"lowrank_, seed {fresh_seed}"
