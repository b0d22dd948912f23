"""The optimizers: LOZO (with momentum: LOZO-M) and MeZO, each its hyperparameters on the shared
step protocol (zofast.optim.base), and param_groups."""

from __future__ import annotations

import numbers

import torch

from zofast.optim.base import ZerothOrder
from zofast.optim.checks import count, non_negative, perturbation_scale, positive, real


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Parameter groups with weight decay on matrices only (biases and norm weights exempt).

    Trainable tensors with ndim ≥ 2 go in a group with `weight_decay`, the 1-D ones (biases,
    LayerNorm / RMSNorm weights) and scalars in a group with weight_decay 0. Parameters are given
    with their names, so the optimizer's trajectory records names and :func:`zofast.replay` can
    match a module by name. Empty groups are left out.

    Args:
        model: the module.
        weight_decay: decay of the matrices (≥ 0).

    Returns:
        A list of param-group dicts for LOZO / MeZO (or any torch optimizer).

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
        >>> [len(g["params"]) for g in param_groups(model, 0.01)]  # Linear.weight | bias, LN w, b
        [1, 3]
        >>> opt = LOZO(param_groups(model, 0.01), lr=1e-3)
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    weight_decay = non_negative(weight_decay, "weight_decay")
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append((name, p))
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


class LOZO(ZerothOrder):
    """Low-rank zeroth-order SGD (LOZO, arXiv 2410.07698), with momentum LOZO-M.

    Matrices (ndim ≥ 2) are perturbed by ε·U·Vᵀ, U redrawn every step and V every `nu` steps;
    vectors by full-rank ε·z. See the module docstring for the step, momentum, weight decay,
    pipelining and failure handling.

    Args:
        params: an nn.Module, an iterable of tensors or (name, tensor) pairs, or param groups
            (groups may set "lr" and "weight_decay"; see :func:`param_groups`).
        lr: learning rate (> 0; schedulers may later set any value ≥ 0).
        eps: perturbation scale ε (> 0).
        rank: r of U·Vᵀ (≥ 1; clamped to min(m, n) per tensor).
        nu: steps between V redraws (≥ 1).
        momentum: β in [0, 1); > 0 gives LOZO-M.
        weight_decay: default decay (≥ 0) for groups that do not set one.
        seed: run seed, an integer in 0..2**64-1.
        mode: "auto" (default: for bf16 / fp16 weights "virtual" with the other tensors in
            shadow mode, or "shadow" where a group has weight decay; "inplace" for float32),
            "inplace" (the weights carry the perturbations), "shadow" (exact: the forwards see
            perturbed temporaries, the stored weights are written by updates only; see
            zofast.optim.shadow) or "virtual" (the model's layers apply the perturbations and
            the pending updates; see zofast.optim.virtual).
        rounding: "auto" (default: "stochastic" for bf16 / fp16 weights), "nearest" or
            "stochastic": how the passes that write an update round to the weights' dtype
            (stochastic: seeded, reproducible, unbiased).
        pipeline: fuse the next step's perturbation into the update (call settle() before
            evaluating or saving).
        model: shadow and virtual modes: the module whose forward the closure runs (default:
            `params` when it is a module). Ignored in place.
        virtual_indices: set by :func:`zofast.replay` from the trajectory (the flat indices
            of the tensors a run kept virtual); an optimizer built with it and no model can
            only replay. With a model it must match what the model gives.
        virtual_rest: mode="virtual": how the tensors that do not go through layers are
            perturbed: "shadow" (exact; the default for bf16 / fp16 weights) or "inplace" (the
            default for float32). Set by :func:`zofast.replay` from the trajectory.
        process_group: a ``torch.distributed`` process group for data parallelism (None: one
            process): every rank steps on its own shard of the batch with the same seeds, one
            all-reduce of the losses per step (``step(closure, examples=n)`` weights them);
            see zofast.optim.group.
        directions: q ≥ 1, the perturbations per step (2q forwards); the update is the average
            of their q estimates, applied in one pass. The q directions of a step share its V
            and differ in U. See zofast.optim.directions.
        split: with process_group, what the ranks share out: "batch" (default: each rank
            evaluates every direction on its shard of the batch) or "directions" (each rank
            evaluates its directions, k % world_size == rank, on the whole batch; needs an
            exact mode and directions ≥ world size).
        accumulate: steps whose updates of shadow-mode tensors are written together, in one
            pass and one rounding (the forwards in between see the last written weights; see
            zofast.optim.shadow): "auto" (default: 64 for bf16 / fp16 without momentum, where a
            rounding per step would add far more noise than the update, else 1) or an integer
            ≥ 1. settle() writes what is left.
        paired: evaluate L+ and L− in ONE forward over the batch stacked twice, the first copy
            at +ε and the second at −ε (needs the model and an exact mode; the closure returns
            (L+, L−)); see zofast.optim.paired.

    Example:
        >>> model = torch.nn.Linear(16, 4)
        >>> opt = LOZO(param_groups(model, 0.0), lr=1e-3, rank=2, nu=50, seed=7)
        >>> x, y = torch.randn(32, 16), torch.randn(32, 4)
        >>> loss = opt.step(lambda: torch.nn.functional.mse_loss(model(x), y))
        >>> net = torch.nn.Linear(16, 4)
        >>> opt = LOZO(net, lr=1e-3, mode="virtual")  # net.weight goes through the layer
        >>> opt.virtual_names
        ['weight']
        >>> loss = opt.step(lambda: torch.nn.functional.mse_loss(net(x), y))
        >>> opt.settle()  # before saving net.state_dict(): W += A·Vᵀ
        >>> opt.detach()
        >>> opt = LOZO(net, lr=1e-3, paired=True)  # both losses from one forward
        >>> out = lambda: net(torch.cat([x, x]))  # the batch stacked twice: +ε, then −ε
        >>> loss = opt.step(lambda: (out() - y.repeat(2, 1)).pow(2).view(2, -1).mean(1))
    """

    method = "LOZO"

    def __init__(
        self,
        params,
        lr: float,
        eps: float = 1e-3,
        rank: int = 2,
        nu: int = 50,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        seed: int = 0,
        mode: str = "auto",
        rounding: str = "auto",
        pipeline: bool = False,
        model: torch.nn.Module | None = None,
        virtual_indices: list[int] | None = None,
        virtual_rest: str | None = None,
        process_group=None,
        directions: int = 1,
        split: str = "batch",
        accumulate="auto",
        paired: bool = False,
    ):
        momentum = real(momentum, "momentum")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        defaults = {
            "lr": positive(lr, "lr"),
            "weight_decay": non_negative(weight_decay, "weight_decay"),
            "eps": perturbation_scale(eps, count(rank, "rank")),
            "rank": count(rank, "rank"),
            "nu": count(nu, "nu"),
            "momentum": momentum,
        }
        if virtual_indices is not None:
            items = virtual_indices if isinstance(virtual_indices, (list, tuple)) else [None]
            if not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in items):
                raise ValueError(
                    f"virtual_indices must be a list of integers, got {virtual_indices!r}"
                )
        super().__init__(
            params,
            defaults,
            seed=seed,
            mode=mode,
            rounding=rounding,
            pipeline=pipeline,
            lowrank=True,
            model=model,
            virtual_indices=None if virtual_indices is None else [int(i) for i in virtual_indices],
            virtual_rest=virtual_rest,
            process_group=process_group,
            directions=directions,
            split=split,
            accumulate=accumulate,
            paired=paired,
        )

    def _hyperparameters(self) -> dict:
        lozo = {"rank": self._rank, "nu": self._nu, "momentum": self._beta}
        return {**super()._hyperparameters(), **lozo}


