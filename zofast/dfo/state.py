"""Pickle-free snapshots of a pycma ``CMAEvolutionStrategy`` between generations.

pycma offers only pickling to save a search. Everything its ``ask``/``tell`` (and ``stop``)
read between two generations is held in plain numeric attributes of the strategy and of a few
helper objects: the mean and its history, the step size, the evolution paths, the covariance
(full ``C``/``B``/``D`` or, with ``CMA_diagonal``, the diagonal scaling ``sigma_vec``), the
counters, the best solution, the fitness history of the stopping criteria and so on. This
module copies every attribute of those objects (:data:`CMA_OBJECTS`) whose value is a number,
``None``, a numeric array, or a list of numbers or of equal-shaped arrays into a JSON dict and a
dict of float64/int64 arrays (a dict of numbers, such as a sampler's learning rates,
goes to the JSON), and writes them back into a strategy built with the same
constructor arguments. Objects that are not numeric state (options, the logger, wall-clock
timers, the solution archives that only map solutions to their fitness inside one generation)
are left as the constructor made them.

What is not in pycma: the random stream. DFO-LoRA gives each strategy its own
``numpy.random.Generator`` through the ``randn`` option; its ``bit_generator.state`` (a dict of
integers) is saved beside this snapshot (:mod:`zofast.dfo.lora`).

Tested (``tests/test_dfo.py``): a strategy restored from a snapshot asks exactly the candidates
the original asks, generation after generation.

Example:
    >>> scalars, arrays = cma_state(es)
    >>> twin = cma.CMAEvolutionStrategy(x0, sigma0, opts)
    >>> set_cma_state(twin, scalars, arrays)
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["CMA_OBJECTS", "cma_state", "set_cma_state"]

CMA_OBJECTS = ("", "adapt_sigma", "sigma_vec", "best", "fit", "_stoptolxstagnation", "const", "sm")
"""Attribute paths (``""`` = the strategy itself) whose numeric attributes are saved."""

_SKIP = {"x0"}
"""Attributes left to the constructor (``x0`` is its argument)."""


def _get(es: Any, path: str) -> Any:
    obj = es
    for part in filter(None, path.split(".")):
        obj = getattr(obj, part, None)
    return obj


def _is_number(v: Any) -> bool:
    return isinstance(v, (bool, int, float, np.integer, np.floating, np.bool_))


def _encode(value: Any) -> tuple[str, Any] | None:
    """(tag, json-or-array) for a numeric value; None for anything else."""
    if value is None:
        return "none", None
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "fc" or value.dtype.kind in "iub":
            kind = "f" if value.dtype.kind in "fc" else "i"
            dtype = np.float64 if kind == "f" else np.int64
            return f"ndarray-{kind}-{value.dtype.str}", np.array(value, dtype=dtype)
        return None
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return f"np-{value.dtype.str}", np.array(value, dtype=np.float64)
    if isinstance(value, bool):
        return "bool", value
    if isinstance(value, int):
        return "int", value
    if isinstance(value, float):
        return "float", np.array(value, dtype=np.float64)
    if type(value) is dict and all(isinstance(k, str) for k in value):
        if all(_is_number(v) and np.isfinite(float(v)) for v in value.values()):
            return "dict", {k: v.item() if hasattr(v, "item") else v for k, v in value.items()}
        return None
    if type(value) is list:
        if all(_is_number(v) for v in value):
            return "list", np.array([float(v) for v in value], dtype=np.float64).reshape(-1)
        arrays = value and all(isinstance(v, np.ndarray) and v.dtype.kind == "f" for v in value)
        if arrays and len({v.shape for v in value}) == 1:
            return "list-ndarray", np.stack(value).astype(np.float64)
    return None


def cma_state(es: Any) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Snapshot the numeric state of a ``cma.CMAEvolutionStrategy`` (between generations).

    Args:
        es: the strategy (after a ``tell``, or before its first ``ask``).

    Returns:
        ``(tags, arrays)``: ``tags`` maps ``"path:attribute"`` to ``[type tag, value]`` (the
        value for ints, bools and None; the shape for everything else); ``arrays`` holds every
        float or array value, flattened, under the same key.

    Example:
        >>> tags, arrays = cma_state(es)
        >>> arrays[":mean"].shape
        (500,)
    """
    tags: dict[str, Any] = {}
    arrays: dict[str, np.ndarray] = {}
    for path in CMA_OBJECTS:
        obj = _get(es, path)
        if obj is None:
            continue
        for name, value in vars(obj).items():
            if path == "" and name in _SKIP:
                continue
            enc = _encode(value)
            if enc is None:
                continue
            key = f"{path}:{name}"
            tag, data = enc
            if isinstance(data, np.ndarray):
                tags[key] = [tag, list(data.shape)]
                arrays[key] = np.array(data.reshape(-1), order="C")
            else:
                tags[key] = [tag, data]
    return tags, arrays


def _decode(tag: str, value: Any, array: np.ndarray | None) -> Any:
    if tag == "none":
        return None
    if tag in ("bool", "int", "dict"):
        return value
    array = np.asarray(array).reshape(value)
    if tag == "float":
        return float(array)
    if tag.startswith("np-"):
        return np.dtype(tag[3:]).type(array[()])
    if tag.startswith("ndarray-"):
        return np.array(array, dtype=np.dtype(tag.split("-", 2)[2]))
    if tag == "list":
        return [float(v) for v in array]
    if tag == "list-ndarray":
        return [np.array(v) for v in array]
    raise ValueError(f"unknown CMA state tag {tag!r}")


def set_cma_state(es: Any, tags: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """Write a :func:`cma_state` snapshot into a strategy built with the same arguments.

    Args:
        es: a fresh ``cma.CMAEvolutionStrategy`` (same dimension, popsize and options).
        tags, arrays: from :func:`cma_state` (after a JSON/safetensors round trip).

    Raises:
        ValueError: if an object of the snapshot does not exist on ``es`` (another pycma
            version or other options).

    Example:
        >>> set_cma_state(twin, *cma_state(es))
    """
    if not hasattr(es, "timer"):  # made by the first ask(), which a restored strategy skips
        from cma.utilities.utils import ElapsedWCTime

        es.timer = ElapsedWCTime()
    for key, (tag, value) in tags.items():
        path, name = key.split(":", 1)
        obj = _get(es, path)
        if obj is None:
            raise ValueError(f"CMA state {key!r}: this strategy has no {path!r}")
        setattr(obj, name, _decode(tag, value, arrays.get(key)))
