"""The methods the training loop drives: one small class each, behind one protocol.

:func:`zofast.train.loop.run` is the only loop. It asks a :class:`Method` to advance, logs the
losses it reports, evaluates on dev when a period is crossed, keeps the best snapshot and writes
the files; a method knows how to take its own steps and nothing about logs or evaluation:

* :class:`ZerothOrder` (LOZO, LOZO-M, MeZO) and :class:`Adam`: one minibatch step per advance;
  the best snapshot is a host copy of the trained tensors.
* :class:`DFO` (DFO-LoRA): an advance is a run of generations (``popsize`` calls each, the first
  one also the starting point's call) up to the next period the loop asks for, through
  :meth:`DFOLoRA.fit`; the best snapshot is the search vectors. A fit builds its population
  evaluator once, so generations are not advanced one fit at a time (the evaluator's setup costs
  about a generation on MiniLM).

Positions are counted in the method's steps: optimizer steps, or DFO calls. ``state_dict`` /
``load_state_dict`` give the loop's checkpoints what resuming a method needs (weights as stored,
optimizer state, data order; DFO-LoRA: its own ``save`` folder and its log's offset).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from zofast.data import Example
from zofast.models import LoadedModel
from zofast.scoring import Scorer
from zofast.train.config import ConfigError, TrainConfig
from zofast.train.evaluation import trajectory_prefix


class Batches:
    """Minibatches without replacement within each epoch, from a seeded generator."""

    def __init__(self, examples: Sequence[Example], batch_size: int, seed: int):
        self.examples = list(examples)
        self.batch_size = min(batch_size, len(self.examples))
        self.generator = torch.Generator().manual_seed(seed)
        self._order: list[int] = []

    def next(self) -> list[Example]:
        if len(self._order) < self.batch_size:
            perm = torch.randperm(len(self.examples), generator=self.generator).tolist()
            self._order.extend(perm)
        picked, self._order = self._order[: self.batch_size], self._order[self.batch_size :]
        return [self.examples[i] for i in picked]

    def state_dict(self) -> dict:
        """Where the data order is: the generator's state and the rest of the current epoch."""
        return {"generator": self.generator.get_state(), "order": list(self._order)}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self._order = [int(i) for i in state["order"]]


def crossed(before: int, after: int, period: int) -> bool:
    """Whether going from position ``before`` to ``after`` passes a multiple of ``period``."""
    return after // period > before // period


class Method:
    """The protocol: what the loop needs from a method (see the module docstring).

    Attributes:
        cost: forward passes per step (the budget's unit).
        total: steps of the whole run.
        resolved: the resolved settings written into the log's ``config`` record.
        log_fields: more fields of that record.
    """

    cost: int
    total: int
    resolved: dict
    log_fields: dict

    @property
    def position(self) -> int:
        """Steps done so far."""
        raise NotImplementedError

    def fits(self) -> bool:
        """Whether another advance fits in ``total``."""
        return self.position < self.total

    def advance(self, periods: Sequence[int]) -> list[tuple[int, float]]:
        """Take one or more steps; returns ``(position, training loss)`` after each.

        Raises FloatingPointError when a step cannot be taken (the weights are left as they were
        before it)."""
        raise NotImplementedError

    def settle(self) -> None:
        """Make the model hold the current iterate (before an evaluation)."""

    def snapshot(self):
        """A copy of what the best checkpoint keeps."""
        raise NotImplementedError

    def restore(self, snapshot) -> None:
        """Put a :meth:`snapshot` back on the model."""
        raise NotImplementedError

    def marker(self) -> int:
        """Where the run is, for the files' best-prefix (ZO: trajectory events)."""
        return self.position

    def close(self) -> None:
        """The loop is over (normally or not): leave a plain model."""

    def write_files(self, out_dir: Path, marker: int, save_model: bool) -> dict[str, str]:
        """Write the method's own result files; returns name -> path."""
        return {}

    def state_dict(self) -> tuple[dict, dict[str, Callable[[Path], Any]]]:
        """What resuming needs: a dict (tensors allowed, see :mod:`zofast.train.checkpoint`)
        and ``name -> writer(folder)`` for state that other code saves as a folder."""
        raise NotImplementedError

    def load_state_dict(self, state: dict, folder: Path) -> None:
        """Continue from :meth:`state_dict` (``folder``: the checkpoint, holding its folders)."""
        raise NotImplementedError


