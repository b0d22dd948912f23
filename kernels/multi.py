"""One engine pass over many tensors in a few launches: the multi-tensor form of gaussian_ and
lowrank_, with results bit-identical to one call per tensor.

A pass over a model is hundreds of tensors, most of them small (biases, norms, 2048² matrices);
one launch per tensor (and per factor) costs more in launch gaps and grid tails than the bytes
themselves. Here every launch covers a whole group of tensors: a host-built job list maps each
program to its tensor (and, for factors, to a part and chunk), and a per-tensor table holds the
tensor's address, shape, row of the seed / scale tables, factor offsets and first job. Groups:
full-rank tensors of one dtype (one gaussian launch), low-rank tensors of one rank (one factor
launch) and of one rank and dtype (one low-rank launch).

Terms (T per tensor, read from device tables, so a CUDA graph of the launches replays with new
seeds): seeds (count, T + 1) int64: T u (or full-rank) seeds, then the tensor's one v seed;
scales (count, T) float32. Low-rank terms share V, so their u's merge, as lowrank_ merges them
with a one-element v_seed (zofast.perturb's contract): the factor launch computes
u = fl(…fl(fl(s_1·U_1) + fl(s_2·U_2)) … + fl(s_T·U_T)), each product and sum rounded (no fused
multiply-add: on the GPU the products go through `mul.rn`, which the compiler cannot contract),
and V once; the low-rank launch then does acc = fma(u[k, i], v[k, j], acc) for k in order.

A pass with `v_split` = s > 0 (LOZO's V-refresh step: restore and update on the old V, the next
perturbation on the new one) has two V's: seeds rows (count, T + 2) end with both v seeds, the
terms before s merge into the first u and the others into the second, and the low-rank launch
runs at rank 2R over [u_1 | u_2]·[V_1 | V_2]ᵀ: what lowrank_ does with two distinct v seeds.

Options of a plan (each a compile-time switch of the kernels; off, the tables and results are as
above): `stochastic` adds one last seed column, the tensor's round seed: every store rounds
stochastically with it (kernels.philox's docstring; low-rank tensors take their global (row,
column) in the (m, n) view, full-rank ones (0, flat index)), bit for bit what gaussian_ /
lowrank_ give with that round_seed. `scaled` adds one last scale column, the tensor's weight
scale a: acc starts as fl(a · float(w)). So seeds rows are (T u seeds, v seeds (1 or 2), [round
seed]) and scales rows (T scales, [w scale]).
"""

import numpy as np
import torch

from ._triton import cdiv, on_device, tl, triton
from .lowrank import default_tile
from .philox import (
    CONTRACT_OPTIONS,
    _check_interpretable,
    add_normals,
    load_seed,
    narrow,
    narrow_stochastic,
    normal4,
    round_words4,
    rounded_product,
    stochastic_round,
    triton_interpreting,
)

# Counter blocks per full-rank program (1024 elements): the H200 sweep over OPT weights
# (results/2026-11-22-suite-2) gave 20.5 % of copy at two terms against 17.1 % for 2048
# elements, and the same 39 % at one term.
GAUSSIAN_BLOCK = 256
FACTOR_BLOCK = 256  # counter blocks per factor program: 1024 numbers
# Per-tensor table columns (int64; the kernels read them at these offsets, row width 9). Factor
# rows are padded to STRIDE_ALIGN numbers, so every factor row starts 64-byte aligned and the
# kernels may say so (vectorised loads).
ADDRESS, ROWS, COLS, TERM_ROW, U_OFFSET, V_OFFSET, U_STRIDE, V_STRIDE, FIRST_JOB = range(9)
TABLE_WIDTH = 9
STRIDE_ALIGN = 16


