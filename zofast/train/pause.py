"""Pausing a zeroth-order run into a small JSON state, and resuming it by replay.

A checkpoint (:mod:`zofast.train.checkpoint`) keeps the weights. Where only a few small files
outlive a process (the accuracy grid's device calls, :mod:`zofast.grid.resume`), a run given
``stop`` (:func:`zofast.train.train`) pauses instead, between two steps, into a :class:`Paused`:
its config, the loop's state (history, best evaluation, losses, timings), the optimizer's
trajectory (seeds and g's, :mod:`zofast.trajectory`) and counters, the data order and the log so
far. Nothing of the model's size: about 4 bytes a step (the g's) and a few kB.

:func:`resume_paused` rebuilds the rest from the base weights by replay (the engine calls of
training with the recorded g's), on the run's own optimizer, so what replay recreates on the way
is the run's state: LOZO-M's momentum buffers, LOZO's virtual factors, accumulated updates not
yet written, a pipelined pending perturbation. Replay stops at the best evaluation's event to
copy the best weights, then goes on to the pause. On the device type of the run the weights are
then bit for bit the run's (:func:`zofast.replay`'s promise, for every mode), and the resumed
run ends as if it had never paused; on another device type resuming is refused. Resuming costs
the weight passes of the steps done so far (no forward).
"""

from __future__ import annotations

import base64
import dataclasses
import gzip
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from zofast.device_map import device_types
from zofast.models import LoadedModel
from zofast.train import checkpoint
from zofast.train.config import ZO_METHODS, ConfigError, TrainConfig, TrainResult
from zofast.train.evaluation import trajectory_slice
from zofast.train.inputs import setup
from zofast.train.methods import build_method
from zofast.train.ranks import Ranks, from_environment
from zofast.trajectory import Trajectory

__all__ = ["Paused", "resume_paused"]

FORMAT = "zofast.train.paused"
VERSION = 1
_KEYS = {"format", "version", "config", "loop", "steps", "optimizer", "batches", "log"}


@dataclass
class Paused:
    """A run that ``stop`` paused: ``state`` is JSON-able, :func:`resume_paused` continues it.

    Example:
        >>> config = TrainConfig(method="mezo", steps=5, output_dir="run")
        >>> state = train(config, stop=lambda: True).state  # doctest: +SKIP
        >>> text = json.dumps(state)  # doctest: +SKIP
        >>> resume_paused(json.loads(text)).steps  # the whole run  # doctest: +SKIP
        5
    """

    state: dict

    @property
    def steps(self) -> int:
        """Steps done before the pause."""
        return self.state["steps"]


def pausable(config: TrainConfig, ranks: Ranks) -> None:
    """ConfigError unless a run of ``config`` can pause: zeroth-order, in one process."""
    if config.method not in ZO_METHODS:
        raise ConfigError(
            f"only {', '.join(ZO_METHODS)} runs pause (their weights are rebuilt by replay); "
            f"method is {config.method!r}"
        )
    if ranks.group is not None:
        raise ConfigError("a run under torchrun does not pause (resume it from a checkpoint)")
    if config.offload:
        raise ConfigError("an offloaded run does not pause (resume it from a checkpoint)")


