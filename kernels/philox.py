"""Philox4x32-10 and the zofast normal stream in Triton, beside a pure-torch reference.

The contract (the same in csrc/philox.h and in the torch reference below):

    normal(seed, i): c = i // 4, lane = i % 4
        (x0, x1, x2, x3) = Philox4x32-10(counter=(lo32(c), hi32(c), 0, 0),
                                         key=(lo32(seed), hi32(seed)))
        u_j = uniform(x_j)  # int32 view, ~x if negative, times 4.6566127342e-10f: [0, 1)
        (n0, n1) = box_muller(u0, u1); (n2, n3) = box_muller(u2, u3)
        normal(seed, i) = n_lane

which is element `lane` of Triton's ``tl.randn4x(seed, c)``. Every Philox call yields four normals,
and the value at index i depends on nothing but (seed, i): not on block sizes, grids or devices.
The helpers are written out here instead of calling ``tl.randn4x`` so that the contract does not
move with Triton releases and so that the same kernels run under TRITON_INTERPRET=1.

Stochastic rounding (the ops' ``round_seed``; the same in csrc/philox.h and in
``stochastic_round_ref`` below). A pass computes each element in float32 and rounds it once to the
weight's dtype; with a round seed that one rounding is stochastic, from the random word

    bits(seed, r, c) = word (c mod 4) of Philox4x32-10(counter=(lo32(c // 4), hi32(c // 4),
                                                                lo32(r), hi32(r)),
                                                       key=(lo32(seed), hi32(seed)))

where (r, c) is the element's global (row, column) in the m×n view of a matrix op (row_offset + i,
col_offset + j: a shard gets exactly the whole tensor's bits) and (0, offset + i) for a full-rank
op (row 0 makes the two coincide). With x the float32 result and word = bits(seed, r, c):

* bfloat16: NaN -> 0x7FFF (the canonical NaN `narrow` stores); otherwise the high 16 bits of
  (bits of x) + (word & 0xFFFF) (inf stays inf; a carry past the largest bf16 gives inf).
* float16: NaN -> 0x7FFF. If |x| >= 2^-14: (bits of x) + (word & 0x1FFF) with the low 13 bits
  cleared, converted (exact; beyond 65504 -> inf). If |x| < 2^-14: a = |x| + 2^-14 in float32
  (rounded to nearest), a' = a's bits + (word & 0x1FFF) with the low 13 bits cleared, result
  (a' - 2^-14) with x's sign (exact: a multiple of 2^-24, fp16's subnormal step).
* float32: nothing to round; the seed has no effect.

Each is round-up with probability (remainder / spacing) to 16 (bf16) or 13 (fp16) bits: the
rounded value's expectation is x, up to 2^-16 (2^-13) of a spacing. The result is integer
arithmetic on the float32 value (the one float addition is exactly rounded on every backend), so
it is bit-identical across backends.
"""

import torch

from ._triton import HAS_TRITON, MISSING, cdiv, on_device, tl, triton

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
UNIFORM_SCALE = 4.6566127342e-10
TWO_PI = 6.283185307179586
MIN_UNIFORM = 1.0e-7
MASK32 = 0xFFFFFFFF
# Launch options of every kernel that computes normals. Box-Muller's libdevice log / sin / cos
# come out bit-exact with the CUDA ops (nvcc contracts mul + add into fma by default) only with
# Triton's FP fusion on; Triton 3.9 warns that 3.10 turns it off by default, so it is pinned.
CONTRACT_OPTIONS = {"enable_fp_fusion": True}


@triton.jit
def philox_rounds(c0, c1, c2, c3, k0, k1):
    """Ten Philox4x32 rounds on uint32 blocks; the key is bumped after every round."""
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, 0xD2511F53)
        lo0 = c0 * 0xD2511F53
        hi1 = tl.umulhi(c2, 0xCD9E8D57)
        lo1 = c2 * 0xCD9E8D57
        c0 = hi1 ^ c1 ^ k0
        c1 = lo1
        c2 = hi0 ^ c3 ^ k1
        c3 = lo0
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def load_seed(seed_ptr):
    """A uint64 seed stored as int64 in device memory (graph-safe) -> its (lo, hi) uint32 words."""
    seed = tl.load(seed_ptr).to(tl.uint64, bitcast=True)
    return (seed & 0xFFFFFFFF).to(tl.uint32), (seed >> 32).to(tl.uint32)


