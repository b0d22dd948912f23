"""Sharded parameters (FSDP2, DTensor): each rank perturbs and updates its own shard.

zofast's noise is a pure function of (seed, global index), so a rank can generate the noise of
its shard alone: a parameter sharded on dim 0 (``Shard(0)``, FSDP2's layout, on a 1-D mesh) is
the rows [r0, r0 + m_local) of its matrix view, and every engine call on the local tensor takes
r0 as its row offset (full-rank noise: r0 · row length as its element offset). The noise equals
the unsharded parameter's, bit for bit, and nothing is gathered beyond FSDP's own all-gathers.

Sharded tensors are perturbed in place (the forward all-gathers the perturbed shards): FSDP2's
mixed precision keeps float32 shards and computes in bf16, where in-place rounding is
negligible. Other layouts (sharding on another dim, 2-D meshes) raise a ValueError.
"""

from __future__ import annotations

import torch


def local_shard(p: torch.Tensor) -> tuple[torch.Tensor, int, bool]:
    """(the tensor the engine writes, global index of its first row, sharded) of a parameter:
    (p, 0, False) for a plain tensor, (its local shard, r0, True) for a DTensor."""
    try:
        from torch.distributed.tensor import DTensor, Replicate, Shard
    except ImportError:  # a torch built without distributed
        return p, 0, False
    if not isinstance(p, DTensor):
        return p, 0, False
    mesh, placements = p.device_mesh, p.placements
    if mesh.ndim != 1 or not all(
        isinstance(x, Replicate) or (isinstance(x, Shard) and x.dim == 0) for x in placements
    ):
        raise ValueError(
            f"a parameter sharded as {placements} on a {mesh.ndim}-D mesh: zofast maps only "
            "Shard(0) or Replicate on a 1-D mesh (FSDP2's fully_shard) to global indices"
        )
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(p.shape, mesh, placements)
    return p.to_local(), int(offset[0]) if offset else 0, True
