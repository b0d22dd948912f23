"""Checkpoint = seeds: the record of a zeroth-order run, and its replay.

Every change a zofast optimizer makes to the weights is a function of the run seed, the step index,
the scalar projected gradient g of that step, the learning rate and weight decay of each parameter
group, and the fixed hyperparameters. A :class:`Trajectory` stores exactly that: the method and its
hyperparameters, the run seed, a fingerprint of the parameter list, and the list of events:

* ``"step"``: one completed step, with g (float32: the optimizer itself rounds g to float32 before
  using it, so the record is exact), and each group's lr and weight decay (float64, as used); a
  step's index (which selects its seeds) is the number of step events before it;
* ``"abort+"`` / ``"abort-"``: a step whose first (``+``) or second (``-``) loss evaluation raised
  and whose perturbation was undone (these passes round the weights, so replay repeats them);
* ``"settle"``: :meth:`zofast.optim.LOZO.settle` removed a pipelined pending perturbation.

With ``directions=q`` > 1 per step (zofast.optim.directions; the hyperparameters then hold
``"directions": q``) a step records the g of each of its q directions, in direction order (the
seeds of direction k of step t are those of direction index t·q + k), and an abort records the
direction k it happened at (replay repeats the passes of the directions before it). A run with
one direction per step records neither, exactly as before the option existed.

Momentum needs nothing more: LOZO-M's state is a function of the g's and the seeds.

:func:`zofast.replay` rebuilds the fine-tuned weights from the base weights by re-running exactly
the engine calls of training, with the recorded g's in place of the forward passes: on the same
device type and dtype the result is bit-identical to the trained weights. A 20,000-step run is a few
hundred kB of JSON (arrays are little-endian, zlib-compressed and base64-encoded); there is no
pickle anywhere.

Example:
    >>> import torch
    >>> from zofast import LOZO, replay
    >>> model = torch.nn.Linear(8, 4)
    >>> base = [p.detach().clone() for p in model.parameters()]
    >>> opt = LOZO(model, lr=1e-2, rank=1, seed=3)
    >>> x = torch.randn(16, 8)
    >>> for _ in range(5):
    ...     _ = opt.step(lambda: model(x).pow(2).mean())
    >>> fresh = torch.nn.Linear(8, 4)
    >>> with torch.no_grad():
    ...     for p, b in zip(fresh.parameters(), base):
    ...         _ = p.copy_(b)
    >>> _ = replay(fresh, opt.trajectory)
    >>> all(torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters()))
    True
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import zlib
from array import array

import numpy as np
import torch

from zofast.rng import as_seed

__all__ = ["Trajectory", "param_fingerprint"]

FORMAT = "zofast.trajectory"
VERSION = 1

STEP, ABORT_PLUS, ABORT_MINUS, SETTLE = 0, 1, 2, 3
EVENT_NAMES = ("step", "abort+", "abort-", "settle")

_HASH_SAMPLES = 64


def _sample_hash(t: torch.Tensor) -> str:
    """A cheap hash of a tensor's values: the exact bits of 64 evenly spread elements."""
    flat = t.detach().reshape(-1)
    n = flat.numel()
    k = min(n, _HASH_SAMPLES)
    idx = torch.arange(k, dtype=torch.int64) * (n - 1) // max(k - 1, 1)
    values = flat[idx.to(flat.device)].cpu().contiguous()
    bits = values.view(torch.int32 if values.element_size() == 4 else torch.int16)
    digest = hashlib.sha256(f"{n}:{t.dtype}:".encode())
    digest.update(bits.numpy().astype(bits.numpy().dtype.newbyteorder("<")).tobytes())
    return digest.hexdigest()[:16]


def param_fingerprint(params, names, groups, trained) -> list[dict]:
    """Describe a parameter list for :meth:`Trajectory.check_params`.

    Args:
        params: the tensors, in the optimizer's order.
        names: a name per tensor, or None where unknown.
        groups: the param-group index of each tensor.
        trained: whether each tensor is trained (frozen tensors get no value hash).

    Returns:
        One dict per tensor: name, shape, dtype, group, trained, hash.

    Example:
        >>> fp = param_fingerprint([torch.zeros(2, 3)], [None], [0], [True])
        >>> fp[0]["shape"], fp[0]["dtype"]
        ([2, 3], 'float32')
    """
    out = []
    for p, name, group, train in zip(params, names, groups, trained, strict=True):
        out.append(
            {
                "name": name,
                "shape": list(p.shape),
                "dtype": str(p.dtype).removeprefix("torch."),
                "group": int(group),
                "trained": bool(train),
                "hash": _sample_hash(p) if train else None,
            }
        )
    return out


