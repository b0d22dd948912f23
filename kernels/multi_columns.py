"""Given columns added to many 1-D tensors in one launch per dtype: the multi-tensor form of
``outer_add_(w.view(-1, 1), left, right)`` with a one-row right factor, bit for bit.

LOZO-M updates each bias and norm with explicit float32 vectors (its momentum m, in place the
restored noise z too): w ← round(a·w + Σ_k s_k·c_k). One outer_add_ per tensor is a few hundred
launches and host round trips a step; here a host-built job list maps each program to its tensor
and chunk, and one launch per weight dtype writes them all.

Shape contract (shared by the kernel and the reference): tensor i (contiguous, n_i elements,
float32 / bfloat16 / float16) reads element j of column k at ``columns[k][starts[i] + j]``
(float32 flat buffers, the same layout for every column; the kernel takes their addresses from a
device table, so a CUDA graph of the launch replays with new buffers). Per element, in float32:
acc = float(w[j]) (scaled: acc = fl(a_i·float(w[j])), one rounded multiply); for k in order:
acc = fma(c_k[starts[i] + j], s_ik, acc); one rounding to w's dtype, to nearest even or
stochastic with tensor i's round seed and the word bits(seed, row_offsets[i] + j, 0): the words
outer_add_ gives an (n, 1) view (kernels.philox's docstring).

Tables: scales (count, K [+ 1]) float32, row i: s_i1 .. s_iK [, a_i]; seeds (count,) int64, the
round seeds' bit patterns (stochastic only).
"""

import numpy as np
import torch

from ._triton import cdiv, on_device, tl, triton
from .philox import (
    _check_interpretable,
    load_seed,
    narrow,
    round_block,
    round_words_ref,
    stochastic_round,
    stochastic_round_ref,
    triton_interpreting,
)

BLOCK = 1024  # elements per program: biases and norms are 10³–10⁴ elements
# Per-tensor table columns (int64, row width 6).
ADDRESS, SIZE, START, ROW, ROW_OFFSET, FIRST_JOB = range(6)
TABLE_WIDTH = 6


@triton.jit
def _multi_columns_kernel(
    table_ptr,
    jobs_ptr,
    columns_ptr,
    scales_ptr,
    seeds_ptr,
    w0_ptr,
    c0_ptr,
    N_COLS: tl.constexpr,
    BLOCK: tl.constexpr,
    EXACT: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    SCALED: tl.constexpr,
):
    """Job = (tensor, chunk): elements chunk·BLOCK .. of the tensor (module docstring)."""
    pid = tl.program_id(0)
    row = table_ptr + tl.load(jobs_ptr + pid) * 6
    w_ptr = tl.load(row).to(w0_ptr.dtype)
    n = tl.load(row + 1)
    start = tl.load(row + 2)
    term_row = tl.load(row + 3)
    local = (pid - tl.load(row + 5)).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = local < n
    acc = tl.load(w_ptr + local, mask=mask, other=0.0).to(tl.float32)
    scales = scales_ptr + term_row * (N_COLS + SCALED)
    if SCALED:
        acc = acc * tl.load(scales + N_COLS)
    for k in tl.static_range(N_COLS):
        column = tl.load(columns_ptr + k).to(c0_ptr.dtype)
        c = tl.load(column + start + local, mask=mask, other=0.0)
        acc = tl.fma(c, tl.broadcast_to(tl.load(scales + k), c.shape), acc)
    if STOCHASTIC:
        seed_lo, seed_hi = load_seed(seeds_ptr + term_row)
        rows = tl.load(row + 4) + local
        word, _, _, _ = round_block(seed_lo, seed_hi, rows, local * 0)
        result = stochastic_round(acc, w0_ptr, word)
    else:
        result = narrow(acc, w0_ptr, EXACT)
    tl.store(w_ptr + local, result, mask=mask)


class MultiColumns:
    """Launch plan of the pass over `tensors` (see the module docstring); built once, launched
    from device tables (so it can be captured in a CUDA graph). The caller keeps the tensors
    alive and checks them (contiguous, one device, float32 / bfloat16 / float16).

    Args:
        tensors: the 1-D (or any contiguous) tensors.
        starts: per tensor, its first element in every column.
        row_offsets: per tensor, the row of its first element in the rounding words.
        n_cols: K.
        stochastic: a round seed per tensor (seeds table).
        scaled: a weight scale per tensor (the scales table's last column).
    """

    def __init__(self, tensors, starts, row_offsets, n_cols: int, stochastic=False, scaled=False):
        _check_interpretable(tensors[0])
        self.n_cols, self.stochastic, self.scaled = n_cols, bool(stochastic), bool(scaled)
        device = tensors[0].device
        self._c0 = torch.empty(1, dtype=torch.float32, device=device)
        self._launches = []
        for dtype in sorted({w.dtype for w in tensors}, key=str):
            ids = [i for i, w in enumerate(tensors) if w.dtype == dtype]
            counts = np.array([cdiv(tensors[i].numel(), BLOCK) for i in ids], np.int64)
            first = np.cumsum(counts) - counts
            table = np.array(
                [
                    (tensors[i].data_ptr(), tensors[i].numel(), starts[i], i, row_offsets[i], f)
                    for i, f in zip(ids, first, strict=True)
                ],
                dtype=np.int64,
            ).reshape(-1, TABLE_WIDTH)
            jobs = np.repeat(np.arange(len(ids)), counts).astype(np.int32)
            self._launches.append(
                (
                    torch.from_numpy(table).to(device),
                    torch.from_numpy(jobs).to(device),
                    torch.empty(1, dtype=dtype, device=device),
                )
            )

    def launch(self, columns: torch.Tensor, scales: torch.Tensor, seeds: torch.Tensor) -> None:
        """Run the pass: columns (K,) int64 device addresses of the float32 buffers, scales
        (count, K [+ 1]) float32, seeds (count,) int64 (read only when stochastic)."""
        with on_device(scales):
            for table, jobs, w0 in self._launches:
                _multi_columns_kernel[(jobs.shape[0],)](
                    table,
                    jobs,
                    columns,
                    scales,
                    seeds,
                    w0,
                    self._c0,
                    N_COLS=self.n_cols,
                    BLOCK=BLOCK,
                    EXACT=not triton_interpreting(),
                    STOCHASTIC=self.stochastic,
                    SCALED=self.scaled,
                )


def multi_columns_ref(w, columns, start, scales, round_seed=None, w_scale=None, row_offset=0):
    """Pure-torch reference for one tensor (same fma order): a new tensor like w, from the
    float32 flat `columns`, the tensor's `start` in them, its K `scales` (floats), its round
    seed (None: to nearest) and weight scale (None: none)."""
    acc = w.reshape(-1).float()
    if w_scale is not None:
        acc = acc * torch.tensor(w_scale, dtype=torch.float32)
    n = acc.numel()
    for column, s in zip(columns, scales, strict=True):
        c = column[start : start + n].double()
        acc = (c * torch.tensor(s, dtype=torch.float32).double() + acc.double()).float()
    if round_seed is None:
        return acc.to(w.dtype).view(w.shape)
    rows = row_offset + torch.arange(n, dtype=torch.int64, device=w.device)
    words = round_words_ref(round_seed, rows, torch.zeros_like(rows))
    return stochastic_round_ref(acc, w.dtype, words).view(w.shape)
