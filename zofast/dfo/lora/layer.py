"""One layer's maths: search vector → random projections → the ``A`` and ``B`` factors.

Chunk ``c`` of layer ``l``'s search vector maps to its factor by ``s_{l,c} · M_{l,c} · z_{l,c}``
(:mod:`zofast.dfo.lora` has the formulas); :class:`Projections` regenerates the matrices
``M_{l,c}`` from their seeds, caches them within :data:`PROJECTION_CACHE_BYTES`, and turns a batch
of search vectors into factors. The factors go on the model through
:class:`~zofast.dfo.arch.LowRankHooks` (the forward of ``y = x·W + (x·A)·B``).

Example:
    >>> proj = Projections(find_architecture(model), ("query", "key"), rank=4,
    ...                    intrinsic_dim=500, seed=0, alpha=0.05, sigma=1.0, device="cpu")
    >>> proj.projection(0, 0).shape  # D = 384
    torch.Size([1536, 125])
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from zofast.dfo.arch import Architecture
from zofast.perturb import gaussian_noise
from zofast.rng import RunSeeds

__all__ = ["Projections", "PROJECTION_CACHE_BYTES", "chunk_sizes"]

PROJECTION_CACHE_BYTES = 256 * 2**20
"""Keep every layer's projections in memory when they take at most this many bytes."""


def chunk_sizes(total: int, parts: int) -> list[int]:
    """Sizes of ``total`` items split into ``parts`` as ``numpy.array_split`` does.

    Example:
        >>> chunk_sizes(10, 4)
        [3, 3, 2, 2]
    """
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


class Projections:
    """The random projections of every layer and the factors they make.

    Args:
        arch: the model's :class:`~zofast.dfo.arch.Architecture`.
        targets: target names in chunk order (``A_Q, B_Q, A_K, B_K, ...``).
        rank: ``r``.
        intrinsic_dim: ``d``, the length of a layer's search vector.
        seed: run seed; ``M_{l,c}`` comes from ``RunSeeds(seed).seed(l, c, "search")``.
        alpha: ``alpha`` of the scale.
        sigma: the optimizers' initial step size (the scale divides by it).
        device: where the matrices are generated.
        cache: keep every layer's matrices (True), only the last layer's (False), or decide by
            :data:`PROJECTION_CACHE_BYTES` (None).

    Example:
        >>> A, B = proj.factors(0, np.zeros((2, 500)), layer_std=1.0, dtype=torch.float32)["query"]
    """

    def __init__(
        self,
        arch: Architecture,
        targets: Sequence[str],
        rank: int,
        intrinsic_dim: int,
        seed: int,
        alpha: float,
        sigma: float,
        device: torch.device | str,
        cache: bool | None = None,
    ):
        self.arch = arch
        self.targets = tuple(targets)
        self.rank = rank
        self.intrinsic_dim = intrinsic_dim
        self.alpha = alpha
        self.sigma = sigma
        self.device = device
        self.cache = cache
        n_chunks = 2 * len(self.targets)
        self.chunk_sizes = chunk_sizes(intrinsic_dim, n_chunks)
        self.offsets = np.concatenate([[0], np.cumsum(self.chunk_sizes)]).tolist()
        self._seeds = RunSeeds(seed)
        self._cached: dict[tuple[int, int], torch.Tensor] = {}
        self.total_bytes = 4 * sum(
            self.chunk_rows(layer, c) * self.chunk_sizes[c]
            for layer in range(arch.num_layers)
            for c in range(n_chunks)
        )

    def target_of_chunk(self, c: int) -> tuple[str, int]:
        """``(target name, 0 for A or 1 for B)`` of chunk ``c``."""
        return self.targets[c // 2], c % 2

    def chunk_rows(self, layer: int, c: int) -> int:
        """Rows ``n_c`` of ``M_{layer,c}``: the entries of the factor it makes."""
        name, factor = self.target_of_chunk(c)
        t = self.arch.targets[layer][name]
        return (t.in_features if factor == 0 else t.out_features) * self.rank

    def keep_all(self) -> bool:
        """Whether every layer's matrices stay cached."""
        if self.cache is None:
            return self.total_bytes <= PROJECTION_CACHE_BYTES
        return bool(self.cache)

    def projection(self, layer: int, chunk: int) -> torch.Tensor:
        """The unscaled random projection ``M_{layer,chunk}``, ``(n_c, d_c)`` float32 normals.

        Example:
            >>> proj.projection(0, 1).shape
            torch.Size([1536, 125])
        """
        key = (layer, chunk)
        cached = self._cached.get(key)
        if cached is not None:
            return cached
        if not self.keep_all() and any(k[0] != layer for k in self._cached):
            self._cached = {}
        seed = self._seeds.seed(layer, chunk, "search")
        shape = (self.chunk_rows(layer, chunk), self.chunk_sizes[chunk])
        m = gaussian_noise(shape, seed, device=self.device)
        self._cached[key] = m
        return m

    def scales(self, layer_std: float) -> list[float]:
        """``s_{l,c} = alpha·σ_l / (sqrt(d_c)·sigma)`` of every chunk of a layer."""
        return [self.alpha * layer_std / (math.sqrt(n) * self.sigma) for n in self.chunk_sizes]

    def factors(
        self, layer: int, z: np.ndarray, layer_std: float, dtype: torch.dtype
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``A`` ``(P, D_in, r)`` and ``B`` ``(P, r, D_out)`` of every target for ``P`` vectors.

        Args:
            layer: layer index.
            z: ``(P, intrinsic_dim)`` float64 search vectors (checked by the caller).
            layer_std: ``σ_l``.
            dtype: dtype of the result.

        Returns:
            ``{name: (A, B)}`` on ``device``.

        Example:
            >>> proj.factors(0, np.zeros((1, 500)), 1.0, torch.float32)["key"][1].shape
            torch.Size([1, 4, 384])
        """
        scales = self.scales(layer_std)
        zt = torch.as_tensor(z, dtype=torch.float32, device=self.device)
        out: dict[str, list[torch.Tensor]] = {}
        p = zt.shape[0]
        for c in range(len(self.chunk_sizes)):
            name, factor = self.target_of_chunk(c)
            t = self.arch.targets[layer][name]
            lo, hi = self.offsets[c], self.offsets[c + 1]
            w = (zt[:, lo:hi] @ self.projection(layer, c).T) * scales[c]
            if factor == 0:
                w = w.view(p, t.in_features, self.rank)
            else:
                w = w.view(p, self.rank, t.out_features)
            out.setdefault(name, []).append(w.to(dtype))
        return {name: (ab[0], ab[1]) for name, ab in out.items()}
