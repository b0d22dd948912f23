"""Random streams of zofast: Philox4x32-10, the normal stream, and run seeds.

The contract: ``normal(seed, i)`` is the standard normal at index i of stream ``seed`` (a uint64):
with c = i // 4 and lane = i % 4, the words (x0, x1, x2, x3) = Philox4x32-10(counter = (lo32(c),
hi32(c), 0, 0), key = (lo32(seed), hi32(seed))) become uniforms u_j (int32 view, bit-flipped when
negative, times 4.6566127342e-10f), and Box-Muller on (u0, u1) and (u2, u3) gives four normals, of
which ``normal(seed, i)`` is number ``lane``. This equals element ``lane`` of Triton's
``tl.randn4x(seed, c)``. It is a pure function of (seed, i): every backend (Triton on GPU, CUDA,
C++ on CPU, Triton's interpreter, pure torch) computes the same integers and uniforms bit for bit,
and the same normals up to the last bits of libm's log/cos/sin (bit for bit between Triton and CUDA
on a GPU). Tails are cut near 5.68 sigma by the 1e-7 clamp of u0.

Nothing in zofast draws from torch's global generator.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from zofast._ext import has_extension, require_extension, resolve_backend

MASK32 = 0xFFFFFFFF
MAX_SEED = 2**64 - 1


def as_seed(seed, name: str = "seed") -> int:
    """Validate a uint64 seed (a Python or numpy integer in 0 .. 2**64 - 1) and return it as int."""
    if type(seed) is int and 0 <= seed <= MAX_SEED:  # the common case, without abc checks
        return seed
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"{name} must be an integer in 0..2**64-1, got {type(seed).__name__}")
    seed = int(seed)
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"{name} must be in 0..2**64-1, got {seed}")
    return seed


def to_signed64(value: int) -> int:
    """The int64 with the same 64 bits as the uint64 `value` (how seeds travel to kernels)."""
    return value - 2**64 if value >= 2**63 else value


def philox4x32(counters: torch.Tensor, key, *, backend: str = "auto") -> torch.Tensor:
    """Raw Philox4x32-10.

    Args:
        counters: int64 tensor (N, 4), each entry a uint32 word (0 .. 2**32 - 1).
        key: (k0, k1), two uint32 words.
        backend: "auto", "triton", "cpp" or "torch" (see zofast.perturb).

    Returns:
        int64 tensor (N, 4) of the output words.

    Example:
        >>> zero = torch.zeros(1, 4, dtype=torch.int64)
        >>> [hex(x) for x in philox4x32(zero, (0, 0))[0].tolist()]
        ['0x6627e8d5', '0xe169c58d', '0xbc57ac4c', '0x9b00dbd8']
    """
    if not isinstance(counters, torch.Tensor) or counters.dtype != torch.int64:
        raise TypeError("counters must be an int64 tensor of shape (N, 4)")
    if counters.dim() != 2 or counters.shape[1] != 4:
        raise ValueError(f"counters must have shape (N, 4), got {tuple(counters.shape)}")
    if counters.numel() and (counters.min() < 0 or counters.max() > MASK32):
        raise ValueError("counters must hold uint32 words (0 .. 2**32 - 1)")
    if len(key) != 2:
        raise ValueError(f"key must be two uint32 words, got {key!r}")
    k0, k1 = (as_seed(k, "key") for k in key)
    if max(k0, k1) > MASK32:
        raise ValueError("key words must be uint32 (0 .. 2**32 - 1)")
    counters = counters.contiguous()
    backend = resolve_backend(backend, counters.device)
    if backend == "cpp":
        return require_extension(counters.device).philox4x32(counters, k0, k1)
    from zofast.kernels import philox

    if backend == "triton":
        return philox.philox4x32_triton(counters, k0, k1)
    return philox.philox4x32_ref(counters, k0, k1)


def _sample(seed, offsets, backend: str, normal: bool) -> torch.Tensor:
    seed = as_seed(seed)
    if not isinstance(offsets, torch.Tensor) or offsets.dtype != torch.int64:
        raise TypeError("offsets must be an int64 tensor")
    if offsets.numel() and offsets.min() < 0:
        raise ValueError("offsets must be non-negative")
    backend = resolve_backend(backend, offsets.device)
    if backend == "cpp":
        return require_extension(offsets.device).sample(offsets, to_signed64(seed), normal)
    from zofast.kernels import philox

    if backend == "triton":
        seed_t = torch.tensor(to_signed64(seed), dtype=torch.int64, device=offsets.device)
        flat = philox.sample_triton(offsets.reshape(-1).contiguous(), seed_t, normal=normal)
        return flat.reshape(offsets.shape)
    return philox.sample_ref(offsets, seed, normal=normal).reshape(offsets.shape)


def normal(seed: int, offsets: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Standard normals ``normal(seed, i)`` for every index i in `offsets`.

    Args:
        seed: uint64 stream seed.
        offsets: int64 tensor of non-negative indices, any shape.
        backend: "auto", "triton", "cpp" or "torch".

    Returns:
        float32 tensor shaped like `offsets`.

    Example:
        >>> z = normal(7, torch.arange(8))
    """
    return _sample(seed, offsets, backend, normal=True)


