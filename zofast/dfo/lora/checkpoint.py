"""State and resume: a DFO-LoRA search saved as JSON + safetensors (no pickle) and rebuilt.

``dfo_lora.json`` holds the configuration, architecture, ``σ_l``, round and layer position,
calls, current loss, step sizes, restart counters, hand-over flags, dev history and the
optimizers' scalar state; ``dfo_lora.safetensors`` the incumbents, the best-dev snapshot, the
applied vectors and the optimizers' array state, float64 (:mod:`zofast.dfo.lora` says what
resuming reproduces).

Example:
    >>> save(dfo, "runs/dfo-ckpt")  # the same as dfo.save("runs/dfo-ckpt")
    >>> dfo = load(DFOLoRA, "runs/dfo-ckpt", load_model(default_model_path()))
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from zofast.dfo.arch import find_architecture
from zofast.dfo.lora.config import OPTIMIZERS, RUNTIME_KEYS, SEARCH_KEYS
from zofast.dfo.state import cma_state, set_cma_state
from zofast.models import LoadedModel

if TYPE_CHECKING:
    from zofast.dfo.lora.model import DFOLoRA

__all__ = ["save", "load", "FORMAT", "VERSION"]

FORMAT = "zofast.dfo_lora"
"""``format`` field of a checkpoint's JSON."""

VERSION = 1
"""``version`` field of a checkpoint's JSON."""


def _config(dfo: DFOLoRA) -> dict[str, Any]:
    cfg = {k: getattr(dfo, k) for k in SEARCH_KEYS}
    cfg["targets"] = list(dfo.targets)
    cfg["optimizers"] = list(dfo.optimizers)
    return cfg


def save(dfo: DFOLoRA, path: str | Path) -> Path:
    """Write the search state: ``dfo_lora.json`` and ``dfo_lora.safetensors`` (no pickle).

    Args:
        dfo: the search.
        path: folder (created).

    Returns:
        The folder.

    Example:
        >>> save(dfo, "runs/dfo-ckpt")
    """
    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    best = dfo._best
    state = {
        "format": FORMAT,
        "version": VERSION,
        "config": _config(dfo),
        "runtime": {k: getattr(dfo, k) for k in RUNTIME_KEYS},
        "architecture": {
            "family": dfo.arch.family,
            "num_layers": dfo.num_layers,
            "targets": dfo.arch.describe(dfo.targets),
        },
        "model_name": dfo.loaded.name if dfo.loaded is not None else None,
        "layer_stds": None if dfo.layer_stds is None else dfo.layer_stds.tolist(),
        "state": {
            "round": dfo._round,
            "layer": dfo._layer_pos,
            "generation": dfo._generation,
            "calls": dfo._calls,
            "loss": dfo._f_cur,
            "elapsed": dfo._elapsed,
            "restarts": dfo._restarts.tolist(),
            "sigmas": [[None if math.isnan(s) else s for s in row] for row in dfo._sigmas],
            "best": None if best is None else {k: v for k, v in best.items() if k != "z"},
            "history": dfo.history,
        },
    }
    arrays = {"incumbents": dfo._z, "applied": dfo._applied}
    if best is not None:
        arrays["best"] = best["z"]
    optimizers = []
    for (layer, o), es in sorted(dfo._es.items()):
        seed, sigma0, x0 = dfo._created[(layer, o)]
        prefix = f"optimizer.{layer}.{o}."
        if OPTIMIZERS[o] == "cma":
            tags, opt_arrays = cma_state(es)
            extra = {"tags": tags, "rng": dfo._rngs[(layer, o)].bit_generator.state}
        else:
            scalars, opt_arrays = es.get_state()
            extra = {"scalars": scalars}
        arrays[prefix + "x0"] = x0
        arrays.update({prefix + "state." + k: v for k, v in opt_arrays.items()})
        optimizers.append(
            {
                "layer": layer,
                "optimizer": OPTIMIZERS[o],
                "seed": seed,
                "sigma0": sigma0,
                **extra,
            }
        )
    state["state"]["optimizers"] = optimizers
    state["state"]["synced"] = dfo._synced.tolist()
    save_file(
        {k: np.ascontiguousarray(v) for k, v in arrays.items()},
        str(path / "dfo_lora.safetensors"),
    )
    (path / "dfo_lora.json").write_text(json.dumps(state, indent=1, allow_nan=False) + "\n")
    return path


