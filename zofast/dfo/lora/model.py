"""DFO-LoRA on a model: find the attention projections, attach the hooks, set search vectors.

:class:`DFOLoRA` puts the pieces together: its options are a
:class:`~zofast.dfo.lora.config.DFOLoRAConfig`, the factors come from
:class:`~zofast.dfo.lora.layer.Projections`, the hooks are :class:`~zofast.dfo.arch.LowRankHooks`
on the targets :func:`~zofast.dfo.arch.find_architecture` finds, the search is its base
:class:`~zofast.dfo.lora.search.LayerSearch`, and checkpoints and PEFT export are in
:mod:`~zofast.dfo.lora.checkpoint` and :mod:`~zofast.dfo.lora.export`. The method itself is
described in :mod:`zofast.dfo.lora`.

Example:
    >>> dfo = DFOLoRA(load_model(default_model_path()), seed=1)
    >>> dfo.fit(train, dev, budget=2000, task="sst-2").best_dev_acc
    0.8125
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from zofast.dfo.arch import Architecture, LowRankHooks, find_architecture
from zofast.dfo.lora import checkpoint, export
from zofast.dfo.lora.config import DEFAULT_ALPHA, DFOLoRAConfig
from zofast.dfo.lora.layer import Projections
from zofast.dfo.lora.search import LayerSearch
from zofast.models import LoadedModel
from zofast.rng import RunSeeds

__all__ = ["DFOLoRA"]


class DFOLoRA(LayerSearch):
    """Derivative-free low-rank adaptation of the attention projections of a transformer.

    The keyword arguments after ``model`` are the fields of
    :class:`~zofast.dfo.lora.config.DFOLoRAConfig` (documented there, with their defaults'
    reasons); pass ``config=`` instead to give them as one object. Each is also an attribute of
    the instance (``dfo.rank``, ``dfo.popsize``, ...); ``dfo.config`` keeps the checked options
    as given, and a checkpoint records the attributes (the runtime ones may be changed between
    fits, e.g. ``dfo.max_candidates``).

    Args:
        model: a :class:`~zofast.models.LoadedModel` or a transformers model (then pass a
            ``scorer`` to :meth:`fit`). The hooks go on its modules; its weights never change.
        rank: ``r`` of every ``A`` (``D_in × r``) and ``B`` (``r × D_out``).
        intrinsic_dim: ``d``, numbers searched per layer (at least ``2·len(targets)``).
        targets: projections that get updates, a subset of ``("query", "key", "value")``.
        popsize: candidates per generation (>= 2).
        sigma: initial step size of the optimizers.
        optimizers: ``("cma", "fwa")`` alternates by round; ``("cma",)`` or ``("fwa",)`` alone.
        init: ``"hidden"`` or ``"random"`` projection scales (:mod:`zofast.dfo.lora`).
        seed: run seed (uint64) of projections and optimizers.
        alpha: ``alpha`` of the projection scale.
        cma_diagonal: pycma's ``CMA_diagonal`` (separable CMA-ES when True).
        cma_options: more pycma options (override the defaults set here; JSON values, so that
            :meth:`save` can record them).
        fwa_options: more :class:`~zofast.dfo.fireworks.Fireworks` options (not ``seed`` or
            ``popsize``).
        mode: evaluation mode of :class:`~zofast.dfo.population.PopulationEvaluator`.
        max_candidates: candidates per batched forward (None: the whole generation).
        cache_projections: keep every layer's projections (True), only the searched layer's
            (False), or decide by ``PROJECTION_CACHE_BYTES`` (None).
        length_buckets: split the training set into this many batches of similar length
            (less padding; helps on CPU, one batch is best on a GPU).
        config: all of the above as a :class:`~zofast.dfo.lora.config.DFOLoRAConfig` (then
            pass no other option).

    Raises:
        ValueError: on an invalid argument, a model without recognised attention layers, or a
            model that already carries DFO-LoRA hooks (call ``remove()`` on the first
            DFOLoRA before attaching another); the model is then left untouched (no hooks
            attached).

    Example:
        >>> dfo = DFOLoRA(load_model(default_model_path()), popsize=10, seed=3)
        >>> res = dfo.fit(train, dev, budget=1000, task="sst-2", progress=False)
        >>> res.train_loss <= res.history[0]["loss"]
        True
    """

    def __init__(
        self,
        model: LoadedModel | nn.Module,
        rank: int = 4,
        intrinsic_dim: int = 500,
        targets: Sequence[str] = ("query", "key"),
        popsize: int = 20,
        sigma: float = 1.0,
        optimizers: Sequence[str] = ("cma", "fwa"),
        init: str = "hidden",
        seed: int = 0,
        *,
        alpha: float = DEFAULT_ALPHA,
        cma_diagonal: bool = True,
        cma_options: Mapping[str, Any] | None = None,
        fwa_options: Mapping[str, Any] | None = None,
        mode: str = "auto",
        max_candidates: int | None = None,
        cache_projections: bool | None = None,
        length_buckets: int = 1,
        config: DFOLoRAConfig | None = None,
    ):
        options = dict(
            rank=rank,
            intrinsic_dim=intrinsic_dim,
            targets=targets,
            popsize=popsize,
            sigma=sigma,
            optimizers=optimizers,
            init=init,
            seed=seed,
            alpha=alpha,
            cma_diagonal=cma_diagonal,
            cma_options=cma_options,
            fwa_options=fwa_options,
            mode=mode,
            max_candidates=max_candidates,
            cache_projections=cache_projections,
            length_buckets=length_buckets,
        )
        if config is None:
            config = DFOLoRAConfig(**options)
        elif not isinstance(config, DFOLoRAConfig):
            raise ValueError(f"config must be a DFOLoRAConfig, got {type(config).__name__}")
        elif options != {f.name: f.default for f in fields(DFOLoRAConfig)}:
            raise ValueError("pass the options either in config= or as keywords, not both")
        self.config = config
        for f in fields(config):
            if f.name != "cache_projections":  # a property: the Projections' own setting
                setattr(self, f.name, getattr(config, f.name))

        if isinstance(model, LoadedModel):
            self.loaded: LoadedModel | None = model
            self.model = model.model
        elif isinstance(model, nn.Module):
            self.loaded = None
            self.model = model
        else:
            raise ValueError(
                f"model must be a LoadedModel or a torch.nn.Module, got {type(model).__name__}"
            )
        self.arch: Architecture = find_architecture(self.model)
        param = next((p for p in self.model.parameters() if p.is_floating_point()), None)
        if param is None:
            raise ValueError("the model has no floating-point parameters")
        self.device = param.device
        self.dtype = param.dtype

        self.num_layers = self.arch.num_layers
        self.projections = Projections(
            self.arch,
            self.targets,
            self.rank,
            self.intrinsic_dim,
            self.seed,
            self.alpha,
            self.sigma,
            self.device,
            config.cache_projections,
        )
        self.chunk_sizes = self.projections.chunk_sizes
        self._seeds = RunSeeds(self.seed)
        self.layer_stds: np.ndarray | None = (
            np.ones(self.num_layers) if self.init == "random" else None
        )
        self._init_search()
        self.hooks = LowRankHooks(self.model, self.arch, self.targets)

    @property
    def cache_projections(self) -> bool | None:
        """Keep every layer's projections (True), the searched layer's (False), or decide (None)."""
        return self.projections.cache

    @cache_projections.setter
    def cache_projections(self, value: bool | None) -> None:
        self.projections.cache = value

    def projection(self, layer: int, chunk: int) -> torch.Tensor:
        """The unscaled random projection ``M_{layer,chunk}`` (float32, model's device).

        Regenerated from ``RunSeeds(seed).seed(layer, chunk, "search")`` unless cached
        (:mod:`zofast.dfo.lora`).

        Args:
            layer: layer index.
            chunk: chunk index (``A_Q, B_Q, A_K, B_K, ...``).

        Returns:
            ``(n_c, d_c)`` float32 tensor of standard normals.

        Example:
            >>> dfo.projection(0, 0).shape  # D = 384, r = 4, d = 500
            torch.Size([1536, 125])
        """
        return self.projections.projection(layer, chunk)

    def _layer_std(self, layer: int) -> float:
        if self.layer_stds is None:
            raise RuntimeError(
                "init='hidden' projections are scaled from the training data: call fit() first "
                "(or use init='random')"
            )
        return float(self.layer_stds[layer])

    def factors(
        self, layer: int, z: np.ndarray, dtype: torch.dtype | None = None
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``A`` and ``B`` of every target for a batch of search vectors of one layer.

        Args:
            layer: layer index.
            z: ``(P, intrinsic_dim)`` search vectors.
            dtype: dtype of the result (default: the model's).

        Returns:
            ``{name: (A, B)}`` with ``A`` ``(P, D_in, r)`` and ``B`` ``(P, r, D_out)`` on the
            model's device.

        Example:
            >>> A, B = dfo.factors(0, np.zeros((2, 500)))["query"]
            >>> A.shape, B.shape
            (torch.Size([2, 384, 4]), torch.Size([2, 4, 384]))
        """
        z = np.asarray(z, dtype=np.float64)
        if z.ndim != 2 or z.shape[1] != self.intrinsic_dim:
            raise ValueError(f"z must have shape (P, {self.intrinsic_dim}), got {z.shape}")
        return self.projections.factors(layer, z, self._layer_std(layer), dtype or self.dtype)

    def _apply_layer(self, layer: int, z: np.ndarray) -> None:
        z = np.asarray(z, dtype=np.float64)
        if not np.any(z):
            self.hooks.set_layer(layer, None)
        else:
            mats = self.factors(layer, z[None])
            self.hooks.set_layer(layer, {k: (a[0], b[0]) for k, (a, b) in mats.items()})
        self._applied[layer] = z

    def _apply_all(self, zs: np.ndarray) -> None:
        for layer in range(self.num_layers):
            if not np.array_equal(self._applied[layer], zs[layer]) or (
                np.any(zs[layer]) and self.hooks.get_layer(layer) is None
            ):
                self._apply_layer(layer, zs[layer])

    def set_z(self, z: np.ndarray) -> None:
        """Set every layer's search vector: applied to the model and taken as the incumbents.

        The current training loss is forgotten (it is measured again when a fit starts).

        Args:
            z: ``(num_layers, intrinsic_dim)`` array.

        Example:
            >>> dfo.set_z(np.zeros((dfo.num_layers, dfo.intrinsic_dim)))  # the original model
        """
        z = np.array(z, dtype=np.float64)
        if z.shape != self._z.shape:
            raise ValueError(f"z must have shape {self._z.shape}, got {z.shape}")
        if not np.isfinite(z).all():
            raise ValueError("z must be finite")
        with torch.no_grad():
            for layer in range(self.num_layers):
                self._apply_layer(layer, z[layer])
        self._z = z.copy()
        self._f_cur = None
        self._synced[:] = False

    def remove(self) -> None:
        """Detach the modules: the model computes exactly what it did before construction.

        Example:
            >>> dfo.remove()
        """
        self.hooks.remove()
        self.evaluator = None

    def export_peft(self, path: str | Path, base_model_name_or_path: str | None = None) -> Path:
        """Write the applied modules as a PEFT LoRA adapter (``PeftModel`` loads it).

        :func:`zofast.dfo.lora.export.export_peft` says how each target becomes a LoRA module.

        Args:
            path: output folder (created).
            base_model_name_or_path: recorded in the config (default: the model's name).

        Returns:
            The folder.

        Example:
            >>> dfo.export_peft("runs/adapter")
            >>> peft_model = peft.PeftModel.from_pretrained(fresh_model, "runs/adapter")
        """
        return export.export_peft(self, path, base_model_name_or_path)

    def save(self, path: str | Path) -> Path:
        """Write the search state (:func:`~zofast.dfo.lora.checkpoint.save`): JSON + safetensors.

        Args:
            path: folder (created).

        Returns:
            The folder.

        Example:
            >>> dfo.save("runs/dfo-ckpt")
        """
        return checkpoint.save(self, path)

    @classmethod
    def load(cls, path: str | Path, model: LoadedModel | nn.Module, **runtime: Any) -> DFOLoRA:
        """Rebuild a search saved by :meth:`save` on ``model`` (same architecture).

        The applied vectors are applied (``init="hidden"`` scales come from the checkpoint);
        :meth:`fit` then continues the search where it stopped, optimizer states included
        (:func:`zofast.dfo.lora.checkpoint.load`).

        Args:
            path: the folder.
            model: the model (a fresh copy of the one searched).
            **runtime: overrides of ``mode``, ``max_candidates``, ``cache_projections``,
                ``length_buckets``.

        Returns:
            A :class:`DFOLoRA`.

        Raises:
            ValueError: if the checkpoint is not a DFO-LoRA checkpoint or does not match the
                model's architecture.

        Example:
            >>> dfo = DFOLoRA.load("runs/dfo-ckpt", load_model(default_model_path()))
            >>> dfo.fit(train, dev, budget=8000, task="sst-2")  # continues
        """
        return checkpoint.load(cls, path, model, **runtime)
