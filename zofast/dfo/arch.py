"""Where DFO-LoRA's low-rank modules go, and the forward hooks that apply them.

Four families of transformers models are recognised, by the names of their modules (so that
derived models with the same layout, e.g. Mistral or Qwen2 for Llama, are recognised too):

* ``bert``: layers ``encoder.layer``; projections ``attention.self.{query,key,value}``
  (``nn.Linear``); no final module.
* ``gpt2``: layers ``h``; one fused Conv1D ``attn.c_attn`` whose output columns
  ``[0, D)``, ``[D, 2D)``, ``[2D, 3D)`` are query, key, value; final module ``ln_f``.
* ``opt``: layers ``decoder.layers``; projections ``self_attn.{q,k,v}_proj``; final modules
  ``decoder.final_layer_norm`` and ``decoder.project_out``.
* ``llama``: layers ``layers``; projections ``self_attn.{q,k,v}_proj``; final module ``norm``.

Paths are relative to ``model.base_model`` (BERT/RoBERTa/MiniLM encoders, ``transformer`` of
GPT-2, ``model`` of OPT and Llama). "final modules" are what the base model applies to the last
layer's output to make ``last_hidden_state`` (missing ones, e.g. OPT-350m's final layer norm, are
skipped).

The update of a target is ``y = x·W + (x·A)·B`` with ``A`` of shape ``(in_features, r)`` and
``B`` of shape ``(r, out_features)``, added by a forward hook on the projection module to its
output (for GPT-2's fused ``c_attn``, whose Conv1D weight is ``(in, 3·D)``, only the columns of
the target's slice ``[i·D, (i+1)·D)`` get it). A hook whose layer has no active update returns
``None``, so the module's output is untouched bit for bit: attaching the hooks changes nothing
until an update is set.

Example:
    >>> arch = find_architecture(model)  # a transformers model
    >>> hooks = LowRankHooks(model, arch, ("query", "key"))
    >>> hooks.set_layer(0, {"query": (A_q, B_q), "key": (A_k, B_k)})  # A: (D, r), B: (r, D)
    >>> hooks.remove()
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "TARGET_NAMES",
    "Target",
    "Architecture",
    "find_architecture",
    "LowRankHooks",
]

TARGET_NAMES = ("query", "key", "value")
"""Projections that can receive a low-rank update, in chunk order (A_Q, B_Q, A_K, B_K, A_V, B_V)."""


@dataclass(frozen=True)
class _Family:
    name: str
    layers: str
    paths: Mapping[str, str] | None
    fused: str | None
    final: tuple[str, ...]
    tail: tuple[str, ...] = ()


_FAMILIES = (
    _Family(
        "bert",
        "encoder.layer",
        {
            "query": "attention.self.query",
            "key": "attention.self.key",
            "value": "attention.self.value",
        },
        None,
        (),
        ("attention.output.dense", "intermediate.dense"),
    ),
    _Family("gpt2", "h", None, "attn.c_attn", ("ln_f",), ("attn.c_proj", "mlp.c_fc")),
    _Family(
        "opt",
        "decoder.layers",
        {"query": "self_attn.q_proj", "key": "self_attn.k_proj", "value": "self_attn.v_proj"},
        None,
        ("decoder.final_layer_norm", "decoder.project_out"),
        ("self_attn.out_proj",),
    ),
    _Family(
        "llama",
        "layers",
        {"query": "self_attn.q_proj", "key": "self_attn.k_proj", "value": "self_attn.v_proj"},
        None,
        ("norm",),
        ("self_attn.o_proj", "mlp"),
    ),
)


@dataclass(frozen=True)
class Target:
    """One projection of one layer that receives a low-rank update ``(x·A)·B``.

    Args:
        layer: index of the transformer layer.
        name: ``"query"``, ``"key"`` or ``"value"``.
        module_name: qualified name of the projection module in ``model.named_modules()``.
        in_features: ``D_in``, rows of ``A``.
        out_features: ``D_out``, columns of ``B`` (the slice width for a fused projection).
        out_slice: ``(start, stop)`` output columns of a fused projection (GPT-2 ``c_attn``),
            ``None`` for a projection of its own (``nn.Linear``).

    Example:
        >>> Target(0, "query", "encoder.layer.0.attention.self.query", 384, 384, None).fused
        False
    """

    layer: int
    name: str
    module_name: str
    in_features: int
    out_features: int
    out_slice: tuple[int, int] | None

    @property
    def fused(self) -> bool:
        """Whether the target is a slice of a fused QKV projection (PEFT: fan_in_fan_out)."""
        return self.out_slice is not None


@dataclass(frozen=True)
class Architecture:
    """The recognised layout of a model.

    Args:
        family: ``"bert"``, ``"gpt2"``, ``"opt"`` or ``"llama"``.
        base_name: qualified name of the base model (``""`` when the model is its own base).
        layers_name: qualified name of the ``nn.ModuleList`` of transformer layers.
        num_layers: number of transformer layers.
        targets: ``targets[layer][name]`` for every layer and every name in ``TARGET_NAMES``.
        final_names: qualified names of the modules applied after the last layer (existing ones).
        tail_names: qualified names of modules of the *last* layer that act on each token
            separately and whose outputs only reach the layer's output through per-token
            operations and a residual sum (BERT ``attention.output.dense`` and
            ``intermediate.dense``, GPT-2 ``attn.c_proj`` and ``mlp.c_fc``, OPT
            ``self_attn.out_proj``, Llama ``self_attn.o_proj`` and ``mlp``): when only a few
            positions of the last hidden state are read, their inputs can be cut to those
            positions and the residual sum broadcasts the result back (rows at the other
            positions are then meaningless; see :mod:`zofast.dfo.population`).

    Example:
        >>> arch = find_architecture(model)
        >>> arch.family, arch.num_layers
        ('bert', 6)
    """

    family: str
    base_name: str
    layers_name: str
    num_layers: int
    targets: tuple[Mapping[str, Target], ...]
    final_names: tuple[str, ...]
    tail_names: tuple[str, ...] = ()

    def describe(self, names: Sequence[str]) -> list[list[list]]:
        """JSON-able description of the targets ``names`` of every layer (for checkpoints).

        Args:
            names: target names, e.g. ``("query", "key")``.

        Returns:
            ``[[module_name, in_features, out_features, out_slice], ...]`` per layer.

        Example:
            >>> arch.describe(("query",))[0]
            [['encoder.layer.0.attention.self.query', 384, 384, None]]
        """
        out = []
        for layer in self.targets:
            row = []
            for name in names:
                t = layer[name]
                sl = list(t.out_slice) if t.out_slice is not None else None
                row.append([t.module_name, t.in_features, t.out_features, sl])
            out.append(row)
        return out


def _get(root: nn.Module, path: str) -> nn.Module | None:
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj if isinstance(obj, nn.Module) else None


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _is_conv1d(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 2
        and getattr(module, "nf", None) == weight.shape[1]
    )


def _family_targets(base: nn.Module, base_name: str, fam: _Family):
    layers = _get(base, fam.layers)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        return None
    out = []
    for i, layer in enumerate(layers):
        prefix = _join(base_name, fam.layers, str(i))
        found: dict[str, Target] = {}
        if fam.fused is not None:
            mod = _get(layer, fam.fused)
            if mod is None or not _is_conv1d(mod):
                return None
            d_in, d_out3 = mod.weight.shape
            if d_out3 % 3:
                return None
            width = d_out3 // 3
            for j, name in enumerate(TARGET_NAMES):
                found[name] = Target(
                    i,
                    name,
                    _join(prefix, fam.fused),
                    int(d_in),
                    int(width),
                    (j * width, (j + 1) * width),
                )
        else:
            for name, path in fam.paths.items():
                mod = _get(layer, path)
                if not isinstance(mod, nn.Linear):
                    return None
                found[name] = Target(
                    i, name, _join(prefix, path), mod.in_features, mod.out_features, None
                )
        out.append(found)
    return tuple(out)


def find_architecture(model: nn.Module) -> Architecture:
    """Recognise the transformer layers and attention projections of a transformers model.

    Args:
        model: a transformers model (``*ForMaskedLM``, ``*ForCausalLM``, a bare encoder ...).

    Returns:
        The :class:`Architecture`.

    Raises:
        ValueError: if the model has no layout of the families in the module docstring.

    Example:
        >>> find_architecture(load_model(default_model_path()).model).family
        'bert'
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    base = getattr(model, "base_model", model)
    if not isinstance(base, nn.Module):
        base = model
    base_name = next((n for n, m in model.named_modules() if m is base), "")
    for fam in _FAMILIES:
        targets = _family_targets(base, base_name, fam)
        if targets is None:
            continue
        finals = tuple(_join(base_name, name) for name in fam.final if _get(base, name) is not None)
        last = _join(base_name, fam.layers, str(len(targets) - 1))
        layer = _get(base, _join(fam.layers, str(len(targets) - 1)))
        tails = tuple(_join(last, name) for name in fam.tail if _get(layer, name) is not None)
        return Architecture(
            family=fam.name,
            base_name=base_name,
            layers_name=_join(base_name, fam.layers),
            num_layers=len(targets),
            targets=targets,
            final_names=finals,
            tail_names=tails,
        )
    raise ValueError(
        f"{type(model).__name__} has no recognised attention layers: DFO-LoRA supports "
        "BERT/RoBERTa-style encoders (encoder.layer[i].attention.self.query/key), GPT-2 "
        "(h[i].attn.c_attn), OPT (decoder.layers[i].self_attn.q_proj/k_proj) and Llama-style "
        "decoders (layers[i].self_attn.q_proj/k_proj)"
    )