def load(
    cls: type[DFOLoRA], path: str | Path, model: LoadedModel | nn.Module, **runtime: Any
) -> DFOLoRA:
    """The work of :meth:`DFOLoRA.load <zofast.dfo.lora.DFOLoRA.load>`: build, then restore.

    ``cls`` is built on ``model`` with the checkpoint's configuration (and the runtime options,
    overridable), then the search state is written back: incumbents, position, calls, loss,
    step sizes, restart counters, dev history and best snapshot, each optimizer with its own
    state, and the applied vectors onto the hooks.

    Args:
        cls: the class to build (:class:`DFOLoRA` or a subclass).
        path: the checkpoint folder.
        model: a fresh copy of the searched model.
        **runtime: any of :data:`~zofast.dfo.lora.config.RUNTIME_KEYS`.

    Returns:
        The rebuilt ``cls`` instance.

    Raises:
        ValueError: not a checkpoint of this format and version, an option that cannot be
            overridden, or another architecture.

    Example:
        >>> dfo = load(DFOLoRA, "runs/dfo-ckpt", load_model(default_model_path()))
    """
    from safetensors.numpy import load_file

    path = Path(path)
    state = json.loads((path / "dfo_lora.json").read_text())
    if state.get("format") != FORMAT or state.get("version") != VERSION:
        raise ValueError(f"{path} is not a {FORMAT} checkpoint of version {VERSION}")
    bad = sorted(set(runtime) - set(RUNTIME_KEYS))
    if bad:
        raise ValueError(f"only {RUNTIME_KEYS} can be overridden, got {bad}")
    options = {**state["runtime"], **runtime}
    arch = find_architecture(model.model if isinstance(model, LoadedModel) else model)
    saved = state["architecture"]
    names = tuple(state["config"]["targets"])
    if saved["family"] != arch.family or saved["targets"] != arch.describe(names):
        raise ValueError(
            f"checkpoint {path} was made on a different architecture "
            f"({saved['family']}, {saved['num_layers']} layers)"
        )
    obj = cls(model, **state["config"], **options)
    arrays = load_file(str(path / "dfo_lora.safetensors"))
    if state["layer_stds"] is not None:
        obj.layer_stds = np.array(state["layer_stds"], dtype=np.float64)
    s = state["state"]
    obj._z = arrays["incumbents"].astype(np.float64)
    obj._round, obj._layer_pos = int(s["round"]), int(s["layer"])
    obj._generation, obj._calls = int(s["generation"]), int(s["calls"])
    obj._f_cur = None if s["loss"] is None else float(s["loss"])
    obj._elapsed = float(s["elapsed"])
    saved_optimizers = s.get("optimizers")
    obj._restarts = np.array(s["restarts"], dtype=np.int64)
    if saved_optimizers is None:  # a checkpoint without optimizer states: restart them
        obj._restarts += 1
    obj._sigmas = np.array(
        [[np.nan if v is None else v for v in row] for row in s["sigmas"]], dtype=np.float64
    )
    obj.history = list(s["history"])
    if s["best"] is not None:
        obj._best = {**s["best"], "z": arrays["best"].astype(np.float64)}
    if obj.layer_stds is not None:
        with torch.no_grad():
            for layer in range(obj.num_layers):
                obj._apply_layer(layer, arrays["applied"][layer])
    for rec in saved_optimizers or ():
        layer, o = int(rec["layer"]), OPTIMIZERS.index(rec["optimizer"])
        prefix = f"optimizer.{layer}.{o}."
        x0 = arrays[prefix + "x0"].astype(np.float64)
        es = obj._optimizer(layer, o, (int(rec["seed"]), float(rec["sigma0"]), x0))
        opt_arrays = {
            k[len(prefix) + 6 :]: v for k, v in arrays.items() if k.startswith(prefix + "state.")
        }
        if rec["optimizer"] == "cma":
            set_cma_state(es, rec["tags"], opt_arrays)
            obj._rngs[(layer, o)].bit_generator.state = rec["rng"]
        else:
            es.set_state(rec["scalars"], opt_arrays)
    if "synced" in s:
        obj._synced = np.array(s["synced"], dtype=bool)
    return obj
