"""Crash-safe run checkpoints: JSON + safetensors in a folder that appears whole or not at all.

Layout: ``<output_dir>/checkpoint-<step>/`` (step zero-padded to 10 digits, so names sort) with

* ``state.json``: the loop's state, the config, and a manifest (size and SHA-256 of every other
  file); written last;
* ``*.safetensors``: tensors, named from the JSON (:func:`encode` turns an optimizer's
  ``state_dict`` into JSON with references to tensors, and :func:`decode` back);
* folders a method writes itself (DFO-LoRA's search state, ``dfo/``).

How a checkpoint is written (:func:`write`): into ``.checkpoint-<step>.tmp/`` beside it, every
file fsynced, then the folder; then renamed to ``checkpoint-<step>`` (a rename is atomic on
POSIX) and the run folder fsynced; only then are older checkpoints removed (renamed out of the
way first, so a half-deleted folder never carries a checkpoint's name). A kill -9 at any moment
leaves the previous checkpoint whole: before the rename the new one is a ``.tmp`` folder that
:func:`latest` ignores and the next write removes; after it, both exist and the newest wins.
A file that did not change since the previous checkpoint (the best snapshot, usually) is
hard-linked from it instead of written again (files are never modified once written).

No pickle anywhere: JSON holds numbers, strings and structure (non-finite floats tagged), and
safetensors holds tensors.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["CheckpointError", "encode", "decode", "write", "latest", "read", "FORMAT"]

FORMAT = "zofast.train.checkpoint"
VERSION = 1
STATE = "state.json"
PREFIX = "checkpoint-"


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, damaged or of another kind."""