@triton.jit
def _job_tensor(table_ptr, jobs_ptr, w0_ptr, ALIGNED: tl.constexpr):
    """This program's tensor (gaussian and low-rank launches): its table row, its data pointer,
    its row length (a full-rank tensor is one row) and the job's index within the tensor."""
    pid = tl.program_id(0)
    row = table_ptr + tl.load(jobs_ptr + pid) * 9
    w_ptr = tl.load(row).to(w0_ptr.dtype)
    n = tl.load(row + 2)
    if ALIGNED:  # address and row length multiples of 16 (checked on the host): vector loads
        w_ptr = tl.multiple_of(w_ptr, 16)
        n = tl.multiple_of(n, 16)
    return row, w_ptr, n, (pid - tl.load(row + 8)).to(tl.int64)


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
    EXACT: tl.constexpr,
    V_SEEDS: tl.constexpr,
    STOCHASTIC: tl.constexpr = False,
    SCALED: tl.constexpr = False,
):
    """Job = tensor: its chunk pid − first_job, 4·BLOCK elements, += Σ_t s_t·normal(seed_t, ·)."""
    row, w_ptr, n, chunk = _job_tensor(table_ptr, jobs_ptr, w0_ptr, ALIGNED)
    term_row = tl.load(row + 3)
    blocks = chunk * BLOCK + tl.arange(0, BLOCK)
    local = blocks[:, None] * 4 + tl.arange(0, 4)[None, :]
    mask = local < n
    acc = tl.load(w_ptr + local, mask=mask, other=0.0).to(tl.float32)
    seeds = seeds_ptr + term_row * (N_TERMS + V_SEEDS + STOCHASTIC)
    scales = scales_ptr + term_row * (N_TERMS + SCALED)
    if SCALED:
        acc = acc * tl.load(scales + N_TERMS)
    acc = add_normals(acc, seeds, scales, blocks, N_TERMS)
    if STOCHASTIC:
        seed_lo, seed_hi = load_seed(seeds + N_TERMS + V_SEEDS)
        result = stochastic_round(acc, w0_ptr, round_words4(seed_lo, seed_hi, 0, blocks))
    else:
        result = narrow(acc, w0_ptr, EXACT)
    tl.store(w_ptr + local, result, mask=mask)


@triton.jit
def _scaled_normals(seed_ptr, scale_ptr, blocks, EXACT: tl.constexpr):
    """fl(scale · normals 4·blocks .. 4·blocks + 3), (BLOCK, 4), safe to sum without fusion."""
    seed_lo, seed_hi = load_seed(seed_ptr)
    noise = normal4(seed_lo, seed_hi, blocks)
    return rounded_product(tl.broadcast_to(tl.load(scale_ptr), noise.shape), noise, EXACT)


