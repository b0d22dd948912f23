"""One engine pass over many tensors in a few launches: the multi-tensor form of gaussian_ and
lowrank_, with results bit-identical to one call per tensor.

A pass over a model is hundreds of tensors, most of them small (biases, norms, 2048² matrices);
one launch per tensor (and per factor) costs more in launch gaps and grid tails than the bytes
themselves. Here every launch covers a whole group of tensors: a host-built job table maps each
program to (tensor, part, chunk), and a per-tensor table holds the tensor's address, shape, row
of the seed / scale tables and factor offsets. Groups: full-rank tensors of one dtype (one
gaussian launch), low-rank tensors of one rank (one factor launch) and of one rank and dtype (one
low-rank launch).

Terms (T per tensor, read from device tables, so a CUDA graph of the launches replays with new
seeds): seeds (count, T + 1) int64: T u (or full-rank) seeds, then the tensor's one v seed;
scales (count, T) float32. Low-rank terms share V, so their u's merge: the factor launch stores
u_t = fl(s_t · U_t) for every t and V once; the low-rank launch sums the u_t in term order as it
loads them, then acc = fma(u[k, i], v[k, j], acc) for k in order: the arithmetic of lowrank_
with a one-element v_seed (zofast.perturb's contract), in the same order.
"""

import numpy as np
import torch
import triton
import triton.language as tl

from .lowrank import default_tile
from .philox import CONTRACT_OPTIONS, _check_interpretable, load_seed, normal4

GAUSSIAN_BLOCK = 512  # counter blocks per program: 2048 elements
FACTOR_BLOCK = 256  # counter blocks per factor program: 1024 numbers
# Per-tensor table columns (int64). Factor rows are padded to STRIDE_ALIGN numbers, so every
# factor row starts 64-byte aligned and the kernels may say so (vectorised loads).
ADDRESS, ROWS, COLS, TERM_ROW, U_OFFSET, V_OFFSET, U_STRIDE, V_STRIDE = range(8)
TABLE_WIDTH = 8
STRIDE_ALIGN = 16