class _Weights(Method):
    """Methods that train the model's tensors (best snapshot: a host copy of them)."""

    def __init__(self, config: TrainConfig, loaded: LoadedModel, scorer: Scorer, batches):
        self.loaded, self.scorer, self.batches = loaded, scorer, batches
        self.trained = [(n, p) for n, p in loaded.model.named_parameters() if p.requires_grad]
        self.cost = config.forwards_per_step
        self.total = config.resolved_steps
        self.steps_done = 0
        self.resolved = {
            "lr": config.resolved_lr,
            "momentum": config.resolved_momentum,
            "steps": self.total,
        }
        self.log_fields = {"trained_parameters": sum(p.numel() for _, p in self.trained)}

    @property
    def position(self) -> int:
        return self.steps_done

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().to("cpu", copy=True) for n, p in self.trained}

    def restore(self, snapshot: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, p in self.trained:
                p.copy_(snapshot[name].to(p.device))

    def state_dict(self) -> tuple[dict, dict]:
        # The stored tensors as they are: a pipelined step's pending +ε perturbation or
        # mode="virtual"'s unflushed updates included, which the optimizer's state describes
        # (settling here would round differently from a run that never stopped).
        state = {
            "steps": self.steps_done,
            "weights": {n: p.detach() for n, p in self.trained},
            "optimizer": self.optimizer.state_dict(),
            "batches": self.batches.state_dict(),
        }
        return state, {}

    def load_state_dict(self, state: dict, folder: Path) -> None:
        weights = state["weights"]
        names = [n for n, _ in self.trained]
        if sorted(weights) != sorted(names):
            raise ConfigError("the checkpoint's trained tensors are not this run's (freeze?)")
        with torch.no_grad():
            for name, p in self.trained:
                w = weights[name]
                if w.shape != p.shape or w.dtype != p.dtype:
                    raise ConfigError(
                        f"checkpoint tensor {name}: {w.dtype} {tuple(w.shape)}, the model has "
                        f"{p.dtype} {tuple(p.shape)}"
                    )
                p.copy_(w.to(p.device))
        self.optimizer.load_state_dict(state["optimizer"])
        self.batches.load_state_dict(state["batches"])
        self.steps_done = int(state["steps"])

    def write_files(self, out_dir: Path, marker: int, save_model: bool) -> dict[str, str]:
        if not save_model:
            return {}
        model_dir = out_dir / "model"
        self.loaded.model.save_pretrained(model_dir)
        self.loaded.tokenizer.save_pretrained(model_dir)
        return {"model": str(model_dir)}


class ZerothOrder(_Weights):
    """LOZO, LOZO-M or MeZO (:mod:`zofast.optim`): two forwards per direction and step (or,
    paired, one over the batch stacked twice), a trajectory of seeds."""

    def __init__(self, config: TrainConfig, loaded: LoadedModel, scorer: Scorer, batches, ranks):
        super().__init__(config, loaded, scorer, batches)
        self.ranks = ranks
        group = None if ranks is None else ranks.group
        self.optimizer = build_zo_optimizer(config, loaded.model, group)
        self.resolved["paired"] = self.optimizer.paired
        # split="directions": every process evaluates its own directions on the whole batch.
        self.shard = group is not None and config.split == "batch"

    def advance(self, periods: Sequence[int]) -> list[tuple[int, float]]:
        examples = self.batches.next()
        if self.shard:
            examples = self.ranks.shard(examples)  # the optimizer all-reduces the losses
        batch = self.scorer.encode(examples)
        if self.optimizer.paired:  # one forward: the batch twice, (L+, L−) of its two copies
            stacked = batch.repeat(2)
            closure = lambda: self.scorer.losses(stacked)  # noqa: E731
        else:
            closure = lambda: self.scorer.loss(batch)  # noqa: E731
        loss = self.optimizer.step(closure, examples=len(examples))
        self.steps_done += 1
        return [(self.steps_done, loss)]

    @property
    def world(self) -> int:
        """The number of processes taking each step together (torchrun's world size)."""
        return 1 if self.ranks is None else self.ranks.world

    def state_dict(self) -> tuple[dict, dict]:
        state, folders = super().state_dict()
        state["world"] = self.world
        return state, folders

    def load_state_dict(self, state: dict, folder: Path) -> None:
        world = int(state.get("world", 1))
        if world != self.world and (self.ranks is None or self.ranks.main):
            warnings.warn(
                f"the run took its steps in {world} process(es) and resumes in {self.world}: it "
                "continues, but its losses are means over other slices of the batches, so it "
                "does not end bit for bit as the uninterrupted run",
                RuntimeWarning,
                stacklevel=2,
            )
        super().load_state_dict(state, folder)

    def settle(self) -> None:
        self.optimizer.settle()

    def marker(self) -> int:
        return len(self.optimizer.trajectory.events)

    def close(self) -> None:
        self.optimizer.settle()
        if self.optimizer.mode != "inplace":
            self.optimizer.detach()  # the hooks come off: a plain model from here on

    def write_files(self, out_dir: Path, marker: int, save_model: bool) -> dict[str, str]:
        files = {}
        path = out_dir / "trajectory.json"
        self.optimizer.trajectory.save(path)
        files["trajectory"] = str(path)
        path = out_dir / "trajectory-best.json"
        trajectory_prefix(self.optimizer.trajectory, marker).save(path)
        files["trajectory_best"] = str(path)
        return {**files, **super().write_files(out_dir, marker, save_model)}


class Adam(_Weights):
    """The first-order baseline (torch's Adam): one forward and one backward pass per step."""

    def __init__(self, config: TrainConfig, loaded: LoadedModel, scorer: Scorer, batches):
        from zofast.optim import param_groups

        super().__init__(config, loaded, scorer, batches)
        groups = param_groups(loaded.model, config.weight_decay)
        params = [p for g in groups for _, p in g["params"]]
        self.optimizer = torch.optim.Adam(
            params, lr=config.resolved_lr, weight_decay=config.weight_decay
        )

    def advance(self, periods: Sequence[int]) -> list[tuple[int, float]]:
        batch = self.scorer.encode(self.batches.next())
        self.optimizer.zero_grad(set_to_none=True)
        with torch.enable_grad():
            logits = self.scorer.head_logits(self.scorer.forward_hidden(batch), batch)
            loss = F.cross_entropy(logits, batch.labels.to(logits.device))
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"training loss is {float(loss.detach())}; no update was made"
                )
            loss.backward()
        self.optimizer.step()
        self.steps_done += 1
        return [(self.steps_done, float(loss.detach()))]

    def close(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)