@triton.jit
def term_seed(seeds, t: tl.constexpr, TABLE: tl.constexpr):
    """Seed t of a pass as (lo, hi) uint32 words: from a device table of int64 bit patterns
    (TABLE: graph-safe) or from a tuple of kernel arguments (lo_0, hi_0, lo_1, hi_1, ...), each
    word an int32 bit pattern (one compiled variant whatever the seeds; no device copy)."""
    if TABLE:
        lo, hi = load_seed(seeds + t)
    else:
        # tl.cast, not .to: compiled Triton makes an argument equal to 1 a constexpr int.
        lo = tl.cast(seeds[2 * t], tl.uint32, bitcast=True)
        hi = tl.cast(seeds[2 * t + 1], tl.uint32, bitcast=True)
    return lo, hi


@triton.jit
def term_scale(scales, t: tl.constexpr, TABLE: tl.constexpr):
    """Scale t of a pass, float32: from a device table (TABLE) or a tuple of kernel arguments."""
    return tl.load(scales + t) if TABLE else scales[t]


@triton.jit
def philox_block(seed_lo, seed_hi, block):
    """The four words of counter block `block` (int64 tensor) of stream (seed_lo, seed_hi)."""
    block = block.to(tl.uint64, bitcast=True)
    c0 = (block & 0xFFFFFFFF).to(tl.uint32)
    c1 = (block >> 32).to(tl.uint32)
    zero = c0 * 0
    return philox_rounds(c0, c1, zero, zero, zero + seed_lo, zero + seed_hi)


@triton.jit
def word_to_uniform(x):
    x = x.to(tl.int32, bitcast=True)
    x = tl.where(x < 0, ~x, x)
    return x.to(tl.float32) * 4.6566127342e-10


@triton.jit
def box_muller(u1, u2):
    u1 = tl.maximum(u1, 1.0e-7)
    theta = 6.283185307179586 * u2
    radius = tl.sqrt(-2.0 * tl.log(u1))
    return radius * tl.cos(theta), radius * tl.sin(theta)


@triton.jit
def normal4(seed_lo, seed_hi, block):
    """Normals 4*block .. 4*block+3 as a (BLOCK, 4) tensor, row-major in the index."""
    x0, x1, x2, x3 = philox_block(seed_lo, seed_hi, block)
    n0, n1 = box_muller(word_to_uniform(x0), word_to_uniform(x1))
    n2, n3 = box_muller(word_to_uniform(x2), word_to_uniform(x3))
    # join(join(n0, n2), join(n1, n3))[c, a, b] is n_(2a+b): reshaping gives lanes 0..3 in order.
    return tl.reshape(tl.join(tl.join(n0, n2), tl.join(n1, n3)), (n0.shape[0], 4))


@triton.jit
def rounded_product(a, b, EXACT: tl.constexpr):
    """fl(a·b) that no later addition can fuse into a multiply-add (EXACT: through PTX mul.rn;
    Triton's interpreter evaluates in numpy, which never fuses)."""
    if EXACT:
        return tl.inline_asm_elementwise(
            "mul.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32, is_pure=True, pack=1
        )
    return a * b


@triton.jit
def add_normals(acc, seeds, scales, blocks, N_TERMS: tl.constexpr, TABLE: tl.constexpr = True):
    """acc = fma(scale_t, normal(seed_t, 4·blocks ..), acc) for t in order, (BLOCK, 4) float32;
    seeds and scales as term_seed / term_scale read them. A term whose seed equals the previous
    term's (MeZO's restore and update share one z) reuses those normals instead of drawing them
    again: the same numbers, one Philox and Box-Muller fewer per element."""
    seed_lo, seed_hi = term_seed(seeds, 0, TABLE)
    z = normal4(seed_lo, seed_hi, blocks)
    acc = tl.fma(term_scale(scales, 0, TABLE), z, acc)
    for t in tl.static_range(1, N_TERMS):
        lo, hi = term_seed(seeds, t, TABLE)
        if (lo != seed_lo) | (hi != seed_hi):
            z = normal4(lo, hi, blocks)
        seed_lo, seed_hi = lo, hi
        acc = tl.fma(term_scale(scales, t, TABLE), z, acc)
    return acc


