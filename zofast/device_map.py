"""Models split over several devices: a transformers / accelerate device map.

A model whose blocks live on different devices (``cuda:0`` and ``cpu``, or several GPUs) trains
with every optimizer and mode: each trained tensor is perturbed and updated on its own device
(the noise is a pure function of seed and element index, so where a tensor lives changes none
of its numbers), and every pass over the trained tensors runs once per device, as its own CUDA
graph on each GPU (:class:`zofast.optim.passes.Passes`) and one engine call per tensor on the
CPU. The losses may come out on any device.

:func:`dispatch` splits a model with accelerate's ``dispatch_model`` such that every module runs
where its weights are. ``"cpu"`` in the map means layers computed by the CPU, not accelerate's
CPU offload, whose weights sit on the ``meta`` device between forwards and are held outside the
model, where no optimizer can perturb them; ``"disk"`` is refused for the same reason. accelerate
wraps every module's ``forward`` to move its inputs to the module's device;
:func:`moves_inputs_only` tells those wrappers apart from forwards that compute differently, so
that LOZO's virtual mode and the shadow mode's products still apply to such layers.

Example:
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    >>> model = dispatch(model, {"0": "cpu", "1": "cpu"})  # doctest: +SKIP
    >>> # on a GPU machine: {"0": 0, "1": "cpu"} runs layer 0 on cuda:0 and layer 1 on the CPU
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from collections.abc import Callable, Iterable

import torch

__all__ = [
    "by_device",
    "device_of",
    "device_types",
    "dispatch",
    "moves_inputs_only",
    "on_device",
    "parse",
]

ACCELERATE_MISSING = "a device map needs accelerate (pip install accelerate)"


def device_of(slot) -> torch.device:
    """The device of a slot's tensor (anything with ``.param``)."""
    return slot.param.device


def by_device(items: Iterable, key: Callable | None = None) -> list[list]:
    """`items` grouped by device, groups in order of first appearance, items in their order.

    Args:
        items: slots (anything :func:`device_of` takes), or anything `key` takes.
        key: item -> device; None: :func:`device_of` (looked up at each call).

    Example:
        >>> [len(g) for g in by_device([torch.zeros(1), torch.ones(2)], key=lambda t: t.device)]
        [2]
    """
    key = device_of if key is None else key
    groups: dict = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return list(groups.values())


def device_types(tensors: Iterable[torch.Tensor]) -> str:
    """The device types of `tensors`, sorted and joined by "+": "cuda", or "cpu+cuda" for a
    model split by a device map (what a trajectory records, zofast.trajectory).

    Example:
        >>> device_types([torch.zeros(1), torch.zeros(2)])
        'cpu'
    """
    return "+".join(sorted({t.device.type for t in tensors}))


def on_device(device: torch.device):
    """A context in which `device` is torch's current CUDA device (Triton launches and CUDA
    graphs go to the current device, not to their tensors'); a null context where it already
    is, or for a CPU device.

    Example:
        >>> with on_device(torch.device("cpu")):
        ...     pass
    """
    if device.type != "cuda" or device.index is None:
        return contextlib.nullcontext()
    if device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def moves_inputs_only(module: torch.nn.Module) -> bool:
    """Whether `module.forward` is accelerate's wrapper of the class's own forward whose hooks
    only move the inputs to the module's device (``AlignDevicesHook`` without offload): the
    module then computes exactly as its class does.

    Example:
        >>> moves_inputs_only(torch.nn.Linear(2, 2))  # no wrapper at all
        False
    """
    forward = vars(module).get("forward")
    hook = getattr(module, "_hf_hook", None)
    if hook is None or not isinstance(forward, functools.partial):
        return False
    if not getattr(forward.func, "__module__", "").startswith("accelerate."):
        return False
    old = getattr(module, "_old_forward", None)
    if getattr(old, "__func__", None) is not type(module).forward:
        return False
    try:
        from accelerate.hooks import AlignDevicesHook
    except ImportError:
        return False
    hooks = getattr(hook, "hooks", (hook,))
    return all(isinstance(h, AlignDevicesHook) and not h.offload for h in hooks)


def parse(text: str | dict) -> str | dict:
    """A device map given on the command line: ``"auto"``, or a JSON object of module name ->
    device (``"cpu"``, ``"cuda:1"``, or a GPU index).

    Raises:
        ValueError: anything else.

    Example:
        >>> parse('{"model.decoder.layers.0": 0, "lm_head": "cpu"}')
        {'model.decoder.layers.0': 0, 'lm_head': 'cpu'}
    """
    if isinstance(text, dict):
        return _checked(text)
    if text == "auto":
        return text
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        value = None
    if not isinstance(value, dict):
        raise ValueError(
            f"device map must be 'auto' or a JSON object of module name -> device, got {text!r}"
        )
    return _checked(value)