@triton.jit
def _multi_gaussian_kernel(
    table_ptr,
    jobs_ptr,
    seeds_ptr,
    scales_ptr,
    w0_ptr,
    N_TERMS: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """Job (tensor, -, chunk): 4·BLOCK elements from chunk·4·BLOCK += Σ_t s_t·normal(seed_t, ·)."""
    job = jobs_ptr + tl.program_id(0) * 3
    row = table_ptr + tl.load(job) * 8
    w_ptr = tl.load(row).to(w0_ptr.dtype)
    n = tl.load(row + 1)
    if ALIGNED:  # address and size multiples of 16 (checked on the host): vector loads
        w_ptr = tl.multiple_of(w_ptr, 16)
        n = tl.multiple_of(n, 16)
    term_row = tl.load(row + 3)
    blocks = tl.load(job + 2).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    local = blocks[:, None] * 4 + tl.arange(0, 4)[None, :]
    mask = local < n
    acc = tl.load(w_ptr + local, mask=mask, other=0.0).to(tl.float32)
    for t in tl.static_range(N_TERMS):
        seed_lo, seed_hi = load_seed(seeds_ptr + term_row * (N_TERMS + 1) + t)
        scale = tl.load(scales_ptr + term_row * N_TERMS + t)
        acc = tl.fma(scale, normal4(seed_lo, seed_hi, blocks), acc)
    tl.store(w_ptr + local, acc.to(w0_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _multi_factors_kernel(
    table_ptr,
    jobs_ptr,
    seeds_ptr,
    scales_ptr,
    u_ptr,
    v_ptr,
    N_TERMS: tl.constexpr,
    RANK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Job = (tensor, part, chunk); part t < T: u_t[k, i] = s_t·normal(u_seed_t, i·R + k) at
    u_ptr + u_offset + (t·R + k)·u_stride + i; part T: V[j, k] = normal(v_seed, j·R + k) at
    v_ptr + v_offset + k·v_stride + j. Each job covers 4·BLOCK consecutive stream indices."""
    job = jobs_ptr + tl.program_id(0) * 3
    row = table_ptr + tl.load(job) * 8
    part = tl.load(job + 1)
    is_u = part < N_TERMS
    term_row = tl.load(row + 3)
    rows = tl.where(is_u, tl.load(row + 1), tl.load(row + 2))
    blocks = tl.load(job + 2).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    local = blocks[:, None] * 4 + tl.arange(0, 4)[None, :]
    mask = local < rows * RANK
    seed_lo, seed_hi = load_seed(seeds_ptr + term_row * (N_TERMS + 1) + part)
    scale = tl.load(scales_ptr + term_row * N_TERMS + part, mask=is_u, other=1.0)
    z = normal4(seed_lo, seed_hi, blocks) * scale
    stride = tl.where(is_u, tl.load(row + 6), tl.load(row + 7))
    transposed = (local % RANK) * stride + local // RANK
    u_out = u_ptr + tl.load(row + 4) + part * RANK * stride
    v_out = v_ptr + tl.load(row + 5)
    tl.store(tl.where(is_u, u_out, v_out) + transposed, z, mask=mask)


@triton.jit
def _multi_lowrank_kernel(
    table_ptr,
    jobs_ptr,
    u_ptr,
    v_ptr,
    w0_ptr,
    N_TERMS: tl.constexpr,
    RANK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """Job = (tensor, -, tile): w[tile] += (Σ_t u_t)·Vᵀ, fma over k in order, one rounding."""
    job = jobs_ptr + tl.program_id(0) * 3
    row = table_ptr + tl.load(job) * 8
    w_ptr = tl.load(row).to(w0_ptr.dtype)
    m = tl.load(row + 1)
    n = tl.load(row + 2)
    if ALIGNED:  # address and row length multiples of 16 (checked on the host): vector loads
        w_ptr = tl.multiple_of(w_ptr, 16)
        n = tl.multiple_of(n, 16)
    u_base = u_ptr + tl.multiple_of(tl.load(row + 4), 16)
    v_base = v_ptr + tl.multiple_of(tl.load(row + 5), 16)
    u_stride = tl.multiple_of(tl.load(row + 6), 16)
    v_stride = tl.multiple_of(tl.load(row + 7), 16)
    tile = tl.load(job + 2).to(tl.int64)
    tiles_n = tl.cdiv(n, BLOCK_N)
    rows = (tile // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (tile % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < m
    col_ok = cols < n
    ptrs = w_ptr + rows[:, None] * n + cols[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    acc = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    for k in tl.static_range(RANK):
        u = tl.load(u_base + k * u_stride + rows, mask=row_ok, other=0.0)
        for t in tl.static_range(1, N_TERMS):
            u += tl.load(u_base + (t * RANK + k) * u_stride + rows, mask=row_ok, other=0.0)
        v = tl.load(v_base + k * v_stride + cols, mask=col_ok, other=0.0)
        acc = tl.fma(u[:, None], v[None, :], acc)
    tl.store(ptrs, acc.to(w0_ptr.dtype.element_ty), mask=mask)


def _jobs(counts) -> np.ndarray:
    """(P, 3) int32 job rows (tensor, part, chunk): counts[i][part] chunks of tensor i's part."""
    parts = [(i, part, c) for i, per_part in enumerate(counts) for part, c in enumerate(per_part)]
    tensor, part, count = (np.array(column, dtype=np.int64) for column in zip(*parts, strict=True))
    first = np.repeat(np.cumsum(count) - count, count)
    chunk = np.arange(count.sum()) - first
    return np.stack([np.repeat(tensor, count), np.repeat(part, count), chunk], 1).astype(np.int32)


def _matrix(w: torch.Tensor) -> tuple[int, int]:
    return w.shape[0], w.numel() // w.shape[0]


def _padded(count: int) -> int:
    return triton.cdiv(count, STRIDE_ALIGN) * STRIDE_ALIGN


def _aligned(w: torch.Tensor, rank: int) -> bool:
    """Whether w's address (bytes) and row length (elements; full-rank: size) are multiples of
    16, so the kernels may load and store it in vectors."""
    return w.data_ptr() % 16 == 0 and (_matrix(w)[1] if rank else w.numel()) % 16 == 0


class MultiPass:
    """Launch plan of one pass over `tensors` with `n_terms` terms each (see the module docstring).

    Built once (tables, job lists and float32 factor buffers live on the tensors' device); each
    ``launch(seeds, scales)`` runs the pass from device tables, so it can be captured in a CUDA
    graph. ranks[i] = 0: full-rank noise; r ≥ 1: rank-r noise of the tensor viewed as the matrix
    (shape[0], numel // shape[0]). The caller (zofast.perturb.GraphedPass) validates the tensors
    and ranks and keeps the tensors alive: the tables hold their addresses.

    Args:
        tensors: contiguous float32 / bfloat16 / float16 tensors on one device.
        ranks: one per tensor.
        n_terms: T.
        tile: the low-rank (BLOCK_M, BLOCK_N); default: kernels.lowrank.default_tile.
        gaussian_block: counter blocks (4 elements each) per full-rank program.
        num_warps: warps per program of the full-rank and low-rank launches.
    """

    def __init__(
        self,
        tensors,
        ranks,
        n_terms: int,
        tile: tuple[int, int] | None = None,
        gaussian_block: int = GAUSSIAN_BLOCK,
        num_warps: int = 4,
    ):
        _check_interpretable(tensors[0])
        self.n_terms, self.gaussian_block, self.num_warps = n_terms, gaussian_block, num_warps
        device = tensors[0].device
        table = np.zeros((len(tensors), TABLE_WIDTH), dtype=np.int64)
        u_size = v_size = 0
        for i, (w, rank) in enumerate(zip(tensors, ranks, strict=True)):
            m, n = _matrix(w) if rank else (w.numel(), 1)
            table[i, [ADDRESS, ROWS, COLS, TERM_ROW]] = (w.data_ptr(), m, n, i)
            if rank:
                u_stride, v_stride = _padded(m), _padded(n)
                table[i, [U_OFFSET, V_OFFSET, U_STRIDE, V_STRIDE]] = (
                    u_size,
                    v_size,
                    u_stride,
                    v_stride,
                )
                u_size += n_terms * rank * u_stride
                v_size += rank * v_stride
        self._u = torch.empty(max(u_size, 1), dtype=torch.float32, device=device)
        self._v = torch.empty(max(v_size, 1), dtype=torch.float32, device=device)
        # The kernels take their weight dtype from a small aligned stand-in, so the compiled
        # variant does not depend on the alignment of the group's first tensor.
        dtype_of = {d: torch.empty(16, dtype=d, device=device) for d in {w.dtype for w in tensors}}

        def groups(key):
            found: dict = {}
            for i, (w, rank) in enumerate(zip(tensors, ranks, strict=True)):
                k = key(w, rank)
                if k is not None:
                    found.setdefault(k, []).append(i)
            return found.items()

        def plan(members, counts):
            return (
                torch.from_numpy(table[members]).to(device),
                torch.from_numpy(_jobs(counts)).to(device),
            )

        self._gaussian = [
            (
                *plan(ids, [[triton.cdiv(tensors[i].numel(), 4 * gaussian_block)] for i in ids]),
                dtype_of[dtype],
                aligned,
            )
            for (dtype, aligned), ids in groups(
                lambda w, r: None if r else (w.dtype, _aligned(w, 0))
            )
        ]
        self._factors = []
        for rank, ids in groups(lambda w, r: r or None):
            counts = []
            for i in ids:
                m, n = _matrix(tensors[i])
                u_chunks = triton.cdiv(m * rank, 4 * FACTOR_BLOCK)
                counts.append([u_chunks] * n_terms + [triton.cdiv(n * rank, 4 * FACTOR_BLOCK)])
            self._factors.append((*plan(ids, counts), rank))
        self._lowrank = []
        for (rank, dtype, aligned), ids in groups(
            lambda w, r: (r, w.dtype, _aligned(w, r)) if r else None
        ):
            block_m, block_n = tile or default_tile(rank, many_tensors=True)
            counts = []
            for i in ids:
                m, n = _matrix(tensors[i])
                counts.append([triton.cdiv(m, block_m) * triton.cdiv(n, block_n)])
            self._lowrank.append(
                (*plan(ids, counts), rank, dtype_of[dtype], aligned, (block_m, block_n))
            )

    def launch(self, seeds: torch.Tensor, scales: torch.Tensor) -> None:
        """Run the pass: tensor i takes seeds[i] (T seeds, then its v seed) and scales[i]."""
        terms = self.n_terms
        for table, jobs, w0, aligned in self._gaussian:
            _multi_gaussian_kernel[(jobs.shape[0],)](
                table,
                jobs,
                seeds,
                scales,
                w0,
                N_TERMS=terms,
                BLOCK=self.gaussian_block,
                ALIGNED=aligned,
                num_warps=self.num_warps,
                **CONTRACT_OPTIONS,
            )
        for table, jobs, rank in self._factors:
            _multi_factors_kernel[(jobs.shape[0],)](
                table,
                jobs,
                seeds,
                scales,
                self._u,
                self._v,
                N_TERMS=terms,
                RANK=rank,
                BLOCK=FACTOR_BLOCK,
                **CONTRACT_OPTIONS,
            )
        for table, jobs, rank, w0, aligned, (block_m, block_n) in self._lowrank:
            _multi_lowrank_kernel[(jobs.shape[0],)](
                table,
                jobs,
                self._u,
                self._v,
                w0,
                N_TERMS=terms,
                RANK=rank,
                BLOCK_M=block_m,
                BLOCK_N=block_n,
                ALIGNED=aligned,
                num_warps=self.num_warps,
            )
