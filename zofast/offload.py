"""Models larger than GPU memory: the blocks' weights live on the host and stream to the GPU.

:func:`stream` keeps the parameters of a model's repeated blocks (found by structure: the
longest ``nn.ModuleList`` of children of one class, e.g. OPT's ``model.decoder.layers``, GPT-2's
``transformer.h``, Llama's ``model.layers``, BERT's ``encoder.layer``) in pinned host memory and
the rest of the model (embeddings, head, final norm, every buffer) on the GPU. A forward
pre-hook on each block swaps GPU copies in as its parameters' ``.data`` for the block's forward
and an always-called forward hook swaps the host tensors back; while block i computes, the
copies of block i + 1 .. i + prefetch go up on a side CUDA stream into a ring of prefetch + 1
reusable buffer sets. GPU memory: the non-block parts, prefetch + 1 blocks, activations.

The optimizer is made after :func:`stream` and trains the host tensors: to it the model is one
split by a device map (:mod:`zofast.device_map`), block tensors on the CPU and the rest on the
GPU. Every pass over the block tensors (perturbations written in place, the updates with their
stochastic rounding, virtual mode's flush) runs where ``update`` says: ``"host"``, with the C++
engine, exactly as for a CPU-resident layer; ``"gpu"``, on an uploaded copy that is written back
before the pass returns (:mod:`zofast.offload_update`; the GPU's normals, within float32
rounding of the host's). Between the optimizer's writes and the forwards nothing but the
copy sits: the forward sees the host tensor's values bit for bit. The exact modes' hooks act on
the swapped-in GPU copy inside the block's forward: virtual mode's low-rank terms (their small
factors made on the host and moved to the GPU), shadow mode's temporaries W + c·Z (built on the
GPU from the copy, never written back), the paired hooks' per-row terms. What a step makes on
the host for a block's tensors (virtual factors, paired or preset W ± c·Z copies) is made just
before that block's upload, while the blocks before it stream (:mod:`zofast.offload_prepare`),
not for every block before the first forward. A forward returns only
once every copy of it has been read (the side stream is synchronised by a hook on the model), so
the optimizer can write the host tensors right after a closure returns.

On a GPU the host tensors are one buffer registered as pinned (:mod:`zofast.offload_host`).

Supported: every optimizer and mode that trains a model split by a device map (LOZO, LOZO-M,
MeZO; in place, virtual, shadow; ``paired=True``). Not done here: training with gradients (a
swap is invisible to autograd), and an update fused into the next forward's upload (the shadow
presets copy the host tensors before the forward, so they must be current when a step returns).

Example:
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(n_embd=8, n_layer=2, n_head=2, vocab_size=20))
    >>> streamed = stream(model, device="cpu")  # a GPU: device="cuda"
    >>> [name for name, _ in streamed.blocks]
    ['transformer.h.0', 'transformer.h.1']
    >>> streamed.remove()
"""

from __future__ import annotations

import torch

from zofast.offload_host import HostBuffer
from zofast.offload_prepare import BlockPreparations, register, unregister
from zofast.offload_update import DeviceWrites

__all__ = ["Streamed", "find_blocks", "stream"]