def _pack(values: array, dtype: str) -> str:
    raw = np.frombuffer(values.tobytes(), dtype=np.dtype(dtype).newbyteorder("="))
    data = raw.astype(np.dtype(dtype).newbyteorder("<")).tobytes()
    return base64.b64encode(zlib.compress(data, 9)).decode("ascii")


# Largest decompressed event array accepted (a 20,000-step run needs well under 1 MB): a hostile
# file cannot make load() allocate more than this per array.
MAX_ARRAY_BYTES = 1 << 28
MAX_GROUPS = 1 << 16
MAX_DIRECTIONS = 1 << 16
WEIGHT_DTYPE_NAMES = ("float32", "bfloat16", "float16")


def _unpack(text, dtype: str, typecode: str, name: str) -> array:
    try:
        inflate = zlib.decompressobj()
        data = inflate.decompress(
            base64.b64decode(text.encode("ascii"), validate=True), MAX_ARRAY_BYTES
        )
    except (ValueError, zlib.error, AttributeError) as error:
        raise ValueError(f"trajectory field {name!r} is not valid base64/zlib data") from error
    if inflate.unconsumed_tail:
        raise ValueError(f"trajectory field {name!r} is larger than {MAX_ARRAY_BYTES} bytes")
    little = np.dtype(dtype).newbyteorder("<")
    if len(data) % little.itemsize:
        raise ValueError(f"trajectory field {name!r} has a truncated array")
    native = np.frombuffer(data, dtype=little).astype(np.dtype(dtype).newbyteorder("="))
    out = array(typecode)
    out.frombytes(native.tobytes())
    return out


def _fingerprint_problem(entry: dict, n_groups: int) -> str | None:
    """What is wrong with one fingerprint entry read from a file, or None."""

    def integer(x) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    if entry["name"] is not None and not isinstance(entry["name"], str):
        return "name must be a string or null"
    shape = entry["shape"]
    if not isinstance(shape, list) or not all(integer(d) and d >= 0 for d in shape):
        return f"shape must be a list of sizes, got {shape!r}"
    if not isinstance(entry["dtype"], str):
        return f"dtype must be a string, got {entry['dtype']!r}"
    if entry["trained"] is True and entry["dtype"] not in WEIGHT_DTYPE_NAMES:
        return f"a trained tensor's dtype is one of {WEIGHT_DTYPE_NAMES}, got {entry['dtype']!r}"
    if not integer(entry["group"]) or not 0 <= entry["group"] < n_groups:
        return f"group must be in 0..{n_groups - 1}, got {entry['group']!r}"
    if not isinstance(entry["trained"], bool):
        return f"trained must be true or false, got {entry['trained']!r}"
    if entry["trained"] and not isinstance(entry["hash"], str):
        return "a trained tensor needs its value hash"
    return None


