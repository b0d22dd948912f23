"""Grid cells that outlast one device call: partial records, and resuming from them.

Nothing of a device call survives but the records file it writes, and a MiniLM checkpoint
(90 MB) is too big to come back. So a zeroth-order cell still running when its call's ``end``
comes pauses between two steps (:mod:`zofast.train.pause`) and its worker appends a *partial*
record: the cell's key, ``"partial": true``, the steps done, each call's commit, steps and
seconds, and the paused state as gzip + base64 (mostly the trajectory's g's, about 5 bytes a
step: a 20,000-step cell's is about 110 kB). The next call's runner takes the cells with a partial
record and no finished one first (:func:`latest`: of several partial records, the one with the
most steps) and resumes them (:func:`train_cell`): weights, optimizer state and best weights are
rebuilt by replay from the base weights, so the cell ends bit for bit as in one call. A partial
record that cannot resume here (another device type, the cell's settings changed) is said so and
the cell starts over. :func:`zofast.grid.records.read` leaves partial records out, so the report,
the lr selection and the time estimates see finished runs only; a torn line is skipped as any.
"""

from __future__ import annotations

import base64
import gzip
import json
from collections.abc import Callable, Iterable
from pathlib import Path

from zofast.grid import records as rec
from zofast.grid.protocol import Cell


def record(cell: Cell, stage: str, paused, calls: list[dict]) -> dict:
    """The partial record of a cell that ``paused`` (a :class:`zofast.train.pause.Paused`) after
    ``calls`` (one ``{"commit", "steps_run", "seconds"}`` per call, this one last).

    Example:
        >>> calls = [{"commit": "abc", "steps_run": 7, "seconds": 9.0}]
        >>> line = record(cell, "select", paused, calls)  # doctest: +SKIP
        >>> line["partial"], line["steps_run"]  # doctest: +SKIP
        (True, 7)
    """
    text = json.dumps(paused.state, allow_nan=False, separators=(",", ":"))
    return {
        **rec.cell_fields(cell),
        "lr": cell.lr,
        "partial": True,
        "stage": stage,
        "variant": cell.variant.name,
        "steps_run": paused.steps,
        "seconds": sum(c["seconds"] for c in calls),
        "calls": calls,
        "state": base64.b64encode(gzip.compress(text.encode("utf-8"), mtime=0)).decode("ascii"),
    }


def latest(paths: Iterable[str | Path], cells: Iterable[Cell]) -> dict[tuple, dict]:
    """Cell key → its partial record with the most steps, for the ``cells`` that have one in
    ``paths`` (pass the cells not finished yet)."""
    wanted = {c.key for c in cells}
    out: dict[tuple, dict] = {}
    for r in rec.read(paths, partial=True):
        k = rec.key(r)
        if k in wanted and r.get("steps_run", 0) > out.get(k, {}).get("steps_run", -1):
            out[k] = r
    return out


def train_cell(config, loaded, partial: dict | None, stop, say: Callable[[str], None]):
    """Train a cell's ``config`` on ``loaded`` (its base weights): from its partial record if it
    has one that resumes here, else from the start. Returns a :class:`~zofast.train.TrainResult`
    or, if ``stop`` paused it, a :class:`~zofast.train.pause.Paused`."""
    from zofast.train import ConfigError, train
    from zofast.train.pause import resume_paused

    if partial is not None:
        try:
            state = _state(partial)
            if _settings(state["config"]) != _settings(config.to_dict()):
                raise ConfigError("the cell's settings changed since it paused")
            return resume_paused(state, loaded=loaded, output_dir=config.output_dir, stop=stop)
        except ConfigError as error:  # raised before any weight is written
            say(f"cannot resume from step {partial.get('steps_run')} ({error}); starting over")
    return train(config, loaded=loaded, stop=stop)


def _state(partial: dict) -> dict:
    from zofast.train import ConfigError

    try:
        state = json.loads(gzip.decompress(base64.b64decode(partial["state"], validate=True)))
    except (KeyError, TypeError, ValueError, OSError, EOFError) as error:
        raise ConfigError(f"the partial record's state does not decode: {error}") from None
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
        raise ConfigError("the partial record's state is not a paused run")
    return state


def _settings(config: dict) -> dict:
    """A config without its output folder (a temporary one in each call)."""
    return {k: v for k, v in config.items() if k != "output_dir"}
