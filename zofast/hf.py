"""Zeroth-order fine-tuning inside Hugging Face's ``Trainer``: switch one line.

::

    from zofast.hf import ZOTrainer, ZOTrainingArguments

    args = ZOTrainingArguments("out", learning_rate=1e-6, max_steps=20_000, zo_method="lozo")
    trainer = ZOTrainer(model=model, args=args, train_dataset=ds)   # was: Trainer(...)
    trainer.train()
    trainer.save_trajectory("out/trajectory.json")

How it fits into Trainer's loop
    Trainer calls ``training_step`` for each batch, then clips gradients, calls
    ``optimizer.step()``, steps the LR scheduler and zeroes gradients. ``ZOTrainer`` overrides
    ``training_step`` to run one whole zeroth-order step: ``opt.step(closure)`` with a closure
    that computes the model's loss on the batch under ``torch.no_grad()`` (so no gradient is ever
    allocated and ``backward`` is never called). The optimizer Trainer holds is a
    :class:`TrainerOptimizer`, a view of the zofast optimizer that shares its parameter groups and
    state (so the LR scheduler sets the learning rate the zofast optimizer uses, and checkpoints
    hold its state) and whose plain ``step()`` does nothing: the step already happened in
    ``training_step``. Gradient clipping is switched off (``max_grad_norm = 0``): there are no
    gradients to clip.

    The model runs in eval mode (dropout off) during the zeroth-order steps: both loss
    evaluations of a step must see the same function, or the finite difference measures the
    dropout noise. Gradient accumulation is refused (every batch is its own step).

    With ``zo_paired=True`` (LOZO / LOZO-M, or an optimizer built with ``paired=True``) a step is
    one forward over the batch stacked twice (:mod:`zofast.optim.paired`): the closure is
    ``zofast.paired.losses(model, inputs, num_items_in_batch)``, each copy's loss computed as
    ``compute_loss`` computes the batch's (the model's head, Trainer's ``num_items_in_batch``). A
    paired step cannot go through a custom ``compute_loss`` / ``compute_loss_func`` or label
    smoothing (ValueError when the optimizer is created).

Divergence
    A step the optimizer refuses (FloatingPointError: NaN / inf loss or g, an update that
    overflows float32; the weights are restored) stops training with a one-line warning instead
    of an exception: ``trainer.train()`` returns, ``trainer.diverged`` says at which step and why,
    and the trajectory (the refused step recorded as an abort) and Trainer's checkpoints are kept.

Checkpoints and resume
    Trainer's checkpoints (``save_strategy``) get the zofast optimizer's whole state (step,
    run seed, pending perturbation, momentum or virtual buffers, the trajectory) and the LR
    scheduler's as ``zofast_state.json`` + ``zofast_state.safetensors`` (no pickle; written to a
    temporary file, fsynced, renamed), and the trajectory so far as ``trajectory.json``
    (``zofast replay`` rebuilds the checkpoint's weights from it). ``trainer.train(
    resume_from_checkpoint=...)`` loads them back, so a resumed run continues bit for bit: same
    trajectory, same weights as a run that never stopped (Trainer restores the weights, the data
    order and its RNG states itself). Checkpoints written by Trainer's own format
    (``optimizer.pt``) still load.

Models larger than the GPU
    ``zo_offload=True`` streams the model's repeated blocks from pinned host memory to
    ``args.device`` (:func:`zofast.offload.stream`, before Trainer places the model; the model
    gets an ``hf_device_map`` naming each block's execution device, transformers' and
    accelerate's sign for "placed already: do not move"), and the optimizer is built on it.
    Every block parameter holds its always-current host tensor between forwards, so
    ``save_model`` and the checkpoints write it. ``trainer.streamed.remove()`` takes the hooks off
    when done (the blocks stay on the host). The paired step stays opt-in here (``zo_paired``):
    it halves a streamed step's uploads, but refuses a custom ``compute_loss``. One process, a
    GPU, a model loaded without a device map, and no prebuilt optimizer (it would hold the
    tensors from before streaming); else ValueError.

Choosing the optimizer
    ``ZOTrainingArguments`` adds ``zo_method`` (``lozo``, ``lozo-m``, ``mezo``), ``zo_eps``,
    ``zo_rank``, ``zo_nu``, ``zo_momentum``, ``zo_seed``, ``zo_mode``, ``zo_rounding``,
    ``zo_directions``, ``zo_paired``, ``zo_offload``, ``zo_offload_update`` and ``zo_prefetch``
    to ``TrainingArguments``; the learning rate and weight
    decay are Trainer's own ``learning_rate`` and ``weight_decay`` (decay on matrices only, as
    :func:`zofast.optim.param_groups`). Plain ``TrainingArguments`` give LOZO
    with its defaults. Or build the optimizer yourself and pass ``optimizers=(opt, None)``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers

from zofast.optim import LOZO, MeZO, param_groups
from zofast.paired import losses

__all__ = ["ZOTrainer", "ZOTrainingArguments", "TrainerOptimizer", "ZO_METHODS"]

ZO_METHODS = ("lozo", "lozo-m", "mezo")
ZO_STATE = "zofast_state"
"""Stem of the JSON + safetensors pair that holds the optimizer and scheduler states."""


@dataclass
class ZOTrainingArguments(transformers.TrainingArguments):
    """``TrainingArguments`` plus the zeroth-order hyperparameters.

    Args:
        zo_method: ``"lozo"``, ``"lozo-m"`` or ``"mezo"``.
        zo_eps: perturbation scale ε.
        zo_rank: rank of LOZO's U·Vᵀ.
        zo_nu: steps between redraws of LOZO's V.
        zo_momentum: β of LOZO-M (``lozo-m`` only; None = 0.9).
        zo_seed: run seed of the noise; None = ``seed``.
        zo_mode: ``"auto"``, ``"inplace"``, ``"shadow"`` or ``"virtual"`` (see zofast.optim).
        zo_rounding: ``"auto"``, ``"nearest"`` or ``"stochastic"``.
        zo_directions: perturbations per step, their estimates averaged (2 forwards each).
        zo_paired: one forward per direction over the batch stacked twice (lozo / lozo-m).
        zo_offload: stream the blocks from pinned host memory to the GPU (module docstring).
        zo_offload_update: with zo_offload, where the block tensors' update passes run:
            ``"host"`` (C++ engine) or ``"gpu"`` (written back); see :func:`zofast.offload.stream`.
        zo_prefetch: with zo_offload, blocks uploaded ahead of the one computing.

    Example:
        >>> args = ZOTrainingArguments("out", learning_rate=1e-6, zo_method="mezo")
    """

    zo_method: str = field(default="lozo", metadata={"help": "lozo, lozo-m or mezo"})
    zo_eps: float = field(default=1e-3, metadata={"help": "perturbation scale"})
    zo_rank: int = field(default=2, metadata={"help": "rank of LOZO's U V^T"})
    zo_nu: int = field(default=50, metadata={"help": "steps between redraws of V"})
    zo_momentum: float | None = field(default=None, metadata={"help": "LOZO-M beta (0.9)"})
    zo_seed: int | None = field(default=None, metadata={"help": "noise seed (default: seed)"})
    zo_directions: int = field(default=1, metadata={"help": "perturbations per step (averaged)"})
    zo_mode: str = field(
        default="auto",
        metadata={"help": "auto (an exact mode for bf16/fp16), inplace, shadow or virtual"},
    )
    zo_rounding: str = field(
        default="auto",
        metadata={"help": "auto (stochastic for bf16/fp16), nearest or stochastic"},
    )
    zo_paired: bool = field(
        default=False,
        metadata={"help": "lozo / lozo-m: both losses from one forward over the batch twice"},
    )
    zo_offload: bool = field(
        default=False, metadata={"help": "stream the blocks from host memory to the GPU"}
    )
    zo_offload_update: str = field(
        default="host", metadata={"help": "with zo_offload: update passes on the host or gpu"}
    )
    zo_prefetch: int = field(default=1, metadata={"help": "with zo_offload: blocks ahead"})


def _zo_settings(args: transformers.TrainingArguments) -> dict[str, Any]:
    return {
        "method": getattr(args, "zo_method", "lozo"),
        "eps": getattr(args, "zo_eps", 1e-3),
        "rank": getattr(args, "zo_rank", 2),
        "nu": getattr(args, "zo_nu", 50),
        "momentum": getattr(args, "zo_momentum", None),
        "seed": getattr(args, "zo_seed", None),
        "mode": getattr(args, "zo_mode", "auto"),
        "rounding": getattr(args, "zo_rounding", "auto"),
        "directions": getattr(args, "zo_directions", 1),
        "paired": getattr(args, "zo_paired", False),
    }


def build_optimizer(model: torch.nn.Module, args: transformers.TrainingArguments):
    """The zofast optimizer that ``args`` describe, over the model's trainable parameters.

    Args:
        model: the model (parameters with ``requires_grad=True`` are trained).
        args: ``ZOTrainingArguments`` (or plain ``TrainingArguments``: LOZO defaults).

    Returns:
        A :class:`zofast.optim.LOZO` or :class:`zofast.optim.MeZO`.

    Example:
        >>> opt = build_optimizer(model, ZOTrainingArguments("out", learning_rate=1e-6))
    """
    s = _zo_settings(args)
    if s["method"] not in ZO_METHODS:
        raise ValueError(f"zo_method must be one of {ZO_METHODS}, got {s['method']!r}")
    seed = args.seed if s["seed"] is None else s["seed"]
    groups = param_groups(model, args.weight_decay)
    common = {
        "lr": args.learning_rate,
        "eps": s["eps"],
        "seed": seed,
        "mode": s["mode"],
        "rounding": s["rounding"],
        "directions": s["directions"],
        "model": model,
    }
    if s["method"] == "mezo":
        if s["momentum"]:
            raise ValueError("zo_momentum applies to lozo-m only")
        return MeZO(groups, paired=s["paired"], **common)
    if s["method"] == "lozo":
        if s["momentum"]:
            raise ValueError("zo_momentum applies to lozo-m only (zo_method='lozo-m')")
        momentum = 0.0
    else:
        momentum = 0.9 if s["momentum"] is None else s["momentum"]
    return LOZO(groups, rank=s["rank"], nu=s["nu"], momentum=momentum, paired=s["paired"], **common)


def _streamed(model, args, optimizer):
    """``zo_offload``: the model's blocks streamed to ``args.device`` (None without it)."""
    if args is None or not getattr(args, "zo_offload", False):
        return None
    from zofast.offload import stream
    from zofast.train.streaming import STREAM_TO

    if args.device.type not in STREAM_TO:
        raise ValueError(f"zo_offload streams the blocks to a GPU; args.device is {args.device}")
    if getattr(model, "hf_device_map", None) is not None:
        raise ValueError("zo_offload places the model itself: load it without a device_map")
    if args.world_size > 1 or args.n_gpu > 1:  # (n_gpu > 1: Trainer would replicate the model)
        raise ValueError(
            "zo_offload runs in one process on one GPU (not under torchrun; CUDA_VISIBLE_DEVICES "
            "naming one GPU)"
        )
    if optimizer is not None:
        raise ValueError(
            "with zo_offload the optimizer is built after the blocks are streamed: leave "
            "optimizers out (or call zofast.offload.stream before making it, without zo_offload)"
        )
    streamed = stream(model, args.device, prefetch=args.zo_prefetch, update=args.zo_offload_update)
    # transformers' and accelerate's sign of a placed model: neither moves it to args.device
    model.hf_device_map = {name: str(streamed.device) for name, _ in streamed.blocks}
    return streamed