def encode(obj: Any, tensors: dict[str, torch.Tensor], prefix: str) -> Any:
    """``obj`` as JSON-able data; its tensors (and numpy arrays) go to ``tensors``.

    Tags keep what JSON loses: ``{"__tensor__": key}``, ``{"__ndarray__": key}``,
    ``{"__float__": "nan" | "inf" | "-inf"}``, ``{"__tuple__": [...]}`` and, for dicts whose keys
    are not all plain strings, ``{"__dict__": [[key, value], ...]}``.

    Example:
        >>> tensors = {}
        >>> encode({"step": 3, "betas": (0.9, 0.999), "m": torch.zeros(2)}, tensors, "opt")
        {'step': 3, 'betas': {'__tuple__': [0.9, 0.999]}, 'm': {'__tensor__': 'opt.m'}}
    """
    if isinstance(obj, torch.Tensor):
        key = prefix
        tensors[key] = obj.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        tensors[prefix] = torch.from_numpy(np.array(obj, copy=True, order="C"))
        return {"__ndarray__": prefix}
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"__float__": str(obj)}
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, (list, tuple)):
        items = [encode(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if isinstance(obj, dict):
        plain = all(isinstance(k, str) and not k.startswith("__") for k in obj)
        if plain:
            return {k: encode(v, tensors, f"{prefix}.{k}") for k, v in obj.items()}
        pairs = []
        for i, (k, v) in enumerate(obj.items()):
            pairs.append(
                [encode(k, tensors, f"{prefix}.k{i}"), encode(v, tensors, f"{prefix}.{i}")]
            )
        return {"__dict__": pairs}
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return encode(obj.item(), tensors, prefix)
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} at {prefix}")


def decode(data: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`encode` (CheckpointError on a reference to a missing tensor).

    Example:
        >>> tensors = {}
        >>> decode(encode({1: (2.0, float("nan"))}, tensors, "x"), tensors)
        {1: (2.0, nan)}
    """
    if isinstance(data, list):
        return [decode(v, tensors) for v in data]
    if not isinstance(data, dict):
        return data
    if len(data) == 1:
        ((tag, value),) = data.items()
        if tag in ("__tensor__", "__ndarray__"):
            if value not in tensors:
                raise CheckpointError(f"checkpoint refers to a missing tensor {value!r}")
            t = tensors[value]
            return t if tag == "__tensor__" else t.numpy()
        if tag == "__float__":
            return float(value)
        if tag == "__tuple__":
            return tuple(decode(v, tensors) for v in value)
        if tag == "__dict__":
            return {decode(k, tensors): decode(v, tensors) for k, v in value}
    return {k: decode(v, tensors) for k, v in data.items()}


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _remove(path: Path) -> None:
    """Rename out of the way, then delete (a half-deleted folder never keeps its name)."""
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}")
    try:
        os.replace(path, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def write(
    run_dir: Path,
    step: int,
    state: dict[str, Any],
    tensor_files: dict[str, dict[str, torch.Tensor] | Path],
    folders: dict[str, Callable[[Path], Any]] | None = None,
) -> Path:
    """Write a checkpoint atomically (module docstring) and remove the older ones.

    Args:
        run_dir: the run's output folder.
        step: the loop position (names the folder).
        state: JSON-able dict (see :func:`encode`).
        tensor_files: ``name -> tensors`` (written as ``name.safetensors``), or ``name -> path``
            of an unchanged file of an earlier checkpoint (hard-linked, or copied where links
            are not possible).
        folders: ``name -> writer(path)`` for folders that other code writes.

    Returns:
        The checkpoint folder.

    Example:
        >>> tensors = {}
        >>> state = {"loop": encode({"step": 7, "w": torch.ones(2)}, tensors, "loop")}
        >>> write(run_dir, 7, state, {"state": tensors}).name  # doctest: +SKIP
        'checkpoint-0000000007'
    """
    from safetensors.torch import save_file

    run_dir = Path(run_dir)
    final = run_dir / f"{PREFIX}{step:010d}"
    tmp = run_dir / f".{PREFIX}{step:010d}.tmp"
    _remove(tmp)
    tmp.mkdir(parents=True)
    known = {}
    for name, tensors in tensor_files.items():
        target = tmp / f"{name}.safetensors"
        if isinstance(tensors, Path):
            try:
                os.link(tensors, target)
            except OSError:
                shutil.copyfile(tensors, target)
            known[target.name] = _manifest_entry(tensors)
        else:
            save_file(tensors, str(target))
    for name, writer in (folders or {}).items():
        writer(tmp / name)
    manifest = {}
    for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
        _fsync(path)
        rel = path.relative_to(tmp).as_posix()
        size = path.stat().st_size
        entry = known.get(rel)
        if entry is None or entry.get("size") != size:  # a linked file keeps its hash
            entry = {"size": size, "sha256": _sha256(path)}
        manifest[rel] = entry
    document = {"format": FORMAT, "version": VERSION, "step": step, "files": manifest, **state}
    text = json.dumps(document, allow_nan=False, separators=(",", ":"))
    with open(tmp / STATE, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    for folder in sorted({p.parent for p in tmp.rglob("*")} | {tmp}, reverse=True):
        _fsync(folder)
    if final.exists():
        _remove(final)
    os.replace(tmp, final)
    _fsync(run_dir)
    for old in run_dir.iterdir():
        if old.name.startswith((f".trash-{PREFIX}", f".trash-.{PREFIX}")) and old.is_dir():
            # left by a kill during a delete
            shutil.rmtree(old, ignore_errors=True)
        elif old != final and old.name.startswith((PREFIX, f".{PREFIX}")) and old.is_dir():
            _remove(old)
    return final


def _manifest_entry(path: Path) -> dict | None:
    """The manifest entry of a file of an earlier checkpoint (None if it cannot be read)."""
    try:
        document = json.loads((path.parent / STATE).read_text(encoding="utf-8"))
        return dict(document["files"][path.name])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def latest(path: Path) -> Path | None:
    """The newest checkpoint of a run folder, or ``path`` itself if it is a checkpoint.

    Example:
        >>> latest(Path("runs/sst2-lozo"))  # doctest: +SKIP
        PosixPath('runs/sst2-lozo/checkpoint-0000000300')
    """
    path = Path(path)
    if (path / STATE).is_file():
        return path
    if not path.is_dir():
        return None
    found = sorted(p for p in path.glob(f"{PREFIX}*") if (p / STATE).is_file())
    return found[-1] if found else None


def read(path: Path) -> tuple[dict[str, Any], Callable[[str], dict[str, torch.Tensor]]]:
    """Read and verify a checkpoint folder.

    Returns:
        ``(state, tensors)``: the JSON document, and a function ``name -> tensors`` that loads
        ``name.safetensors``.

    Raises:
        CheckpointError: not a checkpoint, another version, or a file missing, truncated or
            changed since it was written (sizes and SHA-256 of the manifest).

    Example:
        >>> document, tensors = read(latest(run_dir))  # doctest: +SKIP
        >>> decode(document["loop"], tensors("state"))["step"]
        7
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    try:
        document = json.loads((path / STATE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is not a readable checkpoint: {error}") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a zofast train checkpoint")
    if document.get("version") != VERSION:
        raise CheckpointError(f"{path}: unsupported checkpoint version {document.get('version')!r}")
    files = document.get("files")
    if not isinstance(files, dict):
        raise CheckpointError(f"{path}: checkpoint without a file manifest")
    for rel, entry in files.items():
        file = path / rel
        if not file.is_file():
            raise CheckpointError(f"{path}: file {rel} is missing")
        if file.stat().st_size != entry.get("size") or _sha256(file) != entry.get("sha256"):
            raise CheckpointError(f"{path}: file {rel} was changed or damaged since it was written")

    def tensors(name: str) -> dict[str, torch.Tensor]:
        file = path / f"{name}.safetensors"
        if f"{name}.safetensors" not in files:
            raise CheckpointError(f"{path}: no {name}.safetensors in the manifest")
        try:
            return load_file(str(file))
        except (SafetensorError, OSError) as error:
            raise CheckpointError(f"{path}: cannot read {file.name}: {error}") from None

    return document, tensors
