"""The grid's records: one JSON line per finished run, appended whole or not at all.

A record is written only after its run has finished and been tested, as one ``write`` of one line
under an exclusive ``flock``, so concurrent workers never interleave and a killed worker leaves at
most its current cell unrecorded. Readers take every ``*.jsonl`` of the folders they are given;
a line that does not parse (a disk-full write, a kill mid-write) is skipped with a warning, and
of two records of the same cell (:func:`key`) the last one read wins. A line after a torn one
starts on a line of its own (:func:`append`). Partial records (``"partial": true``, a paused cell:
:mod:`zofast.grid.resume`) are read only when asked for.
"""

from __future__ import annotations

import fcntl
import json
import os
import warnings
from collections.abc import Iterable
from pathlib import Path

from zofast.grid.protocol import Cell


def key(record: dict) -> tuple:
    """(task, seed, method, rank, dtype, steps, lr): the cell a record is the run of
    (:attr:`zofast.grid.protocol.Cell.key`).

    Example:
        >>> key({"task": "rte", "seed": 13, "method": "mezo", "rank": None, "dtype": "float32",
        ...      "steps": 20000, "lr": 1e-05})
        ('rte', 13, 'mezo', None, 'float32', 20000, 1e-05)
    """
    fields = ("task", "seed", "method", "rank", "dtype", "steps", "lr")
    return tuple(record.get(f) for f in fields)


def cell_fields(cell: Cell) -> dict:
    """The fields every record of ``cell`` (finished or partial) opens with: its :func:`key` up to
    ``steps``. Each record adds ``lr`` itself, since a finished one has ``forwards`` before it.

    Example:
        >>> from zofast.grid.protocol import Protocol
        >>> tuple(cell_fields(Protocol().cells("select")[0]).values())
        ('rte', 13, 'lozo-m', 2, 'float32', 20000)
    """
    v = cell.variant
    return {
        "task": cell.task,
        "seed": cell.seed,
        "method": v.method,
        "rank": v.rank,
        "dtype": cell.dtype,
        "steps": v.steps,
    }


def files(paths: Iterable[str | Path]) -> list[Path]:
    """The record files: each path itself if a file, its ``*.jsonl`` (sorted) if a folder;
    paths that do not exist are skipped (a first call has no records yet)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(p.glob("*.jsonl"))
        elif p.is_file():
            out.append(p)
    return out


def read(paths: Iterable[str | Path], partial: bool = False) -> list[dict]:
    """The finished records of ``paths`` (:func:`files`), one per cell, in the order first read;
    with ``partial``, the partial records instead (every one: :mod:`zofast.grid.resume` picks).

    Example:
        >>> read(["bench/results/grid-h200"])  # doctest: +SKIP
    """
    latest: dict[tuple, dict] = {}
    partials = []
    for path in files(paths):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                warnings.warn(f"{path}:{number}: not a JSON line, skipped", stacklevel=2)
                continue
            if not isinstance(record, dict):
                warnings.warn(f"{path}:{number}: not a JSON object, skipped", stacklevel=2)
            elif record.get("partial"):
                partials.append(record)
            else:
                latest[key(record)] = record
    return partials if partial else list(latest.values())


def append(path: str | Path, record: dict) -> None:
    """Append ``record`` to ``path`` as one line, under an exclusive lock, in one write
    (after a newline if the file ends in a torn line, so that the record is not glued to it)."""
    data = (json.dumps(record, allow_nan=False) + "\n").encode("utf-8")
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data
        written = os.write(fd, data)
        if written != len(data):
            raise OSError(f"{path}: wrote {written} of {len(data)} bytes of a record")
    finally:
        os.close(fd)