@triton.jit
def _merged_u(seeds, scales, blocks, FIRST: tl.constexpr, END: tl.constexpr, EXACT: tl.constexpr):
    """Σ_t fl(s_t·normals of u_seed_t) over terms FIRST .. END − 1, in order."""
    z = _scaled_normals(seeds + FIRST, scales + FIRST, blocks, EXACT)
    for t in tl.static_range(FIRST + 1, END):
        z += _scaled_normals(seeds + t, scales + t, blocks, EXACT)
    return z


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
    EXACT: tl.constexpr,
    V_SPLIT: tl.constexpr,
    STOCHASTIC: tl.constexpr = False,
    SCALED: tl.constexpr = False,
):
    """Job = (tensor, part, chunk), 4·BLOCK consecutive stream indices. Part 2g: group g's
    merged u[k, i] = Σ_t fl(s_t·normal(u_seed_t, i·R + k)) (module docstring) at
    u_ptr + u_offset + (g·R + k)·u_stride + i; part 2g + 1: V_g[j, k] = normal(v_seed_g, j·R + k)
    at v_ptr + v_offset + (g·R + k)·v_stride + j. One group (V_SPLIT = 0): every term; two:
    terms before V_SPLIT, then the others."""
    job = jobs_ptr + tl.program_id(0) * 3
    row = table_ptr + tl.load(job) * 9
    part = tl.load(job + 1)
    is_u = part % 2 == 0
    group = part // 2
    term_row = tl.load(row + 3)
    rows = tl.where(is_u, tl.load(row + 1), tl.load(row + 2))
    blocks = tl.load(job + 2).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    local = blocks[:, None] * 4 + tl.arange(0, 4)[None, :]
    mask = local < rows * RANK
    seeds = seeds_ptr + term_row * (N_TERMS + (2 if V_SPLIT else 1) + STOCHASTIC)
    if is_u:
        scales = scales_ptr + term_row * (N_TERMS + SCALED)
        if V_SPLIT == 0:
            z = _merged_u(seeds, scales, blocks, 0, N_TERMS, EXACT)
        elif group == 0:
            z = _merged_u(seeds, scales, blocks, 0, V_SPLIT, EXACT)
        else:
            z = _merged_u(seeds, scales, blocks, V_SPLIT, N_TERMS, EXACT)
        out = u_ptr + tl.load(row + 4)
        stride = tl.load(row + 6)
    else:
        seed_lo, seed_hi = load_seed(seeds + N_TERMS + group)
        z = normal4(seed_lo, seed_hi, blocks)
        out = v_ptr + tl.load(row + 5)
        stride = tl.load(row + 7)
    out += group * RANK * stride
    tl.store(out + (local % RANK) * stride + local // RANK, z, mask=mask)


@triton.jit
def _multi_lowrank_kernel(
    table_ptr,
    jobs_ptr,
    u_ptr,
    v_ptr,
    w0_ptr,
    RANK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ALIGNED: tl.constexpr,
    EXACT: tl.constexpr,
    seeds_ptr=None,
    scales_ptr=None,
    SEED_WIDTH: tl.constexpr = 0,
    SCALE_WIDTH: tl.constexpr = 0,
):
    """Job = tensor: its tile pid − first_job += u·Vᵀ, fma over k in order, one rounding.
    seeds_ptr (rows of SEED_WIDTH, the last one the round seed): stochastic rounding; scales_ptr
    (rows of SCALE_WIDTH, the last one the weight scale): acc starts as fl(a · float(w))."""
    row, w_ptr, n, tile = _job_tensor(table_ptr, jobs_ptr, w0_ptr, ALIGNED)
    m = tl.load(row + 1)
    u_base = u_ptr + tl.multiple_of(tl.load(row + 4), 16)
    v_base = v_ptr + tl.multiple_of(tl.load(row + 5), 16)
    u_stride = tl.multiple_of(tl.load(row + 6), 16)
    v_stride = tl.multiple_of(tl.load(row + 7), 16)
    tiles_n = tl.cdiv(n, BLOCK_N)
    rows = (tile // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    col_start = (tile % tiles_n) * BLOCK_N
    cols = col_start + tl.arange(0, BLOCK_N)
    row_ok = rows < m
    col_ok = cols < n
    ptrs = w_ptr + rows[:, None] * n + cols[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    acc = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    if scales_ptr is not None:
        acc = acc * tl.load(scales_ptr + tl.load(row + 3) * SCALE_WIDTH + SCALE_WIDTH - 1)
    for k in tl.static_range(RANK):
        u = tl.load(u_base + k * u_stride + rows, mask=row_ok, other=0.0)
        v = tl.load(v_base + k * v_stride + cols, mask=col_ok, other=0.0)
        acc = tl.fma(u[:, None], v[None, :], acc)
    if seeds_ptr is None:
        result = narrow(acc, w0_ptr, EXACT)
    else:
        seed_lo, seed_hi = load_seed(seeds_ptr + tl.load(row + 3) * SEED_WIDTH + SEED_WIDTH - 1)
        result = narrow_stochastic(acc, w0_ptr, seed_lo, seed_hi, rows, col_start, True)
    tl.store(ptrs, result, mask=mask)


def _owners(counts) -> tuple[np.ndarray, np.ndarray]:
    """int32 job → tensor list (tensor i owns counts[i] consecutive jobs), and first jobs."""
    counts = np.asarray(counts, dtype=np.int64)
    return np.repeat(np.arange(len(counts)), counts).astype(np.int32), np.cumsum(counts) - counts


def _factor_jobs(counts) -> np.ndarray:
    """(P, 3) int32 factor jobs (tensor, part, chunk): counts[i][part] chunks of tensor i's part."""
    parts = [(i, part, c) for i, per_part in enumerate(counts) for part, c in enumerate(per_part)]
    tensor, part, count = (np.array(column, dtype=np.int64) for column in zip(*parts, strict=True))
    first = np.repeat(np.cumsum(count) - count, count)
    chunk = np.arange(count.sum()) - first
    return np.stack([np.repeat(tensor, count), np.repeat(part, count), chunk], 1).astype(np.int32)


def _matrix(w: torch.Tensor) -> tuple[int, int]:
    return w.shape[0], w.numel() // w.shape[0]


def _padded(count: int) -> int:
    return cdiv(count, STRIDE_ALIGN) * STRIDE_ALIGN


def vector_aligned(w: torch.Tensor, rank: int) -> bool:
    """Whether w's address (bytes) and row length (elements; full-rank: size) are multiples of
    16, so the kernels may load and store it in vectors."""
    return w.data_ptr() % 16 == 0 and (_matrix(w)[1] if rank else w.numel()) % 16 == 0


def factor_views(geometry: list, u: torch.Tensor, v: torch.Tensor) -> list:
    """Per tensor (u, V) of flat factor buffers u, v: (m, r) and (n, r) views, column k of
    each at offset + k·stride (one strided view each: several steps of slicing per tensor cost
    host time every step); None where `geometry` (per tensor (m, n, u offset, v offset,
    u stride, v stride, r), or None) has None."""
    u_base, v_base = u.storage_offset(), v.storage_offset()
    return [
        None
        if g is None
        else (
            u.as_strided((g[0], g[6]), (1, g[4]), u_base + g[2]),
            v.as_strided((g[1], g[6]), (1, g[5]), v_base + g[3]),
        )
        for g in geometry
    ]


class MultiPass:
    """Launch plan of one pass over `tensors` with `n_terms` terms each (see the module docstring).

    Built once (tables, job lists and float32 factor buffers live on the tensors' device); each
    ``launch(seeds, scales)`` runs the pass from device tables, so it can be captured in a CUDA
    graph. ranks[i] = 0: full-rank noise; r ≥ 1: rank-r noise of the tensor viewed as the matrix
    (shape[0], numel // shape[0]). The caller (zofast.graphed.GraphedPass) validates the tensors
    and ranks and keeps the tensors alive: the tables hold their addresses.

    Args:
        tensors: contiguous float32 / bfloat16 / float16 tensors on one device.
        ranks: one per tensor.
        n_terms: T.
        tile: the low-rank (BLOCK_M, BLOCK_N); default: kernels.lowrank.default_tile.
        gaussian_block: counter blocks (4 elements each) per full-rank program.
        num_warps: warps per program of the full-rank and low-rank launches.
        share: another MultiPass over the same tensors and ranks (any n_terms) whose tables, jobs
            and factor buffers this one reuses: the passes of one optimizer cost that memory once
            (they run one after another on one stream).
        factors_only: plan only the factor launch, for :meth:`factors`; no pass.
        v_split: 0, or s (1 ≤ s < T): the terms from s on take a second V (module docstring).
        stochastic: seeds rows end with the tensor's round seed; stores round stochastically.
        scaled: scales rows end with the tensor's weight scale (module docstring).
    """

    def __init__(
        self,
        tensors,
        ranks,
        n_terms: int,
        tile: tuple[int, int] | None = None,
        gaussian_block: int = GAUSSIAN_BLOCK,
        num_warps: int = 4,
        share: "MultiPass | None" = None,
        factors_only: bool = False,
        v_split: int = 0,
        stochastic: bool = False,
        scaled: bool = False,
    ):
        _check_interpretable(tensors[0])
        if not 0 <= v_split < n_terms or (v_split and factors_only):
            raise ValueError(f"v_split must be 0 or in 1..{n_terms - 1} (and 0 for factors)")
        if tile is not None and stochastic and tile[1] % 4:
            raise ValueError(f"stochastic rounding needs BLOCK_N a multiple of 4, got {tile}")
        v_count = 2 if v_split else 1  # V's per tensor
        options = dict(n_terms=n_terms, v_split=v_split, stochastic=bool(stochastic))
        options.update(scaled=bool(scaled), seed_width=n_terms + v_count + bool(stochastic))
        addresses = [w.data_ptr() for w in tensors]
        self._key = (addresses, list(ranks), tile, gaussian_block, num_warps, factors_only, v_count)
        if share is not None and share._key == self._key:
            self.__dict__.update(share.__dict__)  # the same plan, other terms and options
            self.__dict__.update(options)
            return
        self.__dict__.update(options)
        self.gaussian_block, self.num_warps = gaussian_block, num_warps
        self._ranks = list(ranks)
        device = tensors[0].device
        table = np.zeros((len(tensors), TABLE_WIDTH), dtype=np.int64)
        u_size = v_size = 0
        for i, (w, rank) in enumerate(zip(tensors, ranks, strict=True)):
            m, n = _matrix(w) if rank else (1, w.numel())  # full-rank: one row
            table[i, [ADDRESS, ROWS, COLS, TERM_ROW]] = (w.data_ptr(), m, n, i)
            if rank:
                u_stride, v_stride = _padded(m), _padded(n)
                table[i, [U_OFFSET, V_OFFSET, U_STRIDE, V_STRIDE]] = (
                    u_size,
                    v_size,
                    u_stride,
                    v_stride,
                )
                u_size += v_count * rank * u_stride
                v_size += v_count * rank * v_stride
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

        def owned(members, counts):
            """(sub-table, job → row list) of a group whose tensor k has counts[k] jobs."""
            jobs, first = _owners(counts)
            sub = table[members].copy()
            sub[:, FIRST_JOB] = first
            return torch.from_numpy(sub).to(device), torch.from_numpy(jobs).to(device)

        # Per tensor (m, n, u offset, v offset, u stride, v stride, rank), Python ints: views
        # of the factor buffers are made every step, and reading the numpy table costs more.
        self._geometry = [
            tuple(int(x) for x in row[[ROWS, COLS, U_OFFSET, V_OFFSET, U_STRIDE, V_STRIDE]])
            + (rank,)
            if rank
            else None
            for row, rank in zip(table, self._ranks, strict=True)
        ]
        self._gaussian = []
        for (dtype, aligned), ids in groups(
            lambda w, r: None if r or factors_only else (w.dtype, vector_aligned(w, 0))
        ):
            counts = [cdiv(tensors[i].numel(), 4 * gaussian_block) for i in ids]
            self._gaussian.append((*owned(ids, counts), dtype_of[dtype], aligned))
        self._factors = []
        for rank, ids in groups(lambda w, r: r or None):
            counts = []
            for i in ids:
                m, n = _matrix(tensors[i])
                counts.append([cdiv(x * rank, 4 * FACTOR_BLOCK) for x in (m, n)] * v_count)
            jobs = torch.from_numpy(_factor_jobs(counts)).to(device)
            self._factors.append((torch.from_numpy(table[ids]).to(device), jobs, rank))
        self._lowrank = []
        for (rank, dtype, aligned), ids in groups(
            lambda w, r: (r, w.dtype, vector_aligned(w, r)) if r and not factors_only else None
        ):
            block_m, block_n = tile or default_tile(v_count * rank, many_tensors=True)
            counts = []
            for i in ids:
                m, n = _matrix(tensors[i])
                counts.append(cdiv(m, block_m) * cdiv(n, block_n))
            self._lowrank.append(
                (*owned(ids, counts), v_count * rank, dtype_of[dtype], aligned, (block_m, block_n))
            )

    def launch(self, seeds: torch.Tensor, scales: torch.Tensor) -> None:
        """Run the pass: tensor i takes seeds[i] (T seeds, then its v seed or two, then its
        round seed if stochastic) and scales[i] (T scales, then its weight scale if scaled)."""
        with on_device(seeds):
            self._launch(seeds, scales)

    def _launch(self, seeds: torch.Tensor, scales: torch.Tensor) -> None:
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
                EXACT=not triton_interpreting(),
                V_SEEDS=2 if self.v_split else 1,
                STOCHASTIC=self.stochastic,
                SCALED=self.scaled,
                num_warps=self.num_warps,
                **CONTRACT_OPTIONS,
            )
        self._launch_factors(seeds, scales, self._u, self._v)
        self._launch_lowrank(self._u, self._v, seeds, scales)

    def launch_lowrank(self, u: torch.Tensor, v: torch.Tensor, seeds, scales) -> None:
        """Only the low-rank launches, from caller-made float32 factor buffers u, v in the plan's
        factor layout (:meth:`factor_buffers`; with v_split, tensor i's 2R columns are
        [u_1 | u_2] and [V_1 | V_2]): w ← round(a·w + u·Vᵀ), fma over the 2R (or R) columns in
        order, bit for bit ``outer_add_(w, u, V)`` with the row's round seed and weight scale.
        seeds / scales: the plan's tables (only their round-seed / weight-scale columns are
        read)."""
        with on_device(seeds):
            self._launch_lowrank(u, v, seeds, scales)

    def _launch_lowrank(self, u, v, seeds, scales) -> None:
        scale_width = self.n_terms + self.scaled
        for table, jobs, rank, w0, aligned, (block_m, block_n) in self._lowrank:
            _multi_lowrank_kernel[(jobs.shape[0],)](
                table,
                jobs,
                u,
                v,
                w0,
                RANK=rank,
                BLOCK_M=block_m,
                BLOCK_N=block_n,
                ALIGNED=aligned,
                EXACT=not triton_interpreting(),
                seeds_ptr=seeds if self.stochastic else None,
                scales_ptr=scales if self.scaled else None,
                SEED_WIDTH=self.seed_width if self.stochastic else 0,
                SCALE_WIDTH=scale_width if self.scaled else 0,
                num_warps=self.num_warps,
            )

    def _launch_factors(self, seeds, scales, u, v) -> None:
        with on_device(seeds):
            self._launch_factor_kernels(seeds, scales, u, v)

    def _launch_factor_kernels(self, seeds, scales, u, v) -> None:
        for table, jobs, rank in self._factors:
            _multi_factors_kernel[(jobs.shape[0],)](
                table,
                jobs,
                seeds,
                scales,
                u,
                v,
                N_TERMS=self.n_terms,
                RANK=rank,
                BLOCK=FACTOR_BLOCK,
                EXACT=not triton_interpreting(),
                V_SPLIT=self.v_split,
                STOCHASTIC=self.stochastic,
                SCALED=self.scaled,
                **CONTRACT_OPTIONS,
            )

    def factor_buffers(self, dtype: torch.dtype = torch.float32) -> tuple:
        """New flat (u, v) buffers in the plan's factor layout (`dtype`: for casts of them)."""
        return torch.empty_like(self._u, dtype=dtype), torch.empty_like(self._v, dtype=dtype)

    def launch_factors(self, seeds: torch.Tensor, scales: torch.Tensor, u, v) -> None:
        """Only the factor launch, into float32 buffers from :meth:`factor_buffers`."""
        self._launch_factors(seeds, scales, u, v)

    def factor_views(self, u: torch.Tensor, v: torch.Tensor) -> list:
        """Per tensor (u, V) as (m, r) and (n, r) views of flat buffers in the factor layout
        (None for full-rank tensors); their transposes are row-major with rows padded to
        STRIDE_ALIGN elements."""
        return factor_views(self._geometry, u, v)

    def factors(self, seeds: torch.Tensor, scales: torch.Tensor) -> list:
        """Only the factors, into new buffers: per tensor (u, V) as (m, r) and (n, r) float32
        views (None for full-rank tensors), u the terms' merged u (module docstring), V the
        tensor's. With one term of scale 1 they are lowrank_factors' (U, V), bit for bit."""
        u, v = self.factor_buffers()
        self._launch_factors(seeds, scales, u, v)
        return self.factor_views(u, v)
