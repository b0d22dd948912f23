"""Streamed offload's per-block preparation: the host work a step does for a block's tensors (the
low-rank factors of its virtual matrices, the perturbed copies of its biases and norms) runs just
before that block's upload, while the previous blocks stream and compute, instead of for every
block before the first forward.

The optimizer's parts group their tensors by :func:`home`: the device, or for a tensor of a
streamed block (:mod:`zofast.offload`) the block. What a part would make for a block's group when
a forward's coefficient is set, it hands to :func:`defer` instead; :class:`BlockPreparations`
runs it from the block pre-hooks, before the block's upload is queued (block 0's at the first
pre-hook, block i + 1's while block i's upload is in flight). What is deferred is made by the
same calls on the same host tensors, so its numbers are those the part would have made up
front; a part whose values are read elsewhere (an update) makes them at that read if they are
still pending (see each part).

Example:
    >>> prep = BlockPreparations(2)
    >>> prep.defer(1, "factors", lambda: print("block 1 prepared"))
    >>> prep.run(0); prep.run(1)
    block 1 prepared
"""

from __future__ import annotations

import weakref

import torch

__all__ = [
    "BlockPreparations",
    "cancel",
    "defer",
    "defer_or_run",
    "home",
    "register",
    "unregister",
]

# id(block parameter) -> (a weak reference to it, its handle's BlockPreparations, block index),
# for every live stream() (ids: tensors compare elementwise, no WeakKeyDictionary).
_BLOCKS: dict[int, tuple] = {}
VERSION = [0]  # counts register / unregister calls (what groups by home() may cache on)


class BlockPreparations:
    """Work deferred per block: at most one callable per (block, key), run once, in the order
    deferred.

    Args:
        count: the number of blocks.
        home: where the blocks' tensors live between their forwards.

    Attributes:
        log: None, or a list that records (block, key) of every callable run (tests).
    """

    def __init__(self, count: int, home="cpu"):
        self.home = torch.device(home)
        self._pending: list[dict] = [{} for _ in range(count)]
        self.log: list | None = None

    def defer(self, i: int, key, fn) -> None:
        """Run `fn` before block i's next upload (replacing what `key` deferred there)."""
        self._pending[i].pop(key, None)
        self._pending[i][key] = fn

    def cancel(self, key) -> None:
        """Drop what `key` deferred, for every block."""
        for pending in self._pending:
            pending.pop(key, None)

    def run(self, i: int) -> None:
        """Run what is deferred for block i (each callable leaves the queue before it runs)."""
        pending = self._pending[i]
        while pending:
            key = next(iter(pending))
            fn = pending.pop(key)
            if self.log is not None:
                self.log.append((i, key))
            fn()

    def clear(self) -> None:
        for pending in self._pending:
            pending.clear()


def register(params_per_block, preparations: BlockPreparations) -> None:
    """Make the tensors of each block (params_per_block[i]: its parameters) block tensors."""
    for i, params in enumerate(params_per_block):
        for p in params:
            _BLOCKS[id(p)] = (weakref.ref(p), preparations, i)
    VERSION[0] += 1


def unregister(params_per_block) -> None:
    for params in params_per_block:
        for p in params:
            _BLOCKS.pop(id(p), None)
    VERSION[0] += 1


def _entry(param: torch.Tensor) -> tuple | None:
    """(BlockPreparations, block index) of a block tensor, else None."""
    entry = _BLOCKS.get(id(param))
    if entry is None or entry[0]() is not param:
        return None
    return entry[1:]


def home(param: torch.Tensor):
    """Where `param`'s preparation belongs: ``(device, None)``, or ``(device, i)`` for a tensor
    of streamed block i (its device being its host tensor's, whatever is swapped in)."""
    entry = _entry(param)
    if entry is None:
        return param.device, None
    return entry[0].home, entry[1]


def defer(param: torch.Tensor, key, fn) -> bool:
    """Defer `fn` to the block pre-hooks if `param` is a block tensor (True); else False
    (nothing done: the caller runs it now)."""
    entry = _entry(param)
    if entry is None:
        return False
    entry[0].defer(entry[1], key, fn)
    return True


def defer_or_run(tensors, key, fn) -> None:
    """:func:`defer` `fn` to the block of `tensors` (objects with a ``param``, one home) if
    they are a streamed block's, else run it now (also when there are none)."""
    if not tensors or not defer(tensors[0].param, key, fn):
        fn()


def cancel(param: torch.Tensor, key) -> None:
    """Drop what `key` deferred for the blocks of `param`'s stream (if it is a block tensor)."""
    entry = _entry(param)
    if entry is not None:
        entry[0].cancel(key)