def _delegated(name: str) -> property:
    """An attribute read from / written to the wrapped optimizer once one is attached."""

    def get(self):
        zo = self.__dict__.get("_zo")
        return getattr(zo, name) if zo is not None else self.__dict__[f"_own_{name}"]

    def set_(self, value):
        zo = self.__dict__.get("_zo")
        if zo is not None:
            setattr(zo, name, value)
        else:
            self.__dict__[f"_own_{name}"] = value

    return property(get, set_)


class TrainerOptimizer(torch.optim.Optimizer):
    """What ``Trainer`` holds: a view of a zofast optimizer whose plain ``step()`` does nothing.

    ``param_groups``, ``state`` and ``defaults`` are those of the zofast optimizer (an LR
    scheduler built on this object sets the learning rate the zofast optimizer uses);
    ``state_dict``/``load_state_dict`` are its own. ``step(closure)`` with a closure runs a
    zeroth-order step; ``step()`` without one returns None, because ``ZOTrainer.training_step``
    has already stepped. ``zero_grad`` does nothing (there are no gradients).

    Args:
        zo_optimizer: a :class:`zofast.optim.LOZO` or :class:`zofast.optim.MeZO`.

    Example:
        >>> view = TrainerOptimizer(LOZO(model, lr=1e-6))
        >>> view.param_groups is view.zo_optimizer.param_groups
        True
    """

    param_groups = _delegated("param_groups")
    state = _delegated("state")
    defaults = _delegated("defaults")

    def __init__(self, zo_optimizer):
        if not isinstance(zo_optimizer, (LOZO, MeZO)):
            raise TypeError(
                f"expected a zofast LOZO or MeZO optimizer, got {type(zo_optimizer).__name__}"
            )
        self.__dict__["_zo"] = None
        super().__init__([torch.zeros(1, requires_grad=True)], {"lr": 0.0})
        self.__dict__["_zo"] = zo_optimizer
        for name in ("param_groups", "state", "defaults"):
            self.__dict__.pop(f"_own_{name}", None)

    @property
    def zo_optimizer(self):
        """The wrapped zofast optimizer."""
        return self.__dict__["_zo"]

    def step(self, closure=None):
        """Run a zeroth-order step if given a closure; without one, do nothing (see the class)."""
        if closure is None:
            return None
        return self.zo_optimizer.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to do: zeroth-order steps allocate no gradients."""

    def state_dict(self) -> dict:
        """The zofast optimizer's state dict (trajectory included)."""
        return self.zo_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict into the zofast optimizer."""
        self.zo_optimizer.load_state_dict(state_dict)

    def __repr__(self) -> str:
        return f"TrainerOptimizer({type(self.zo_optimizer).__name__})"


def _atomic(path: Path, write) -> None:
    """``write(tmp)``, fsync, rename onto ``path``: a reader sees the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


class ZOTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` that fine-tunes with a zofast zeroth-order optimizer.

    Takes exactly Trainer's arguments. The optimizer comes from ``optimizers=(opt, None)`` when
    ``opt`` is a zofast LOZO/MeZO, else from ``args`` (see :func:`build_optimizer`). The LR
    scheduler of ``args`` applies (the trajectory records every step's learning rate).

    Args:
        *args: positional arguments of ``transformers.Trainer``.
        **kwargs: keyword arguments of ``transformers.Trainer``.

    Example:
        >>> trainer = ZOTrainer(model=model, args=ZOTrainingArguments("out", max_steps=100),
        ...                     train_dataset=ds)
        >>> trainer.train()
        >>> trainer.trajectory.steps
        100
    """

    def __init__(self, *args, **kwargs):
        model = kwargs.get("model", args[0] if args else None)
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        optimizer = kwargs.get("optimizers", (None, None))[0]
        if getattr(training_args, "gradient_accumulation_steps", 1) != 1:
            raise ValueError(
                "ZOTrainer takes one zeroth-order step per batch: set "
                "gradient_accumulation_steps=1 (use a larger per_device_train_batch_size instead)"
            )
        #: zo_offload's :class:`zofast.offload.Streamed` handle (None without it).
        self.streamed = _streamed(model, training_args, optimizer)  # before Trainer places it
        super().__init__(*args, **kwargs)
        if self.optimizer is not None and not isinstance(self.optimizer, (LOZO, MeZO)):
            raise TypeError(
                "ZOTrainer needs a zofast LOZO or MeZO optimizer in optimizers=(opt, None), got "
                f"{type(self.optimizer).__name__}"
            )
        self.args.max_grad_norm = 0.0
        self.zo_optimizer = self.optimizer
        self.diverged: str | None = None

    def create_optimizer(self, model=None):
        """Build (or wrap) the zofast optimizer; Trainer gets a :class:`TrainerOptimizer`.

        Args:
            model: the model whose parameters are trained (default: ``self.model``).

        Returns:
            The :class:`TrainerOptimizer` stored in ``self.optimizer``.
        """
        if isinstance(self.optimizer, TrainerOptimizer):
            return self.optimizer
        if self.optimizer is None:
            self.zo_optimizer = build_optimizer(self.model if model is None else model, self.args)
        else:
            self.zo_optimizer = self.optimizer
        if self.zo_optimizer.paired:
            self._check_paired()
        self.optimizer = TrainerOptimizer(self.zo_optimizer)
        return self.optimizer

    def _settle(self) -> None:
        """Make the stored weights the iterate before they are read or written out: the zofast
        optimizer's settle() (a pipelined perturbation, virtual mode's pending factors, the
        steps that ``accumulate`` has not written yet; recorded in the trajectory)."""
        if self.zo_optimizer is not None:
            self.zo_optimizer.settle()

    def evaluate(self, *args, **kwargs):
        """Trainer's evaluate on the settled weights."""
        self._settle()
        return super().evaluate(*args, **kwargs)

    def save_model(self, *args, **kwargs):
        """Trainer's save_model (checkpoints too) of the settled weights."""
        self._settle()
        return super().save_model(*args, **kwargs)

    def _check_paired(self) -> None:
        """ValueError where a paired step would not compute the loss Trainer computes."""
        if (
            type(self).compute_loss is not transformers.Trainer.compute_loss
            or self.compute_loss_func is not None
        ):
            raise ValueError(
                "a paired step computes each copy's loss with zofast.paired.losses, not with a "
                "custom compute_loss: drop zo_paired (or override training_step)"
            )
        if self.args.label_smoothing_factor:
            raise ValueError("a paired step has no label smoothing: drop zo_paired or it")

    @property
    def trajectory(self):
        """The zofast trajectory of the run so far (None before the optimizer exists)."""
        return None if self.zo_optimizer is None else self.zo_optimizer.trajectory

    def save_trajectory(self, path) -> None:
        """Write the trajectory as JSON; ``zofast replay`` rebuilds the weights from it.

        Args:
            path: file path.
        """
        if self.trajectory is None:
            raise ValueError("no trajectory yet: train first")
        self.trajectory.save(path)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """The zofast optimizer's and the scheduler's states, pickle-free (module docstring)."""
        if self.zo_optimizer is None or not self.args.should_save:
            return super()._save_optimizer_and_scheduler(output_dir)
        from safetensors.torch import save_file

        from zofast.train.checkpoint import encode

        out = Path(output_dir)
        tensors: dict[str, torch.Tensor] = {}
        scheduler = None if self.lr_scheduler is None else self.lr_scheduler.state_dict()
        document = {
            "optimizer": encode(self.zo_optimizer.state_dict(), tensors, "optimizer"),
            "scheduler": encode(scheduler, tensors, "scheduler"),
        }
        text = json.dumps(document, allow_nan=False, separators=(",", ":"))
        _atomic(out / f"{ZO_STATE}.safetensors", lambda tmp: save_file(tensors, str(tmp)))
        _atomic(out / f"{ZO_STATE}.json", lambda tmp: tmp.write_text(text, encoding="utf-8"))
        _atomic(out / "trajectory.json", self.zo_optimizer.trajectory.save)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """Load what :meth:`_save_optimizer_and_scheduler` wrote (or Trainer's own files)."""
        if checkpoint is None or not (Path(checkpoint) / f"{ZO_STATE}.json").is_file():
            return super()._load_optimizer_and_scheduler(checkpoint)
        from safetensors.torch import load_file

        from zofast.train.checkpoint import decode

        folder = Path(checkpoint)
        document = json.loads((folder / f"{ZO_STATE}.json").read_text(encoding="utf-8"))
        tensors = load_file(str(folder / f"{ZO_STATE}.safetensors"))
        if self.zo_optimizer is None:
            self.create_optimizer()
        self.zo_optimizer.load_state_dict(decode(document["optimizer"], tensors))
        scheduler = decode(document["scheduler"], tensors)
        if scheduler is not None and self.lr_scheduler is not None:
            self.lr_scheduler.load_state_dict(scheduler)

    def training_step(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """One zeroth-order step on a batch: two loss evaluations, no gradients.

        Args:
            model: the (possibly wrapped) model.
            inputs: the batch, as Trainer gives it.
            num_items_in_batch: passed on to ``compute_loss``.

        Returns:
            (L+ + L−)/2, detached, on ``args.device``.
        """
        if self.zo_optimizer is None:
            self.create_optimizer()
        model.eval()
        inputs = self._prepare_inputs(inputs)

        def closure():
            with torch.no_grad(), self.compute_loss_context_manager():
                if paired:  # one forward over the batch twice: (L+, L−), as compute_loss
                    items = num_items_in_batch if self.model_accepts_loss_kwargs else None
                    return losses(model, inputs, num_items_in_batch=items)
                loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
            return loss.mean() if loss.numel() > 1 else loss

        paired = self.zo_optimizer.paired

        try:
            loss = self.zo_optimizer.step(closure)
        except FloatingPointError as error:
            # The optimizer restored the weights and recorded the step as an abort: stop here,
            # as zofast train does, instead of losing the run to a traceback.
            self.diverged = f"step {self.state.global_step + 1}: {error}"
            transformers.logging.get_logger(__name__).warning(
                f"ZOTrainer diverged at {self.diverged}; training stops (the weights are those "
                "before that step, the trajectory so far is kept)"
            )
            self.control.should_training_stop = True
            return torch.tensor(float("nan"), device=self.args.device)
        return torch.tensor(loss, dtype=torch.float32, device=self.args.device)