_MARK = "_zofast_low_rank_hook"
"""Attribute set on every hook function of :class:`LowRankHooks`: how a second one finds them."""


class LowRankHooks:
    """Forward hooks that add ``(x·A)·B`` to the outputs of the target projections.

    Every layer is in one of three states: inactive (no update: outputs are untouched), single
    (one ``A`` of shape ``(D_in, r)`` and ``B`` of shape ``(r, D_out)`` per target, applied to
    every row), or population (``A`` of shape ``(P, D_in, r)`` and ``B`` of shape
    ``(P, r, D_out)``: the input's rows are ``P`` equal-sized copy-major groups, as made by
    :meth:`zofast.encoding.Batch.repeat`, and group ``p`` gets candidate ``p``'s update, computed
    with batched matrix products on a ``(P, rows·T / P, D_in)`` view). ``version[layer]`` counts
    the changes of a layer's single/inactive state, so that cached hidden states of the layers
    above can be invalidated.

    Args:
        model: the model the hooks go on.
        arch: its :class:`Architecture`.
        names: target names that get updates, e.g. ``("query", "key")``.

    Raises:
        ValueError: if a target module already has a LowRankHooks hook (two would add both
            updates); no hook is attached then.

    Example:
        >>> hooks = LowRankHooks(model, find_architecture(model), ("query", "key"))
        >>> hooks.set_layer(3, None)  # layer 3 back to the original projections
    """

    def __init__(self, model: nn.Module, arch: Architecture, names: Sequence[str]):
        self.arch = arch
        self.names = tuple(names)
        self.version = [0] * arch.num_layers
        self._single: list[dict[str, tuple[torch.Tensor, torch.Tensor]] | None] = [
            None
        ] * arch.num_layers
        self._population: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._merged_layers: set[int] = set()
        self._merge_cache: dict[int, tuple[int, dict[str, torch.Tensor]]] = {}
        modules = dict(model.named_modules())
        self._modules = modules
        by_module: dict[str, list[Target]] = {}
        for layer in arch.targets:
            for name in self.names:
                t = layer[name]
                by_module.setdefault(t.module_name, []).append(t)
        self._by_module = {name: tuple(ts) for name, ts in by_module.items()}
        for module_name in by_module:  # checked for every module before any hook goes on
            if any(getattr(h, _MARK, False) for h in modules[module_name]._forward_hooks.values()):
                raise ValueError(
                    f"the model already has DFO-LoRA hooks (on {module_name!r}): call remove() "
                    "on the DFOLoRA (or LowRankHooks) attached first; attaching twice would add "
                    "both updates"
                )
        self._handles = []
        for module_name, targets in by_module.items():
            hook = self._make_hook(tuple(targets))
            self._handles.append(modules[module_name].register_forward_hook(hook))

    def _make_hook(self, targets: tuple[Target, ...]):
        def hook(module, args, output):
            return self._apply(targets, args[0], output)

        setattr(hook, _MARK, True)
        return hook

    def _apply(self, targets: tuple[Target, ...], x: torch.Tensor, output: torch.Tensor):
        layer = targets[0].layer
        mats = self._population.get(layer)
        if mats is None:
            if layer in self._merged_layers:  # the update is in the swapped-in weight
                return None
            mats = self._single[layer]
            if mats is None:
                return None
        if not torch.is_grad_enabled() and output.is_contiguous():
            return self._apply_inplace(targets, mats, x, output)
        for t in targets:
            a, b = mats[t.name]
            if a.dim() == 2:
                delta = (x @ a) @ b
            else:
                p = a.shape[0]
                rows = x.reshape(p, -1, x.shape[-1])
                delta = torch.bmm(torch.bmm(rows, a), b).view(*x.shape[:-1], b.shape[-1])
            if t.out_slice is None:
                output = output + delta
            else:
                start, stop = t.out_slice
                output = output.clone() if torch.is_grad_enabled() else output
                output[..., start:stop] += delta
        return output

    @staticmethod
    def _apply_inplace(targets: tuple[Target, ...], mats, x: torch.Tensor, output: torch.Tensor):
        """The no-autograd path: one pass over ``x`` and an in-place ``addmm``/``baddbmm``.

        ``x·[A_1 … A_k]`` is one product for all targets of the module (GPT-2's Q and K read
        ``x`` once), and each ``(x·A)·B`` is accumulated into the output (or its column slice)
        by the matrix product itself (``beta = 1``), so no ``delta`` tensor is written and read
        back. Same arithmetic as the general path up to the rounding of the sum.
        """
        width = output.shape[-1]
        out = output.view(-1, width)
        a_all = [mats[t.name][0] for t in targets]
        r = a_all[0].shape[-1]
        a_cat = a_all[0] if len(a_all) == 1 else torch.cat(a_all, dim=-1)
        population = a_cat.dim() == 3
        if population:
            p = a_cat.shape[0]
            xa = torch.bmm(x.reshape(p, -1, x.shape[-1]), a_cat)
            out = out.unflatten(0, (p, -1))
        else:
            xa = x.reshape(-1, x.shape[-1]) @ a_cat
        for j, t in enumerate(targets):
            b = mats[t.name][1]
            part = xa[..., j * r : (j + 1) * r]
            dest = out if t.out_slice is None else out[..., t.out_slice[0] : t.out_slice[1]]
            if population:
                dest.baddbmm_(part, b)
            else:
                dest.addmm_(part, b)
        return output

    def _merged_weights(self, layer: int) -> dict[str, torch.Tensor]:
        """``W + A·B`` of every target module of a layer with a single update (cached)."""
        cached = self._merge_cache.get(layer)
        if cached is not None and cached[0] == self.version[layer]:
            return cached[1]
        mats = self._single[layer]
        out = {}
        for name, targets in self._by_module.items():
            if targets[0].layer != layer:
                continue
            weight = self._modules[name].weight
            merged = weight.detach().float()  # a copy when the weight is not float32
            merged = merged.clone() if merged.data_ptr() == weight.data_ptr() else merged
            for t in targets:
                a, b = mats[t.name]
                delta = a.float() @ b.float()  # (D_in, D_out)
                if t.out_slice is None:  # nn.Linear: weight (D_out, D_in)
                    merged += delta.T
                else:  # Conv1D: weight (D_in, 3·D), the target's columns
                    merged[:, t.out_slice[0] : t.out_slice[1]] += delta
            out[name] = nn.Parameter(merged.to(weight.dtype), requires_grad=False)
        self._merge_cache[layer] = (self.version[layer], out)
        return out

    @contextlib.contextmanager
    def merged(self, skip: int | None = None) -> Iterator[None]:
        """Within the block, layers with a single update compute ``x·(W + A·B)`` in one product.

        Each target module of such a layer (all but ``skip``, the layer being searched) gets,
        by reference, a weight with its low-rank update added (``W + A·B`` in float32, rounded
        once to the weight's dtype; like PEFT's merge), and its hook stands aside. The model's
        own weight tensors are never written: the original ``Parameter`` objects are put back
        when the block ends. Mathematically the same outputs as the hooks; it saves the hooks'
        skinny products and output passes, which cost a sixth of a batched generation's GPU
        time on RoBERTa-large shapes (``bench/results/dfo``). Costs one weight copy per merged
        module (cached per layer until the layer's update changes).

        Args:
            skip: a layer to leave to its hooks (e.g. the one with population updates).

        Example:
            >>> with hooks.merged(skip=3):
            ...     out = model(**inputs)
        """
        layers = [
            i
            for i, mats in enumerate(self._single)
            if mats is not None and i != skip and i not in self._population
        ]
        saved: list[tuple[nn.Module, nn.Parameter]] = []
        try:
            for layer in layers:
                for name, weight in self._merged_weights(layer).items():
                    module = self._modules[name]
                    saved.append((module, module._parameters["weight"]))
                    module._parameters["weight"] = weight
                self._merged_layers.add(layer)
            yield
        finally:
            for module, weight in reversed(saved):
                module._parameters["weight"] = weight
            self._merged_layers.clear()

    def set_layer(self, layer: int, mats: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None):
        """Set a layer's single update (or ``None`` for none) and bump its version.

        Args:
            layer: layer index.
            mats: ``{name: (A, B)}`` with ``A`` ``(D_in, r)``, ``B`` ``(r, D_out)`` in the model's
                dtype and device, one entry per target name; ``None`` makes the layer inactive.

        Example:
            >>> hooks.set_layer(0, {"query": (A, B), "key": (A2, B2)})
        """
        self._single[layer] = None if mats is None else dict(mats)
        self.version[layer] += 1

    def get_layer(self, layer: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
        """The single update of a layer (``None`` when inactive).

        Args:
            layer: layer index.

        Returns:
            ``{name: (A, B)}`` or ``None``.

        Example:
            >>> hooks.get_layer(0) is None
            True
        """
        return self._single[layer]

    def set_population(
        self, layer: int, mats: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None
    ) -> None:
        """Give a layer per-candidate updates (``A`` ``(P, D_in, r)``, ``B`` ``(P, r, D_out)``).

        While set, it takes precedence over the layer's single update; ``None`` clears it. It
        does not change ``version`` (population updates are temporary).

        Args:
            layer: layer index.
            mats: ``{name: (A, B)}`` or ``None``.

        Example:
            >>> hooks.set_population(2, {"query": (A, B), "key": (A2, B2)})
            >>> hooks.set_population(2, None)
        """
        if mats is None:
            self._population.pop(layer, None)
        else:
            self._population[layer] = dict(mats)

    def clear_population(self) -> None:
        """Remove every population update.

        Example:
            >>> hooks.clear_population()
        """
        self._population.clear()

    def remove(self) -> None:
        """Detach every hook: the model computes exactly what it did before.

        Example:
            >>> hooks.remove()
        """
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._population.clear()
        self._merge_cache.clear()