def find_blocks(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The model's repeated blocks: the children of its longest ``nn.ModuleList`` whose
    children are all of one class (ties: the one holding most parameters), as (name, block).

    Args:
        model: the model.

    Returns:
        [(qualified name, block), ...] in the list's order.

    Raises:
        ValueError: no ``nn.ModuleList`` of at least two children of one class with parameters.

    Example:
        >>> net = torch.nn.Module(); net.layers = torch.nn.ModuleList(torch.nn.Linear(2, 2)
        ...                                                           for _ in range(3))
        >>> [name for name, _ in find_blocks(net)]
        ['layers.0', 'layers.1', 'layers.2']
    """
    best, best_key = None, None
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or len(module) < 2:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        numel = sum(p.numel() for p in module.parameters())
        if not numel:
            continue
        key = (len(module), numel)
        if best_key is None or key > best_key:
            best, best_key = (name, module), key
    if best is None:
        raise ValueError(
            f"found no repeated blocks in {type(model).__name__} (an nn.ModuleList of at least "
            "two modules of one class with parameters): pass blocks=[...] to stream()"
        )
    prefix = f"{best[0]}." if best[0] else ""
    return [(f"{prefix}{i}", block) for i, block in enumerate(best[1])]


class Streamed:
    """A model whose blocks stream to the compute device (see the module docstring); made by
    :func:`stream`.

    Attributes:
        blocks: [(name, block), ...], in order.
        device: the compute device.
        home: where the block parameters live between their forwards.
        uploads: the number of block uploads so far (a counter for tests and benchmarks).
        host_buffer: the registered pinned host buffer (:class:`zofast.offload_host.HostBuffer`),
            or None.
        writes: update="gpu": the :class:`zofast.offload_update.DeviceWrites` that runs the
            optimizer's passes over the block tensors; None: the host engine runs them.
        preparations: the optimizer's per-block host work, run before each block's upload
            (:class:`zofast.offload_prepare.BlockPreparations`).
    """

    def __init__(self, model, blocks, device, home, prefetch: int, host_buffer=None, writes=None):
        self.model, self.blocks, self.device, self.home = model, blocks, device, home
        self.prefetch, self.host_buffer, self.writes = prefetch, host_buffer, writes
        self.uploads = 0
        self._params = [[p for p in block.parameters()] for _, block in blocks]
        self.preparations = BlockPreparations(len(blocks), home)
        register(self._params, self.preparations)
        self._index = {id(block): i for i, (_, block) in enumerate(blocks)}
        self._slots: list[list[torch.Tensor] | None] = [None] * (prefetch + 1)
        self._cuda = device.type == "cuda"
        self._side = torch.cuda.Stream(device) if self._cuda else None
        self._free = [None] * (prefetch + 1)  # per slot: the event after its last block's forward
        self._ready: dict[int, object] = {}  # block index -> its upload's event (None: done)
        self._frames: list[tuple[int, list]] = []  # (block, its host tensors) per forward
        self._handles: list = []
        for _, block in blocks:
            self._handles.append(block.register_forward_pre_hook(self._pre))
            self._handles.append(block.register_forward_hook(self._post, always_call=True))
        self._handles.append(model.register_forward_hook(self._settle, always_call=True))

    def _slot(self, i: int) -> list[torch.Tensor]:
        """Block i's buffer set on the device (made, or remade for other shapes, here)."""
        k = i % len(self._slots)
        params = self._params[i]
        held = self._slots[k]
        if held is None or [(t.shape, t.dtype) for t in held] != [
            (p.shape, p.dtype) for p in params
        ]:
            held = self._slots[k] = [torch.empty_like(p, device=self.device) for p in params]
        return held

    def _upload(self, i: int) -> None:
        """Prepare block i's tensors (the optimizer's deferred host work: it may swap in what the
        upload reads), then start copying its host tensors into its slot (on the side stream on
        a GPU)."""
        self.preparations.run(i)
        k = i % len(self._slots)
        slot, sources = self._slot(i), [p.data for p in self._params[i]]  # allocated outside
        self.uploads += 1
        if not self._cuda:
            torch._foreach_copy_(slot, sources)
            self._ready[i] = None
            return
        with torch.cuda.stream(self._side):
            if self._free[k] is not None:
                self._side.wait_event(self._free[k])
            for t, source in zip(slot, sources, strict=True):
                t.copy_(source, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._side)
        self._ready[i] = event

    def _pre(self, block, args):
        i = self._index[id(block)]
        if i not in self._ready or i == 0:  # a new forward, or blocks out of order
            self._drain()
            self._upload(i)
        for j in range(i + 1, min(i + 1 + self.prefetch, len(self.blocks))):
            if j not in self._ready:
                self._upload(j)
        event = self._ready.pop(i)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
        params, slot = self._params[i], self._slot(i)
        held = [p.data for p in params]
        self._frames.append((i, held))
        for p, t in zip(params, slot, strict=True):
            p.data = t

    def _post(self, block, args, out):
        if not self._frames:
            return
        i, held = self._frames.pop()
        for p, t in zip(self._params[i], held, strict=True):
            p.data = t
        if self._cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self._free[i % len(self._slots)] = event

    def _settle(self, module, args, out):
        """After the model's forward: every copy done (the host tensors may be written now)."""
        self._drain()

    def _drain(self) -> None:
        if self._cuda:
            self._side.synchronize()
        self._ready.clear()

    def restore(self) -> None:
        """Put the host tensors back into blocks whose forward was interrupted. Idempotent."""
        while self._frames:
            i, held = self._frames.pop()
            for p, t in zip(self._params[i], held, strict=True):
                p.data = t
        self._drain()

    def remove(self) -> None:
        """Remove the hooks, give the block tensors' passes back to the host engine and
        unregister the pinned buffer (the block parameters stay on the host). Idempotent."""
        self.restore()
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._slots = [None] * len(self._slots)
        unregister(self._params)
        self.preparations.clear()
        if self.writes is not None:
            self.writes.release()
        if self.host_buffer is not None:
            self.host_buffer.release()


def stream(
    model: torch.nn.Module,
    device="cuda",
    blocks=None,
    prefetch: int = 1,
    home="cpu",
    pin: bool | None = None,
    update: str = "host",
) -> Streamed:
    """Keep `model`'s blocks on the host and stream them to `device` block by block.

    Call it before making the optimizer (which then trains the host tensors). The model's
    parameters and buffers are moved in place (the Parameter objects are kept).

    Args:
        model: the model (anywhere; e.g. loaded on the CPU).
        device: the compute device. ``"cpu"`` with ``home="cpu"`` runs every swap and copy on
            the CPU (a stand-in device for tests).
        blocks: the blocks to stream, modules of `model` in forward order; None: found by
            :func:`find_blocks`.
        prefetch: how many blocks ahead are uploaded while a block computes (≥ 1); the device
            holds prefetch + 1 blocks' parameters.
        home: where the block parameters live.
        pin: put the host tensors in one host buffer registered as pinned (asynchronous copies;
            :mod:`zofast.offload_host`); None: when `device` is a GPU.
        update: where the optimizer's passes over the block tensors run: ``"host"`` (the C++
            engine on the host tensors) or ``"gpu"`` (on `device`, written back before each
            pass returns; :mod:`zofast.offload_update`): the same passes, with the noise of the
            device that runs them (the normals differ in float32 rounding across devices).

    Returns:
        The :class:`Streamed` handle (``remove()`` takes the hooks off).

    Raises:
        ValueError: prefetch < 1, update not "host" / "gpu", no blocks found, or a block
            parameter also used outside the blocks (tied weights) or in two blocks.
        RuntimeError: pin=True without CUDA.

    Example:
        >>> from transformers import OPTConfig, OPTForCausalLM
        >>> model = OPTForCausalLM(OPTConfig(hidden_size=8, num_hidden_layers=2, ffn_dim=8,
        ...     num_attention_heads=2, vocab_size=20, word_embed_proj_dim=8))
        >>> streamed = stream(model, device="cpu")
        >>> streamed.blocks[0][0]
        'model.decoder.layers.0'
        >>> streamed.remove()
    """
    if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 1:
        raise ValueError(f"prefetch must be an integer ≥ 1, got {prefetch!r}")
    if update not in ("host", "gpu"):
        raise ValueError(f"update must be 'host' or 'gpu', got {update!r}")
    device, home = torch.device(device), torch.device(home)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if blocks is None:
        named = find_blocks(model)
    else:
        names = {id(m): n for n, m in model.named_modules()}
        missing = [type(b).__name__ for b in blocks if id(b) not in names]
        if missing:
            raise ValueError(f"blocks must be modules of the model; {missing} are not")
        named = [(names[id(b)], b) for b in blocks]
    owners: dict[int, int] = {}
    for i, (_, block) in enumerate(named):
        for p in block.parameters():
            if owners.setdefault(id(p), i) != i:
                raise ValueError("a parameter is shared by two blocks: it cannot be streamed")
    inside = {id(m) for _, block in named for m in block.modules()}
    for name, module in model.named_modules():
        if id(module) in inside:
            continue
        shared = [n for n, p in module.named_parameters(recurse=False) if id(p) in owners]
        if shared:
            raise ValueError(
                f"{name}.{shared[0]} is a block parameter used outside the blocks (tied "
                "weights): it cannot be streamed"
            )
    pin = device.type == "cuda" and home.type == "cpu" if pin is None else pin
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.to(home if id(p) in owners else device)  # in place where it is
        for module in model.modules():
            for key, b in module._buffers.items():
                if b is not None:
                    module._buffers[key] = b.to(device)
    held = [p for _, block in named for p in block.parameters()]
    host_buffer = HostBuffer(held) if pin else None
    writes = None
    if update == "gpu":
        writes = DeviceWrites(device)
        writes.register(p.data for p in held)
    return Streamed(model, named, device, home, prefetch, host_buffer, writes)