class MeZO(ZerothOrder):
    """Memory-efficient zeroth-order SGD (MeZO, arXiv 2305.17333): full-rank Gaussian noise.

    Args:
        params: an nn.Module, an iterable of tensors or (name, tensor) pairs, or param groups.
        lr: learning rate (> 0; schedulers may later set any value ≥ 0).
        eps: perturbation scale ε (> 0).
        weight_decay: default decay (≥ 0) for groups that do not set one.
        seed: run seed, an integer in 0..2**64-1.
        mode: "auto" (default: "shadow" for bf16 / fp16 weights, "inplace" for float32),
            "inplace" or "shadow" (see LOZO; MeZO's full-rank noise has no "virtual" mode).
        rounding: "auto", "nearest" or "stochastic" (see LOZO).
        pipeline: fuse the next step's perturbation into the update (in place only; call
            settle() before evaluating or saving).
        model: shadow mode: the module whose forward the closure runs (default: `params` when
            it is a module).
        process_group: data parallelism over a ``torch.distributed`` group (see LOZO).
        directions: q ≥ 1 perturbations per step, their estimates averaged (see LOZO).
        split: with process_group, "batch" or "directions" (see LOZO).
        accumulate: steps whose updates are written together in shadow mode (see LOZO;
            "auto": 64 for bf16 / fp16 weights, 1 for float32).
        paired: must be False: paired steps need LOZO's low-rank noise (ValueError otherwise;
            see zofast.optim.paired).

    Example:
        >>> model = torch.nn.Linear(16, 4)
        >>> opt = MeZO(model, lr=1e-3, seed=1)
        >>> x = torch.randn(32, 16)
        >>> loss = opt.step(lambda: model(x).pow(2).mean())
    """

    method = "MeZO"

    def __init__(
        self,
        params,
        lr: float,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        seed: int = 0,
        mode: str = "auto",
        rounding: str = "auto",
        pipeline: bool = False,
        model: torch.nn.Module | None = None,
        process_group=None,
        directions: int = 1,
        split: str = "batch",
        accumulate="auto",
        paired: bool = False,
    ):
        defaults = {
            "lr": positive(lr, "lr"),
            "weight_decay": non_negative(weight_decay, "weight_decay"),
            "eps": perturbation_scale(eps),
        }
        super().__init__(
            params,
            defaults,
            seed=seed,
            mode=mode,
            rounding=rounding,
            pipeline=pipeline,
            lowrank=False,
            model=model,
            process_group=process_group,
            directions=directions,
            split=split,
            accumulate=accumulate,
            paired=paired,
        )


METHODS = {"LOZO": LOZO, "MeZO": MeZO}