class DFO(Method):
    """DFO-LoRA (:class:`zofast.dfo.lora.DFOLoRA`): steps are calls (one candidate on the whole
    training set), ``ceil(len(train) / batch_size)`` forwards each; the model's weights are never
    changed (the adapters are forward hooks)."""

    def __init__(self, config: TrainConfig, loaded: LoadedModel, scorer: Scorer, splits, log):
        try:
            from zofast.dfo.lora import DFOLoRA
        except ImportError as error:
            raise ConfigError(f"method dfo-lora needs zofast.dfo.lora.DFOLoRA: {error}") from None
        self.loaded, self.scorer = loaded, scorer
        self.train_set = splits["train"]
        self.cost = math.ceil(len(self.train_set) / config.batch_size)
        budget = config.forward_budget
        self.total = config.steps if budget is None else budget // self.cost
        self.popsize = config.popsize
        if self.total < config.popsize:
            raise ConfigError(
                f"dfo-lora needs a budget of at least one generation ({config.popsize} calls), "
                f"got {self.total}"
            )
        try:
            self.dfo = DFOLoRA(
                loaded,
                rank=config.resolved_rank,
                intrinsic_dim=config.intrinsic_dim,
                popsize=config.popsize,
                seed=config.seed,
            )
        except ValueError as error:
            raise ConfigError(f"dfo-lora: {error}") from None
        self.log = log
        self._log_offset = 0
        self.resolved = {"steps": self.total, "forwards_per_call": self.cost}
        self.log_fields = {}

    @property
    def position(self) -> int:
        return self.dfo.calls

    def _start(self) -> int:
        """Calls after the starting point (evaluated by the first fit, one call)."""
        return max(self.dfo.calls, 1)

    def fits(self) -> bool:
        return self._start() + self.popsize <= self.total

    def advance(self, periods: Sequence[int]) -> list[tuple[int, float]]:
        start, p = self._start(), self.popsize
        generations = (self.total - start) // p
        for period in periods:  # stop right after the generation that crosses the period
            generations = min(generations, ((start // period + 1) * period - start + p - 1) // p)
        self.dfo.fit(
            self.train_set,
            None,
            budget=start + generations * p,
            log=self.log,
            scorer=self.scorer,
            progress=False,
        )
        return [(r["calls"], r["loss"]) for r in self._new_records() if r["step"] > 0]

    def _new_records(self) -> list[dict]:
        import json

        with open(self.log, encoding="utf-8") as f:
            f.seek(self._log_offset)
            text = f.read()
        self._log_offset += len(text.encode("utf-8"))
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def snapshot(self):
        return self.dfo.incumbents

    def restore(self, snapshot) -> None:
        self.dfo.set_z(snapshot)

    def state_dict(self) -> tuple[dict, dict]:
        return {"log_offset": self._log_offset}, {"dfo": self.dfo.save}

    def load_state_dict(self, state: dict, folder: Path) -> None:
        from zofast.dfo.lora import DFOLoRA

        self.dfo.remove()  # the fresh search's hooks come off before the saved one's go on
        try:
            self.dfo = DFOLoRA.load(folder / "dfo", self.loaded)
        except (ValueError, KeyError, OSError) as error:
            raise ConfigError(f"cannot resume the DFO-LoRA search: {error}") from None
        self._log_offset = int(state["log_offset"])
        with open(self.log, "r+b") as f:  # generations after the checkpoint are run again
            f.truncate(self._log_offset)

    def write_files(self, out_dir: Path, marker: int, save_model: bool) -> dict[str, str]:
        files = {"dfo": str(self.dfo.save(out_dir / "dfo"))}
        if save_model:
            files["adapter"] = str(self.dfo.export_peft(out_dir / "adapter"))
        return files


def build_zo_optimizer(config: TrainConfig, model: torch.nn.Module, process_group=None):
    """The LOZO / MeZO optimizer a config describes (ConfigError on a bad combination);
    ``process_group``: data parallelism (zofast.optim.group), its ranks sharing out the batch
    or the directions (``config.split``)."""
    from zofast.optim import LOZO, MeZO, param_groups

    if config.split == "directions" and process_group is None:
        raise ConfigError(
            "split 'directions' shares each step's directions among torchrun's processes; "
            "one process evaluates them all: leave split at 'batch'"
        )
    groups = param_groups(model, config.weight_decay)
    common = {
        "lr": config.resolved_lr,
        "eps": config.eps,
        "seed": config.seed,
        "mode": config.resolved_mode,
        "rounding": config.rounding,
        "pipeline": config.resolved_mode == "inplace" and config.pipeline is not False,
        "model": model,
        "process_group": process_group,
        "directions": config.directions,
        "split": config.split,
    }
    try:
        if config.method == "mezo":
            return MeZO(groups, **common)
        return LOZO(
            groups,
            rank=config.resolved_rank,
            nu=config.nu,
            momentum=config.resolved_momentum,
            paired=config.resolved_paired,
            **common,
        )
    except ValueError as error:
        raise ConfigError(str(error)) from None


def build_method(
    config: TrainConfig, loaded: LoadedModel, scorer: Scorer, splits, out_dir: Path, ranks=None
):
    """The :class:`Method` of ``config.method`` (ConfigError before anything is written);
    ``ranks``: a :class:`zofast.train.ranks.Ranks` under torchrun (ZO methods only)."""
    if config.method == "dfo-lora":
        return DFO(config, loaded, scorer, splits, out_dir / "dfo.jsonl")
    loaded.model.eval()
    batches = Batches(splits["train"], config.batch_size, config.seed)
    if config.method == "adam":
        return Adam(config, loaded, scorer, batches)
    if config.method == "lora":
        from zofast.train.lora import LoRA

        return LoRA(config, loaded, scorer, batches)
    return ZerothOrder(config, loaded, scorer, batches, ranks)
