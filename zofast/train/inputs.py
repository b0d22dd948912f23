"""What a run reads before it trains: the task, the data splits (format sniffing), the model and
which of its parameters are trained. Every failure here is a :class:`ConfigError`, raised before
anything is written."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from zofast.data import Example, load_demo, load_kshot
from zofast.models import LoadedModel, load_model, resolve_device
from zofast.scoring import Scorer
from zofast.tasks import Task, get_task
from zofast.train.config import ConfigError, TrainConfig
from zofast.train.streaming import target


def resolve_task(config: TrainConfig) -> Task:
    """The task of a config: a built-in one, or a custom one from its template.

    Args:
        config: the run config.

    Returns:
        The :class:`~zofast.tasks.Task`.

    Raises:
        ConfigError: unknown task name or invalid template.

    Example:
        >>> resolve_task(TrainConfig(task="sst-2")).label_words
        ('terrible', 'great')
    """
    try:
        if config.template is not None:
            return Task.custom(config.template, list(config.label_words), name=config.task)
        return get_task(config.task)
    except (TypeError, ValueError) as error:
        raise ConfigError(str(error)) from None


def load_splits(data: str, task: Task, **columns: Any) -> dict[str, list[Example]]:
    """Read the train/dev/test splits of ``data`` for ``task``.

    Args:
        data: ``"demo"``, an LM-BFF k-shot folder of any task of the suite, or a folder of
            ``train``/``dev``/``test`` csv / tsv / jsonl / json / parquet files.
        task: the task (decides the k-shot layout and the number of labels).
        **columns: ``text_columns``, ``label_column``, ``header``, ``label_map`` of
            :func:`zofast.data.load_kshot` (:attr:`TrainConfig.columns`).

    Returns:
        ``{split: examples}``; ``train`` is always present, ``dev`` and ``test`` when found.

    Raises:
        ConfigError: missing folder, no train split, or unreadable files.

    Example:
        >>> splits = load_splits("demo", get_task("demo"))
        >>> len(splits["train"])
        64
    """
    if data == "demo":
        return load_demo()
    root = Path(data)
    if not root.is_dir():
        raise ConfigError(f"data folder not found: {data}")
    try:
        splits = load_kshot(root, task, **columns)
    except (FileNotFoundError, ValueError, TypeError, ImportError) as error:
        raise ConfigError(f"cannot read data from {data}: {error}") from None
    if not splits.get("train"):
        raise ConfigError(f"no training examples in {data} (need a train file)")
    return splits


def trainable_parameters(
    model: torch.nn.Module, freeze: str | None
) -> list[tuple[str, torch.Tensor]]:
    """Set ``requires_grad`` from a freeze regex and return the trained (name, tensor) pairs.

    Args:
        model: the module.
        freeze: regex; matching parameter names (``re.search``) are frozen; None = none.

    Returns:
        The trained parameters, in ``named_parameters`` order.

    Raises:
        ConfigError: nothing left to train.

    Example:
        >>> names = [n for n, _ in trainable_parameters(model, r"word_embeddings")]
    """
    pattern = re.compile(freeze) if freeze else None
    trained = []
    for name, p in model.named_parameters():
        train_it = p.is_floating_point() and not (pattern and pattern.search(name))
        p.requires_grad_(train_it)
        if train_it:
            trained.append((name, p))
    if not trained:
        detail = f" (freeze={freeze!r} matches every parameter)" if freeze else ""
        raise ConfigError(f"the model has no trainable parameters{detail}")
    return trained


def setup(
    config: TrainConfig, loaded: LoadedModel | None
) -> tuple[LoadedModel, Scorer, dict[str, list[Example]], Task]:
    """Load the task, data and model; every failure here is a ConfigError (nothing written).
    With offload the model stays on the host (:func:`zofast.train.streaming.streaming` places
    it)."""
    if config.offload:
        target(config)  # no GPU: refused before anything is loaded
    task = resolve_task(config)
    splits = load_splits(config.data, task, **config.columns)
    if loaded is None:
        try:
            where = {"device": resolve_device(config.device)}
            if config.device_map is not None:
                where = {"device_map": config.device_map}
            if config.offload:
                where = {}
            loaded = load_model(config.model, dtype=config.dtype, **where)
        except (OSError, ValueError, ImportError) as error:
            name = config.model or "(default)"
            raise ConfigError(f"cannot load model {name}: {error}") from None
    if config.method != "dfo-lora":
        trainable_parameters(loaded.model, config.freeze)
    try:
        scorer = Scorer(loaded, task, max_length=config.max_length)
    except (ValueError, NotImplementedError) as error:
        raise ConfigError(f"model and task do not fit together: {error}") from None
    if config.compile:
        scorer.compile()
    return loaded, scorer, splits, task