def uniform(seed: int, offsets: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """The uniforms in [0, 1) that ``normal`` is built from (index i: word i % 4 of block i // 4).

    Args / Returns / Example: as for :func:`normal`.
    """
    return _sample(seed, offsets, backend, normal=False)


# "round": stochastic rounding of an update pass; "flush" / "settle": of LOZO's virtual flushes at
# a V refresh / at settle().
ROLES = {"u": 0, "v": 1, "full": 2, "step": 3, "search": 4, "round": 5, "flush": 6, "settle": 7}


@dataclass(frozen=True)
class RunSeeds:
    """Derives every seed of a run from one run seed, deterministically.

    ``seed(index, tensor, role)`` = lo | hi << 32 of the first two words of
    Philox4x32-10(counter = (lo32(index), hi32(index), tensor, ROLES[role]), key = (lo32(run_seed),
    hi32(run_seed))), where `index` is the step (or, for LOZO's lazily redrawn V, the V epoch),
    `tensor` the parameter's position in the optimizer's parameter list, and `role` one of
    the names of ROLES. It serialises to ``{"run_seed": ...}``.

    Example:
        >>> seeds = RunSeeds(1234)
        >>> seeds.seed(0, 5, "u") == RunSeeds.from_dict(seeds.to_dict()).seed(0, 5, "u")
        True
    """

    run_seed: int

    def __post_init__(self):
        object.__setattr__(self, "run_seed", as_seed(self.run_seed, "run_seed"))

    def seeds(self, index: int, n_tensors: int, role: str) -> list[int]:
        """Seeds of tensors 0 .. n_tensors - 1 for step (or epoch) `index` and `role`."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {sorted(ROLES)}, got {role!r}")
        index = as_seed(index, "index")
        if not 0 <= n_tensors <= MASK32:
            raise ValueError(f"n_tensors must be in 0..2**32-1, got {n_tensors}")
        counters = torch.zeros(n_tensors, 4, dtype=torch.int64)
        counters[:, 0] = index & MASK32
        counters[:, 1] = index >> 32
        counters[:, 2] = torch.arange(n_tensors)
        counters[:, 3] = ROLES[role]
        key = (self.run_seed & MASK32, self.run_seed >> 32)
        if has_extension(counters.device):  # 0.01 ms where the reference takes 1 ms
            words = torch.ops.zofast.philox4x32(counters, *key)
        else:
            from zofast.kernels.philox import philox4x32_ref

            words = philox4x32_ref(counters, *key)
        return [lo | hi << 32 for lo, hi in words[:, :2].tolist()]

    def seed(self, index: int, tensor: int, role: str) -> int:
        """One seed; see the class docstring."""
        return self.seeds(index, tensor + 1, role)[tensor]

    def to_dict(self) -> dict:
        return {"run_seed": self.run_seed}

    @classmethod
    def from_dict(cls, data: dict) -> RunSeeds:
        return cls(int(data["run_seed"]))