def _text(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _bytes(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def paused(run) -> Paused:
    """The state of the loop ``run`` (a :class:`zofast.train.loop._Run`) between two steps."""
    method, st = run.method, run.st
    st["elapsed"] = time.perf_counter() - run.started
    tensors: dict = {}
    loop = checkpoint.encode(st, tensors, "loop")
    if tensors:
        raise RuntimeError(f"internal error: the loop state holds tensors {sorted(tensors)}")
    batches = method.batches.state_dict()
    return Paused(
        {
            "format": FORMAT,
            "version": VERSION,
            "config": run.config.to_dict(),
            "loop": loop,
            "steps": method.position,
            "optimizer": method.optimizer.state_dict()["zofast"],
            "batches": {
                "generator": _text(batches["generator"].numpy().tobytes()),
                "order": batches["order"],
            },
            "log": _text(gzip.compress(run.log.path.read_bytes(), mtime=0)),
        }
    )


def resume_paused(
    state: dict,
    *,
    loaded: LoadedModel | None = None,
    output_dir: str | Path | None = None,
    stop=None,
    progress: bool | None = None,
) -> TrainResult | Paused:
    """Continue a paused run; it ends bit for bit as if it had never paused.

    Args:
        state: :attr:`Paused.state` (after a JSON round trip, or not).
        loaded: the base model, holding the base weights (None loads the config's model).
        output_dir: where the run's files go (default: the config's).
        stop: as for :func:`zofast.train.train`: the run may pause again.
        progress: show the progress bar (None: as the run did).

    Returns:
        A :class:`TrainResult`, or a :class:`Paused` if ``stop`` paused it again.

    Raises:
        ConfigError: a malformed state, a model that does not hold the run's base weights, or
            another device type than the run's; raised before any weight or file is written.

    Example:
        >>> result = resume_paused(json.loads(text), output_dir="runs/x")  # doctest: +SKIP
    """
    from zofast.train.loop import _LOOP_KEYS, Log, _fingerprint, run

    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ConfigError("not a paused zofast run (no format marker)")
    if state.get("version") != VERSION or not set(state) >= _KEYS:
        raise ConfigError(f"unsupported paused run (version {state.get('version')!r})")
    try:
        config = TrainConfig.from_dict(state["config"])
        loop = checkpoint.decode(state["loop"], {})
        trajectory = Trajectory.from_dict(state["optimizer"]["trajectory"])
        generator = torch.frombuffer(
            bytearray(_bytes(state["batches"]["generator"])), dtype=torch.uint8
        )
        order = [int(i) for i in state["batches"]["order"]]
        log = gzip.decompress(_bytes(state["log"]))
        steps, marker = int(state["steps"]), int(loop["best"]["marker"])
        if not set(loop) >= _LOOP_KEYS:
            raise ValueError(f"a loop state without {sorted(_LOOP_KEYS - set(loop))}")
    except (checkpoint.CheckpointError, KeyError, TypeError, ValueError, OSError) as error:
        raise ConfigError(f"malformed paused run: {error}") from None
    if output_dir is not None:
        config = dataclasses.replace(config, output_dir=str(output_dir))
    ranks = from_environment(config)
    pausable(config, ranks)
    loaded, scorer, splits, _ = setup(config, loaded)
    base = _fingerprint(loaded.model) if config.checkpoint_every else None
    out_dir = config.resolved_output_dir
    method = build_method(config, loaded, scorer, splits, out_dir, ranks)
    try:
        _check_base(method.optimizer, trajectory, state["optimizer"])
        if not 0 <= marker <= len(trajectory.events) or steps != trajectory.steps:
            raise ConfigError("malformed paused run: its step count or best event is not its own")
    except ConfigError:
        method.close()  # its hooks come off the model (nothing was written)
        raise
    best = _replay(method, trajectory, marker, keep=bool(splits.get("dev")))
    _check_counters(method.optimizer, state["optimizer"])
    method.batches.load_state_dict({"generator": generator, "order": order})
    method.steps_done = steps
    loop.update(base=base, best_weights=best, checkpoint=None)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "log.jsonl").write_bytes(log)
    log_file = Log(out_dir / "log.jsonl", offset=len(log))
    try:
        return run(
            config, loaded, scorer, splits, method, out_dir, log_file,
            state=loop, progress=progress, stop=stop,
        )  # fmt: skip
    finally:
        log_file.close()


def _check_base(optimizer, trajectory: Trajectory, saved: dict) -> None:
    """ConfigError unless the fresh optimizer and its weights are those the run started with."""
    fresh = optimizer.state_dict()["zofast"]
    for key in ("method", "hyperparameters", "run_seed"):
        if saved.get(key) != fresh[key]:
            raise ConfigError(
                f"the paused run's optimizer has {key} {saved.get(key)!r}, its config builds "
                f"{fresh[key]!r}"
            )
    if trajectory.params is None:
        raise ConfigError("malformed paused run: a run pauses after a step, this one had none")
    tensors = [p for group in optimizer.param_groups for p in group["params"]]
    try:
        trajectory.check_params(tensors)
    except ValueError as error:
        raise ConfigError(f"cannot resume the paused run: {error}") from None
    trained = [t for t, entry in zip(tensors, trajectory.params, strict=True) if entry["trained"]]
    devices = device_types(trained)
    if devices != trajectory.device:
        raise ConfigError(
            f"the run paused on {trajectory.device} and would resume on {devices}: replay "
            "rebuilds its weights bit for bit only on the device type they were trained on"
        )


def _replay(method, trajectory: Trajectory, marker: int, keep: bool):
    """Replay the run on its own optimizer; returns the weights at event ``marker`` (the best
    evaluation's, settled there) if ``keep``, else None."""
    optimizer = method.optimizer
    optimizer.replay(trajectory_slice(trajectory, 0, marker))
    best = method.snapshot() if keep else None
    optimizer.replay(trajectory_slice(trajectory, marker, len(trajectory.events)))
    optimizer.trajectory = trajectory
    return best


def _check_counters(optimizer, saved: dict) -> None:
    """RuntimeError unless replay left the optimizer's counters and unwritten updates as the run
    had them (a bug, not bad input: the weights already changed)."""
    now = optimizer.state_dict()["zofast"]
    for key in ("step", "pending", "deferred"):
        have = json.loads(json.dumps(now.get(key)))
        if have != saved.get(key):
            raise RuntimeError(
                f"replay left the optimizer's {key} at {have!r}, the paused run had "
                f"{saved.get(key)!r}"
            )