def _checked(device_map: dict) -> dict:
    for name, device in device_map.items():
        if not isinstance(name, str):
            raise ValueError(f"device map keys must be module names, got {name!r}")
        if device == "disk":
            raise ValueError(
                f"device map puts {name or 'the model'} on 'disk': offloaded weights are not held "
                "by the model, so nothing can perturb them; use 'cpu' (layers computed by the CPU)"
            )
        ok = isinstance(device, int) and not isinstance(device, bool) and device >= 0
        if not ok:
            try:
                ok = torch.device(device).type in ("cpu", "cuda")
            except (RuntimeError, TypeError, ValueError):
                ok = False
        if not ok:
            raise ValueError(f"device map: {name!r} -> {device!r} is not cpu, cuda:N or N")
    return device_map


def resolve(model: torch.nn.Module, device_map: str | dict) -> dict:
    """The module name -> device map that `device_map` stands for: ``"auto"`` fills the GPUs in
    order, then the CPU (accelerate's ``infer_auto_device_map``, blocks kept whole)."""
    device_map = parse(device_map)
    if device_map != "auto":
        return device_map
    try:
        from accelerate import infer_auto_device_map
    except ImportError:
        raise ImportError(ACCELERATE_MISSING) from None
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    resolved = infer_auto_device_map(
        model, no_split_module_classes=getattr(model, "_no_split_modules", None), dtype=dtype
    )
    return _checked(resolved)


def _mapped(name: str, device_map: dict):
    """The device `device_map` gives the parameter `name` (its longest matching module prefix)."""
    keys = [k for k in device_map if k == "" or name == k or name.startswith(k + ".")]
    return device_map[max(keys, key=len)] if keys else None


def dispatch(model: torch.nn.Module, device_map: str | dict) -> torch.nn.Module:
    """Put every module of `model` on its device of `device_map` and make it run there
    (accelerate's ``dispatch_model``; see the module docstring): inputs move to each block's
    device, the outputs come back to the inputs' device.

    Args:
        model: a model whose weights are all on one device (the CPU, typically).
        device_map: ``"auto"`` or {module name: device}; every parameter must be covered.

    Returns:
        `model`, dispatched.

    Raises:
        ImportError: accelerate is not installed.
        ValueError: a malformed map, ``"disk"``, a GPU that is not there, or tied weights (an
            embedding and its LM head) put on two devices.

    Example:
        >>> model = dispatch(model, {"model.decoder": 0, "lm_head": 0})  # doctest: +SKIP
    """
    try:
        from accelerate import dispatch_model
        from accelerate.utils import find_tied_parameters
    except ImportError:
        raise ImportError(ACCELERATE_MISSING) from None
    device_map = resolve(model, device_map)
    for names in find_tied_parameters(model):
        if len({str(_mapped(name, device_map)) for name in names}) > 1:
            raise ValueError(
                f"tied weights {names} are mapped to different devices: put the modules that "
                "share them on one device"
            )
    devices = {
        torch.device(d if not isinstance(d, int) else f"cuda:{d}") for d in device_map.values()
    }
    count = torch.cuda.device_count()
    missing = sorted(str(d) for d in devices if d.type == "cuda" and (d.index or 0) >= count)
    if missing:
        raise ValueError(f"device map uses {missing}, torch sees {count} CUDA device(s)")
    # "cpu" as the main device: accelerate offloads only to "disk" then, and runs CPU layers on
    # the CPU (another main device would offload them and compute them there). Its warning
    # that CPU layers were offloaded to the meta device does not hold then: silenced.
    main = "cpu" if any(d.type == "cpu" for d in devices) else None
    log = logging.getLogger("accelerate.big_modeling")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        dispatch_model(model, device_map=device_map, main_device=main)
    except (KeyError, ValueError) as error:
        raise ValueError(f"cannot dispatch the model with this device map: {error}") from None
    finally:
        log.setLevel(level)
    params = dict(model.named_parameters())
    meta = [n for n, p in params.items() if p.device.type == "meta"]
    if meta:
        raise ValueError(f"{meta[:3]} are on the meta device after dispatch: they hold no data")
    return model
