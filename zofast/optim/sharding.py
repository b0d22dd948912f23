"""Sharded parameters (FSDP2, DTensor): each rank perturbs and updates its own shard.

zofast's noise is a pure function of (seed, global index), so a rank can generate the noise of
its shard alone: a parameter sharded on dim 0 (``Shard(0)``, FSDP2's layout, on a 1-D mesh) is
the rows [r0, r0 + m_local) of its matrix view, and every engine call on the local tensor takes
r0 as its row offset (full-rank noise: r0 · row length as its element offset). The noise equals
the unsharded parameter's, bit for bit, and nothing is gathered beyond FSDP's own all-gathers.

Sharded tensors are perturbed in place (the forward all-gathers the perturbed shards): FSDP2's
mixed precision (``fully_shard(..., mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))``
on float32 weights) keeps float32 shards and computes in bf16, where in-place rounding is
negligible. Shards stored in bf16 / fp16 would random-walk (every pass rounds them): mode="auto"
refuses them, mode="inplace" takes them with its warning. The exact modes (shadow, virtual)
perturb through the layers' forwards, which FSDP2 feeds with gathered copies: not for shards.
Other layouts (sharding on another dim, 2-D meshes) raise a ValueError.

FSDP2 keeps the root module's gathered parameters after a forward (``reshard_after_forward`` is
False for the root), and a later forward reuses them without gathering again: it would not see
a perturbation written to the shards since. The optimizer therefore reshards every FSDP module of
the model (``FSDPModule.reshard()``, nothing to do where already sharded) when it is built and
after every pass that writes shards, so each forward gathers the current shards; it needs the
model for that (``LOZO(model, ...)`` or ``model=model``).
"""

from __future__ import annotations

import torch

LOW_PRECISION = (torch.bfloat16, torch.float16)


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


def fsdp_modules(model: torch.nn.Module | None) -> list:
    """The FSDP2 modules of `model` (those ``fully_shard`` wrapped), resharded: their parameters
    are the sharded ones afterwards. [] without a model or FSDP2."""
    if model is None:
        return []
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch built without distributed
        return []
    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    reshard(modules)
    return modules


def reshard(modules) -> None:
    """Make every FSDP module's next forward gather its (just written) shards again."""
    for module in modules:
        module.reshard()


def check_shards(params, mode: str, fsdp: list) -> None:
    """ValueError, before anything is written, for sharded parameters an optimizer cannot train
    as asked (see the module docstring): an exact mode, bf16 / fp16 shards under mode="auto",
    or no model to reshard."""
    sharded = [p for p in params if local_shard(p)[2]]
    if not sharded:
        return
    if mode not in ("auto", "inplace"):
        raise ValueError(
            f"sharded (FSDP2 / DTensor) parameters are perturbed in place, not in "
            f"mode={mode!r}: pass mode='inplace' (with FSDP2's mixed precision the shards stay "
            "float32, where in-place rounding is negligible)"
        )
    low = sorted({str(p.dtype).removeprefix("torch.") for p in sharded if p.dtype in LOW_PRECISION})
    if low and mode == "auto":
        raise ValueError(
            f"sharded parameters stored in {', '.join(low)}: zofast perturbs shards in place, "
            "and every pass would round them (the weights random-walk). Keep the weights float32 "
            "and let FSDP2 compute in bf16: fully_shard(module, mp_policy=MixedPrecisionPolicy("
            "param_dtype=torch.bfloat16)); or pass mode='inplace' to accept the rounding drift"
        )
    if not fsdp:
        raise ValueError(
            "sharded (FSDP2 / DTensor) parameters need the model (LOZO(model, ...) or "
            "model=model): the optimizer reshards its FSDP modules after writing shards, so that "
            "the next forward gathers them again"
        )