class Trajectory:
    """The record of a zeroth-order run: enough to rebuild its weights from the base weights.

    Optimizers create and fill their own (``opt.trajectory``); users save, load, inspect and
    replay it.

    Args:
        method: "LOZO" or "MeZO".
        hyperparameters: the fixed hyperparameters (eps, rank, nu, momentum, pipeline, mode).
        run_seed: the run seed every perturbation seed is derived from (zofast.rng.RunSeeds).
        n_groups: number of parameter groups (each step records one lr and weight decay per group).

    Attributes:
        directions: q, the directions per step (``hyperparameters["directions"]``, 1 if absent).
        params: the parameter fingerprint (see :func:`param_fingerprint`), set at the first step;
            None before.
        device: device type of the trained tensors when the run started ("cpu", "cuda"; "cpu+cuda"
            for a model split by a device map, zofast.device_map.device_types), or None.

    Example:
        >>> traj = Trajectory("MeZO", {"eps": 1e-3}, run_seed=1, n_groups=1)
        >>> traj.record_step(0.5, [1e-3], [0.0])
        >>> traj.steps, traj.g.tolist()
        (1, [0.5])
    """

    def __init__(self, method: str, hyperparameters: dict, run_seed: int, n_groups: int):
        if not isinstance(method, str) or not method:
            raise ValueError(f"method must be a non-empty string, got {method!r}")
        if isinstance(n_groups, bool) or not isinstance(n_groups, int) or n_groups < 1:
            raise ValueError(f"n_groups must be a positive integer, got {n_groups!r}")
        q = hyperparameters.get("directions", 1)
        if isinstance(q, bool) or not isinstance(q, int) or not 1 <= q <= MAX_DIRECTIONS:
            raise ValueError(f"directions must be an integer in 1..{MAX_DIRECTIONS}, got {q!r}")
        self.method = method
        self.hyperparameters = dict(hyperparameters)
        self.run_seed = as_seed(run_seed, "run_seed")
        self.n_groups = n_groups
        self.directions = q
        self.params: list[dict] | None = None
        self.device: str | None = None
        self._kinds = bytearray()
        self._g = array("f")
        self._lr = array("d")
        self._wd = array("d")
        self._abort_direction = array("I")

    # Recording (used by the optimizers).

    def record_step(self, g, lrs, wds) -> None:
        """Append a completed step: g (rounded to float32; with directions q > 1 a sequence of
        the q directions' g's), one lr and weight decay per group."""
        lrs, wds = [float(x) for x in lrs], [float(x) for x in wds]
        if len(lrs) != self.n_groups or len(wds) != self.n_groups:
            raise ValueError(f"need one lr and weight decay per group ({self.n_groups})")
        gs = [float(x) for x in g] if isinstance(g, (list, tuple, np.ndarray)) else [float(g)]
        if len(gs) != self.directions:
            raise ValueError(f"need one g per direction ({self.directions}), got {len(gs)}")
        if not all(math.isfinite(x) for x in gs):
            raise ValueError(f"g must be finite, got {g}")
        self._kinds.append(STEP)
        self._g.extend(gs)
        self._lr.extend(lrs)
        self._wd.extend(wds)

    def record(self, kind: int, direction: int = 0) -> None:
        """Append an event without data: ABORT_PLUS, ABORT_MINUS (at `direction` k of the step,
        0 .. directions − 1) or SETTLE."""
        if kind not in (ABORT_PLUS, ABORT_MINUS, SETTLE):
            raise ValueError(f"kind must be ABORT_PLUS, ABORT_MINUS or SETTLE, got {kind!r}")
        if kind != SETTLE:
            if isinstance(direction, bool) or not isinstance(direction, int):
                raise ValueError(f"direction must be an integer, got {direction!r}")
            if not 0 <= direction < self.directions:
                raise ValueError(f"direction must be in 0..{self.directions - 1}, got {direction}")
            self._abort_direction.append(direction)
        self._kinds.append(kind)

    # Inspection.

    @property
    def steps(self) -> int:
        """Number of completed steps."""
        return len(self._g) // self.directions

    def __len__(self) -> int:
        return self.steps

    @property
    def g(self) -> np.ndarray:
        """float32 array of the projected gradients: one per completed step, or (steps, q)
        with directions q > 1 (row t: the g of each direction of step t)."""
        g = np.frombuffer(self._g.tobytes(), dtype=np.float32).copy()
        return g if self.directions == 1 else g.reshape(-1, self.directions)

    @property
    def lr(self) -> np.ndarray:
        """float64 array (steps, n_groups) of the learning rates used."""
        return np.frombuffer(self._lr.tobytes(), dtype=np.float64).reshape(-1, self.n_groups).copy()

    @property
    def weight_decay(self) -> np.ndarray:
        """float64 array (steps, n_groups) of the weight decays used."""
        return np.frombuffer(self._wd.tobytes(), dtype=np.float64).reshape(-1, self.n_groups).copy()

    @property
    def events(self) -> list[str]:
        """The event kinds in order: "step", "abort+", "abort-", "settle"."""
        return [EVENT_NAMES[k] for k in self._kinds]

    def iter_events(self):
        """Yield (kind, g, lrs, wds) per event: for a step its g (a float; with directions
        q > 1 a tuple of the q directions' g's) and lists of each group's lr and weight decay;
        for an abort g is the direction k it happened at (an int, 0 with one direction) and
        lrs, wds are None; for a settle all three are None."""
        s, a, n, q = 0, 0, self.n_groups, self.directions
        for kind in self._kinds:
            if kind == STEP:
                g = self._g[s] if q == 1 else tuple(self._g[s * q : (s + 1) * q])
                yield (
                    kind,
                    g,
                    list(self._lr[s * n : (s + 1) * n]),
                    list(self._wd[s * n : (s + 1) * n]),
                )
                s += 1
            elif kind == SETTLE:
                yield kind, None, None, None
            else:
                yield kind, self._abort_direction[a], None, None
                a += 1

    def __repr__(self) -> str:
        return (
            f"Trajectory(method={self.method!r}, steps={self.steps}, events={len(self._kinds)}, "
            f"run_seed={self.run_seed}, hyperparameters={self.hyperparameters})"
        )

    def __eq__(self, other) -> bool:
        if not isinstance(other, Trajectory):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    # Parameters.

    def check_params(self, params) -> None:
        """Raise ValueError unless `params` (in optimizer order) match the fingerprint.

        Checks the count, shapes and dtypes of all tensors and the value hash of the trained ones
        (so a fine-tuned copy, or another model of the same shape, is refused as a base).

        Args:
            params: the tensors, in the order of the run's optimizer.

        Example:
            >>> traj = Trajectory("MeZO", {}, run_seed=0, n_groups=1)
            >>> traj.params = param_fingerprint([torch.ones(2)], [None], [0], [True])
            >>> traj.check_params([torch.ones(2)])
        """
        if self.params is None:
            return
        if len(params) != len(self.params):
            raise ValueError(
                f"the trajectory was recorded on {len(self.params)} parameter tensors, "
                f"got {len(params)}: pass the tensors in the run's optimizer order (runs whose "
                "optimizer got a module, named parameters or param_groups() are matched by name)"
            )
        for i, (p, entry) in enumerate(zip(params, self.params, strict=True)):
            label = entry["name"] or f"parameter {i}"
            if list(p.shape) != entry["shape"]:
                raise ValueError(
                    f"{label}: shape {list(p.shape)} does not match the recorded {entry['shape']}"
                )
            dtype = str(p.dtype).removeprefix("torch.")
            if dtype != entry["dtype"]:
                raise ValueError(
                    f"{label}: dtype {dtype} does not match the recorded {entry['dtype']}"
                )
            if entry["trained"] and _sample_hash(p) != entry["hash"]:
                raise ValueError(
                    f"{label}: its values are not the base weights the trajectory started from "
                    "(replay needs a fresh copy of the base model, not a fine-tuned one)"
                )

    # Serialisation.

    def to_dict(self) -> dict:
        """A JSON-serialisable dict (arrays as base64 of zlib-compressed little-endian bytes).

        Example:
            >>> t = Trajectory("MeZO", {"eps": 1e-3}, 0, 1)
            >>> Trajectory.from_dict(t.to_dict()) == t
            True
        """
        return {
            "format": FORMAT,
            "version": VERSION,
            "method": self.method,
            "hyperparameters": dict(self.hyperparameters),
            "run_seed": str(self.run_seed),
            "n_groups": self.n_groups,
            "params": None if self.params is None else [dict(e) for e in self.params],
            "device": self.device,
            "torch_version": str(torch.__version__),
            "events": {
                "kinds": _pack(array("B", self._kinds), "u1"),
                "g": _pack(self._g, "f4"),
                "lr": _pack(self._lr, "f8"),
                "weight_decay": _pack(self._wd, "f8"),
                # one direction: every abort is at direction 0, and files stay as they were
                **(
                    {"abort_direction": _pack(self._abort_direction, "u4")}
                    if self.directions > 1
                    else {}
                ),
            },
        }

    @classmethod
    def from_dict(cls, data: dict) -> Trajectory:
        """Inverse of :meth:`to_dict`; ValueError on anything malformed.

        Example:
            >>> t = Trajectory("LOZO", {"rank": 2}, 5, 2)
            >>> Trajectory.from_dict(t.to_dict()).n_groups
            2
        """
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError("not a zofast trajectory (missing format marker)")
        if data.get("version") != VERSION:
            raise ValueError(f"unsupported trajectory version {data.get('version')!r}")
        try:
            if not isinstance(data["hyperparameters"], dict) or not all(
                isinstance(k, str) for k in data["hyperparameters"]
            ):
                raise ValueError("malformed trajectory: hyperparameters must be a dict by name")
            run_seed = data["run_seed"]
            if not (isinstance(run_seed, str) and run_seed.isdigit()):
                raise ValueError(f"malformed trajectory: run_seed {run_seed!r} is not a number")
            n_groups = data["n_groups"]
            if isinstance(n_groups, int) and n_groups > MAX_GROUPS:
                raise ValueError(f"malformed trajectory: {n_groups} parameter groups")
            traj = cls(
                data["method"], data["hyperparameters"], int(data["run_seed"]), data["n_groups"]
            )
            events = data["events"]
            kinds = _unpack(events["kinds"], "u1", "B", "kinds")
            g = _unpack(events["g"], "f4", "f", "g")
            lr = _unpack(events["lr"], "f8", "d", "lr")
            wd = _unpack(events["weight_decay"], "f8", "d", "weight_decay")
            n_aborts = sum(1 for k in kinds if k in (ABORT_PLUS, ABORT_MINUS))
            if "abort_direction" in events:
                aborts = _unpack(events["abort_direction"], "u4", "I", "abort_direction")
            else:
                aborts = array("I", [0] * n_aborts)
            params = data["params"]
            device = data["device"]
        except (KeyError, TypeError) as error:
            raise ValueError(f"malformed trajectory: {error!r}") from error
        if any(k > SETTLE for k in kinds):
            raise ValueError("malformed trajectory: unknown event kind")
        n_steps = sum(1 for k in kinds if k == STEP)
        if (
            len(g) != n_steps * traj.directions
            or len(lr) != n_steps * traj.n_groups
            or len(wd) != len(lr)
            or len(aborts) != n_aborts
        ):
            raise ValueError("malformed trajectory: event arrays disagree in length")
        if any(k >= traj.directions for k in aborts):
            raise ValueError("malformed trajectory: an abort's direction is out of range")
        if not all(math.isfinite(x) for x in g):
            raise ValueError("malformed trajectory: non-finite g")
        if not all(math.isfinite(x) and x >= 0 for x in (*lr, *wd)):
            raise ValueError(
                "malformed trajectory: an lr or weight decay is negative or not finite"
            )
        if device is not None and not isinstance(device, str):
            raise ValueError("malformed trajectory: device must be a string")
        if kinds and params is None:
            raise ValueError("malformed trajectory: events without a parameter fingerprint")
        if params is not None:
            keys = {"name", "shape", "dtype", "group", "trained", "hash"}
            if not isinstance(params, list) or not all(
                isinstance(e, dict) and set(e) == keys for e in params
            ):
                raise ValueError("malformed trajectory: bad parameter fingerprint")
            for i, entry in enumerate(params):
                problem = _fingerprint_problem(entry, traj.n_groups)
                if problem:
                    raise ValueError(f"malformed trajectory: parameter {i}: {problem}")
        traj.params = params
        traj.device = device
        traj._kinds = bytearray(kinds.tobytes())
        traj._g, traj._lr, traj._wd = g, lr, wd
        traj._abort_direction = aborts
        return traj

    def save(self, path) -> None:
        """Write the trajectory as JSON (no pickle).

        Args:
            path: file path.

        Example:
            >>> import tempfile, os
            >>> t = Trajectory("MeZO", {"eps": 1e-3}, 0, 1)
            >>> p = os.path.join(tempfile.mkdtemp(), "run.json")
            >>> t.save(p)
            >>> Trajectory.load(p) == t
            True
        """
        text = json.dumps(self.to_dict(), allow_nan=False, separators=(",", ":"))
        tmp = f"{os.fspath(path)}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path) -> Trajectory:
        """Read a trajectory written by :meth:`save`.

        Args:
            path: file path.

        Returns:
            The Trajectory.

        Example:
            See :meth:`save`.
        """
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
                raise ValueError(f"{path} is not a JSON trajectory: {error}") from None
        return cls.from_dict(data)