@triton.jit
def narrow(x, ptr, EXACT: tl.constexpr):
    """float32 x rounded to nearest even into ptr's element type, the one rounding of a store.

    EXACT (compiled for a GPU): the plain conversion (cvt.rn). Triton's interpreter truncates
    float32 -> bfloat16 instead (3.9, fp_downcast_rounding="rtne" too), so there a bfloat16 is
    rounded on the bits, as torch does: + 0x7FFF + the kept lsb, keep the top half (overflow
    carries into inf); NaN -> the GPU's canonical 0x7FFF. numpy rounds float16 correctly."""
    if not EXACT and ptr.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        nan = (bits & 0x7FFFFFFF) > 0x7F800000
        bits = tl.where(nan, 0x7FFF0000, bits + 0x7FFF + ((bits >> 16) & 1))
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(ptr.dtype.element_ty)


@triton.jit
def round_block(seed_lo, seed_hi, row, col_block):
    """The four rounding words of columns 4·col_block .. 4·col_block + 3 of row `row` (int64
    tensors of one shape, or a scalar row): counter (col_block, row), key (seed_lo, seed_hi)."""
    row = row + col_block * 0
    col_block = (col_block + row * 0).to(tl.uint64, bitcast=True)
    row = row.to(tl.uint64, bitcast=True)
    c0 = (col_block & 0xFFFFFFFF).to(tl.uint32)
    c1 = (col_block >> 32).to(tl.uint32)
    c2 = (row & 0xFFFFFFFF).to(tl.uint32)
    c3 = (row >> 32).to(tl.uint32)
    zero = c0 * 0
    return philox_rounds(c0, c1, c2, c3, zero + seed_lo, zero + seed_hi)


@triton.jit
def join4(x0, x1, x2, x3):
    """(…, 2, 2) with element [..., q, p] = x_(2q+p): reshaped, lanes 0..3 in order."""
    return tl.join(tl.join(x0, x2), tl.join(x1, x3))


@triton.jit
def round_words4(seed_lo, seed_hi, row, blocks):
    """Rounding words of elements 4·blocks .. 4·blocks + 3 of row `row`, (BLOCK, 4) uint32."""
    x0, x1, x2, x3 = round_block(seed_lo, seed_hi, row, blocks)
    return tl.reshape(join4(x0, x1, x2, x3), (blocks.shape[0], 4))


@triton.jit
def round_words_tile(seed_lo, seed_hi, rows, col_start, BLOCK_N: tl.constexpr, COL_ALIGNED):
    """Rounding words of the tile rows × (col_start + 0 .. BLOCK_N − 1), (BLOCK_M, BLOCK_N)
    uint32; rows and col_start are global indices (int64). COL_ALIGNED (col_start a multiple of
    4, BLOCK_N too): one Philox block per four columns; otherwise one per element."""
    if COL_ALIGNED:
        blocks = col_start // 4 + tl.arange(0, BLOCK_N // 4).to(tl.int64)
        x0, x1, x2, x3 = round_block(seed_lo, seed_hi, rows[:, None], blocks[None, :])
        return tl.reshape(join4(x0, x1, x2, x3), (rows.shape[0], BLOCK_N))
    cols = col_start + tl.arange(0, BLOCK_N).to(tl.int64)
    x0, x1, x2, x3 = round_block(seed_lo, seed_hi, rows[:, None], (cols // 4)[None, :])
    lane = (cols % 4)[None, :]
    return tl.where(lane == 0, x0, tl.where(lane == 1, x1, tl.where(lane == 2, x2, x3)))


@triton.jit
def stochastic_round(x, ptr, word):
    """float32 x rounded stochastically into ptr's element type with the uint32 words `word`
    (the module docstring's definition); float32: x itself."""
    # One branch per dtype, no early return: compiled Triton goes on compiling the statements
    # after a `return` in a constexpr branch, and the 16-bit path does not compile for float32.
    if ptr.dtype.element_ty == tl.float32:
        out = x
    else:
        bits = x.to(tl.uint32, bitcast=True)
        mag = bits & 0x7FFFFFFF
        nan = mag > 0x7F800000
        if ptr.dtype.element_ty == tl.bfloat16:
            out = (bits + (word & 0xFFFF)) >> 16
        else:
            # One 13-bit step on mag (normal range) or on a = |x| + 2^-14 (subnormal range), then
            # the fp16 exponent: (t >> 13) less the rebias (normal) or less a's bits >> 13 (exact:
            # a' - 2^-14 is a multiple of 2^-24). Equal to the docstring's two cases, fewer ops.
            normal = mag >= 0x38800000
            a = (tl.abs(x) + 6.103515625e-05).to(tl.uint32, bitcast=True)
            t = (tl.where(normal, mag, a) + (word & 0x1FFF)) >> 13
            out = t - tl.where(normal, 0x1C000, 0x1C400)
            out = ((bits >> 16) & 0x8000) | tl.where(t >= 0x23C00, 0x7C00, out)
        out = tl.where(nan, 0x7FFF, out)
        out = out.to(tl.uint16).to(ptr.dtype.element_ty, bitcast=True)
    return out


@triton.jit
def narrow_stochastic(x, ptr, seed_lo, seed_hi, rows, col_start, COL_ALIGNED: tl.constexpr):
    """The (BLOCK_M, BLOCK_N) tile x at global rows `rows` (int64) and columns col_start + j,
    rounded stochastically into ptr's element type (round_words_tile, stochastic_round)."""
    words = round_words_tile(seed_lo, seed_hi, rows, col_start, x.shape[1], COL_ALIGNED)
    return stochastic_round(x, ptr, words)


@triton.jit
def _philox_kernel(counters_ptr, key_ptr, out_ptr, n_rows, BLOCK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = rows < n_rows
    c0 = tl.load(counters_ptr + rows * 4 + 0, mask=mask, other=0).to(tl.uint32)
    c1 = tl.load(counters_ptr + rows * 4 + 1, mask=mask, other=0).to(tl.uint32)
    c2 = tl.load(counters_ptr + rows * 4 + 2, mask=mask, other=0).to(tl.uint32)
    c3 = tl.load(counters_ptr + rows * 4 + 3, mask=mask, other=0).to(tl.uint32)
    zero = c0 * 0
    k0 = tl.load(key_ptr).to(tl.uint32)
    k1 = tl.load(key_ptr + 1).to(tl.uint32)
    x0, x1, x2, x3 = philox_rounds(c0, c1, c2, c3, zero + k0, zero + k1)
    tl.store(out_ptr + rows * 4 + 0, x0.to(tl.int64), mask=mask)
    tl.store(out_ptr + rows * 4 + 1, x1.to(tl.int64), mask=mask)
    tl.store(out_ptr + rows * 4 + 2, x2.to(tl.int64), mask=mask)
    tl.store(out_ptr + rows * 4 + 3, x3.to(tl.int64), mask=mask)


@triton.jit
def _sample_kernel(offsets_ptr, seed_ptr, out_ptr, n, BLOCK: tl.constexpr, NORMAL: tl.constexpr):
    """out[i] = normal(seed, offsets[i]) (or the uniform it is built from) for arbitrary offsets."""
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    offsets = tl.load(offsets_ptr + idx, mask=mask, other=0)
    seed_lo, seed_hi = load_seed(seed_ptr)
    lane = offsets & 3
    x0, x1, x2, x3 = philox_block(seed_lo, seed_hi, offsets >> 2)
    if NORMAL:
        a0, a1 = box_muller(word_to_uniform(x0), word_to_uniform(x1))
        a2, a3 = box_muller(word_to_uniform(x2), word_to_uniform(x3))
    else:
        a0 = word_to_uniform(x0)
        a1 = word_to_uniform(x1)
        a2 = word_to_uniform(x2)
        a3 = word_to_uniform(x3)
    value = tl.where(lane == 0, a0, tl.where(lane == 1, a1, tl.where(lane == 2, a2, a3)))
    tl.store(out_ptr + idx, value, mask=mask)


@triton.jit
def _noise_kernel(out_ptr, seed_ptr, scale_ptr, n, offset, BLOCK: tl.constexpr):
    """out[i] = scale * normal(seed, offset + i) for i < n, float32, BLOCK counters per program."""
    first_block = offset // 4
    blocks = first_block + tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    local = (blocks * 4 - offset)[:, None] + tl.arange(0, 4)[None, :]
    mask = (local >= 0) & (local < n)
    seed_lo, seed_hi = load_seed(seed_ptr)
    z = normal4(seed_lo, seed_hi, blocks) * tl.load(scale_ptr)
    tl.store(out_ptr + local, z, mask=mask)


def _check_interpretable(t):
    if not HAS_TRITON:
        raise ImportError(MISSING)
    if t.device.type != "cuda" and not triton_interpreting():
        raise RuntimeError(
            "backend='triton' on a CPU tensor runs Triton's interpreter, which must be enabled "
            "before triton is first imported: set TRITON_INTERPRET=1 in the environment "
            "(zofast sets it itself when torch sees no CUDA device)."
        )


def seed_words(seeds) -> tuple[int, ...]:
    """uint64 seeds as the kernel-argument tuple term_seed reads: (lo_0, hi_0, lo_1, ...), each
    32-bit word as an int32 bit pattern, so that Triton types every word i32 whatever the seed
    (an int64 argument would be typed i32, i64 or u64 by value: a compiled variant each)."""
    words = []
    for seed in seeds:
        for word in (seed & MASK32, (seed >> 32) & MASK32):
            words.append(word - (word >> 31 << 32))
    return tuple(words)


def pass_arguments(w_dtype, seeds, scales, round_seed, w_scale):
    """(table, seeds, scales, round_seed, w_scale) as a seeded kernel takes them: device tables
    pass through (table True); host values become kernel-argument tuples (seed_words). The round
    seed is dropped for float32 w (nothing to round)."""
    if w_dtype == torch.float32:
        round_seed = None
    if isinstance(seeds, torch.Tensor):
        return True, seeds, scales, round_seed, w_scale
    round_seed = None if round_seed is None else seed_words([round_seed])
    w_scale = None if w_scale is None else (w_scale,)
    return False, seed_words(seeds), tuple(scales), round_seed, w_scale


def triton_interpreting() -> bool:
    """Whether the Triton kernels were built for the interpreter (TRITON_INTERPRET=1); False
    without triton."""
    return HAS_TRITON and not isinstance(_noise_kernel, triton.runtime.JITFunction)


def philox4x32_triton(counters: torch.Tensor, k0: int, k1: int) -> torch.Tensor:
    """Raw Philox4x32-10 on an (N, 4) int64 tensor of uint32 words; returns (N, 4) int64."""
    _check_interpretable(counters)
    out = torch.empty_like(counters)
    key = torch.tensor([k0, k1], dtype=torch.int64, device=counters.device)
    n = counters.shape[0]
    block = 256
    with on_device(counters):
        _philox_kernel[(cdiv(n, block),)](counters, key, out, n, BLOCK=block)
    return out


def sample_triton(offsets: torch.Tensor, seed: torch.Tensor, *, normal: bool, out=None):
    """normal(seed, offsets) or uniform(seed, offsets) as float32, for an int64 offset tensor."""
    _check_interpretable(offsets)
    out = (
        torch.empty(offsets.shape, dtype=torch.float32, device=offsets.device)
        if out is None
        else out
    )
    n = offsets.numel()
    block = 512
    with on_device(offsets):
        _sample_kernel[(cdiv(n, block),)](
            offsets, seed, out, n, BLOCK=block, NORMAL=normal, **CONTRACT_OPTIONS
        )
    return out


def noise_triton(
    out: torch.Tensor, seed: torch.Tensor, scale: torch.Tensor, offset: int, block: int = 256
) -> torch.Tensor:
    """Fill the contiguous float32 `out` with scale * normal(seed, offset + i)."""
    _check_interpretable(out)
    n = out.numel()
    n_blocks = (offset + n + 3) // 4 - offset // 4
    with on_device(out):
        _noise_kernel[(cdiv(n_blocks, block),)](
            out, seed, scale, n, offset, BLOCK=block, **CONTRACT_OPTIONS
        )
    return out


# Pure-torch reference of the same maths (int64 arithmetic on uint32 words).


def _mulhilo(a: torch.Tensor, b: int):
    """(hi, lo) 32-bit halves of a * b for uint32 a (int64 tensor) and b, without int64 overflow."""
    p_low = (a & 0xFFFF) * b  # < 2^48
    p_high = (a >> 16) * b  # < 2^48
    s = ((p_high & 0xFFFF) << 16) + p_low  # < 2^49
    return ((p_high >> 16) + (s >> 32)) & MASK32, s & MASK32


def philox4x32_ref(counters: torch.Tensor, k0: int, k1: int) -> torch.Tensor:
    """Reference Philox4x32-10: (N, 4) int64 words, key (k0, k1) -> (N, 4) int64 words."""
    c0, c1, c2, c3 = (counters[:, j].clone() for j in range(4))
    for _ in range(10):
        hi0, lo0 = _mulhilo(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + PHILOX_W0) & MASK32, (k1 + PHILOX_W1) & MASK32
    return torch.stack([c0, c1, c2, c3], dim=1)


def words_to_uniform_ref(words: torch.Tensor) -> torch.Tensor:
    x = torch.where(words >= 2**31, words - 2**32, words)  # int32 view
    x = torch.where(x < 0, -x - 1, x)  # ~x
    return x.to(torch.float32) * torch.tensor(UNIFORM_SCALE, dtype=torch.float32)


def box_muller_ref(u1: torch.Tensor, u2: torch.Tensor):
    u1 = torch.clamp_min(u1, MIN_UNIFORM)
    theta = torch.tensor(TWO_PI, dtype=torch.float32) * u2
    radius = torch.sqrt(-2.0 * torch.log(u1))
    return radius * torch.cos(theta), radius * torch.sin(theta)


def sample_ref(offsets: torch.Tensor, seed: int, *, normal: bool) -> torch.Tensor:
    """Reference normal(seed, offsets) / uniform(seed, offsets) as float32."""
    offsets = offsets.reshape(-1).to(torch.int64)
    blocks = offsets >> 2
    counters = torch.stack(
        [
            blocks & MASK32,
            (blocks >> 32) & MASK32,
            torch.zeros_like(blocks),
            torch.zeros_like(blocks),
        ],
        dim=1,
    )
    words = philox4x32_ref(counters, seed & MASK32, (seed >> 32) & MASK32)
    u = words_to_uniform_ref(words)
    if normal:
        n0, n1 = box_muller_ref(u[:, 0], u[:, 1])
        n2, n3 = box_muller_ref(u[:, 2], u[:, 3])
        u = torch.stack([n0, n1, n2, n3], dim=1)
    return u.gather(1, (offsets & 3)[:, None])[:, 0]


FP16_MIN_NORMAL = 2.0**-14


def round_words_ref(seed: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """bits(seed, r, c) of the stochastic rounding (module docstring) for int64 tensors of
    global rows and columns (broadcast together); int64 words."""
    rows, cols = torch.broadcast_tensors(rows.to(torch.int64), cols.to(torch.int64))
    rows, cols = rows.reshape(-1), cols.reshape(-1)
    blocks = cols >> 2
    counters = torch.stack(
        [blocks & MASK32, (blocks >> 32) & MASK32, rows & MASK32, (rows >> 32) & MASK32], dim=1
    )
    words = philox4x32_ref(counters, seed & MASK32, (seed >> 32) & MASK32)
    return words.gather(1, (cols & 3)[:, None])[:, 0]


def stochastic_round_ref(x: torch.Tensor, dtype: torch.dtype, words: torch.Tensor) -> torch.Tensor:
    """float32 x rounded stochastically to `dtype` with the words (int64, x's numel) of each
    element, in x's shape (module docstring); float32: x itself."""
    if dtype == torch.float32:
        return x.clone()
    words = words.reshape(x.shape)
    bits = x.contiguous().view(torch.int32).to(torch.int64) & MASK32
    mag = bits & 0x7FFFFFFF
    if dtype == torch.bfloat16:
        out = (bits + (words & 0xFFFF)) >> 16
    else:
        high = (mag + (words & 0x1FFF)) & 0xFFFFE000
        high = torch.where(high >= 0x47800000, 0x7C00, (high >> 13) - 0x1C000)
        a = x.abs() + torch.tensor(FP16_MIN_NORMAL, dtype=torch.float32)  # float32, to nearest
        a = a.view(torch.int32).to(torch.int64) & MASK32
        low = (((a + (words & 0x1FFF)) & 0xFFFFE000) - 0x38800000) >> 13
        out = ((bits >> 16) & 0x8000) | torch.where(mag >= 0x38800000, high, low)
    out = torch.where(mag > 0x7F800000, 0x7FFF, out)
    return torch.where(out >= 2**15, out - 2**16, out).to(torch.int16).view(dtype)
