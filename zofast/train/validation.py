"""The checks of :meth:`TrainConfig.validate <zofast.train.config.TrainConfig.validate>`: every
field that can be checked without loading anything, in a fixed order (the first bad one raises)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from zofast.optim.checks import is_int, is_real
from zofast.optim.directions import SPLITS
from zofast.optim.modes import MODES, ROUNDINGS
from zofast.tasks import get_task
from zofast.train.config import DTYPES, METHODS, OFFLOAD_UPDATES, ZO_METHODS, ConfigError

if TYPE_CHECKING:
    from zofast.train.config import TrainConfig


def check(config: TrainConfig) -> None:
    """Raise :class:`ConfigError` for the first bad field of ``config`` (in one line)."""
    if config.method not in METHODS:
        raise ConfigError(f"unknown method {config.method!r}; choose from {', '.join(METHODS)}")
    if config.lr is not None and not (is_real(config.lr) and config.lr > 0):
        raise ConfigError(f"lr must be > 0, got {config.lr!r}")
    if not (is_real(config.eps) and config.eps > 0):
        raise ConfigError(f"eps must be > 0, got {config.eps!r}")
    counts = ("rank", "nu", "directions", "popsize", "intrinsic_dim", "batch_size")
    counts = (*counts, "eval_every")
    for name in (*counts, "eval_batch_size", "log_every"):
        value = config.resolved_rank if name == "rank" else getattr(config, name)
        if not is_int(value) or value < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    every = config.checkpoint_every
    if not is_int(every) or every < 0:
        raise ConfigError(f"checkpoint_every must be an integer >= 0, got {every!r}")
    if not is_int(config.steps) or config.steps < 0:
        raise ConfigError(f"steps must be an integer >= 0, got {config.steps!r}")
    budget = config.forward_budget
    if budget is not None and (not is_int(budget) or budget < 0):
        raise ConfigError(f"forward_budget must be an integer >= 0, got {budget!r}")
    if config.momentum is not None:
        if not (is_real(config.momentum) and 0 <= config.momentum < 1):
            raise ConfigError(f"momentum must be in [0, 1), got {config.momentum!r}")
        if config.momentum > 0 and config.method != "lozo-m":
            raise ConfigError(f"momentum applies to lozo-m only (method is {config.method})")
        if config.momentum == 0 and config.method == "lozo-m":
            raise ConfigError("lozo-m with momentum 0 is plain LOZO: use method lozo")
    if config.split not in SPLITS:
        raise ConfigError(f"split must be one of {', '.join(SPLITS)}, got {config.split!r}")
    if config.mode not in MODES:
        raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {config.mode!r}")
    if config.rounding not in ROUNDINGS:
        raise ConfigError(
            f"rounding must be one of {', '.join(ROUNDINGS)}, got {config.rounding!r}"
        )
    if config.pipeline and config.resolved_mode != "inplace":
        raise ConfigError(f"pipeline is for mode 'inplace' (mode is {config.resolved_mode})")
    if config.mode == "virtual" and config.method not in ("lozo", "lozo-m"):
        raise ConfigError(f"mode 'virtual' is LOZO's (method is {config.method})")
    if config.paired is not None and not isinstance(config.paired, bool):
        raise ConfigError(f"paired must be true, false or None, got {config.paired!r}")
    if config.paired and config.method not in ("lozo", "lozo-m"):
        raise ConfigError(
            f"paired is for lozo / lozo-m (method is {config.method}): MeZO's full-rank noise "
            "has no per-row form, so it takes two forwards"
        )
    if config.paired and config.mode == "inplace":
        raise ConfigError("paired needs an exact mode (auto, virtual or shadow), not inplace")
    if config.mode == "virtual" and config.weight_decay:
        raise ConfigError("mode 'virtual' needs weight_decay 0 (decay is a pass per step)")
    if not (is_real(config.weight_decay) and config.weight_decay >= 0):
        raise ConfigError(f"weight_decay must be >= 0, got {config.weight_decay!r}")
    if not is_int(config.seed) or not 0 <= config.seed < 2**63:
        raise ConfigError(f"seed must be an integer in 0..2**63-1, got {config.seed!r}")
    if not is_int(config.max_length) or config.max_length < 8:
        raise ConfigError(f"max_length must be an integer >= 8, got {config.max_length!r}")
    if config.device_map is not None:
        from zofast.device_map import parse

        try:
            parse(config.device_map)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        if config.device != "auto":
            raise ConfigError("give device or device_map, not both")
        if config.method == "dfo-lora":
            raise ConfigError("device_map is for lozo, lozo-m, mezo and adam")
    _check_offload(config)
    _check_compile(config)
    if config.dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {config.dtype!r}")
    if config.freeze is not None:
        try:
            re.compile(config.freeze)
        except re.error as error:
            raise ConfigError(f"freeze is not a valid regex ({error}): {config.freeze!r}") from None
    if (config.template is None) != (config.label_words is None):
        raise ConfigError("a custom task needs both template and label_words")
    if config.template is None:
        try:
            get_task(config.task)
        except ValueError as error:
            raise ConfigError(str(error)) from None
    if config.data != "demo" and not Path(config.data).is_dir():
        raise ConfigError(f"data folder not found: {config.data}")
    if config.text_columns is not None and not 1 <= len(config.text_columns) <= 2:
        raise ConfigError(f"text_columns takes 1 or 2 columns, got {list(config.text_columns)}")
    for pair in config.label_map or ():
        value, sep, target = str(pair).partition("=")
        if not (sep and value.strip() and target.strip()):
            raise ConfigError(f"label_map entries are VALUE=ID (e.g. pos=1), got {pair!r}")


def _check_offload(config: TrainConfig) -> None:
    if not isinstance(config.offload, bool):
        raise ConfigError(f"offload must be true or false, got {config.offload!r}")
    if config.offload_update not in OFFLOAD_UPDATES:
        raise ConfigError(
            f"offload_update must be one of {', '.join(OFFLOAD_UPDATES)}, got "
            f"{config.offload_update!r}"
        )
    if not is_int(config.prefetch) or config.prefetch < 1:
        raise ConfigError(f"prefetch must be an integer >= 1, got {config.prefetch!r}")
    if not config.offload:
        if config.offload_update != "host" or config.prefetch != 1:
            raise ConfigError("offload_update and prefetch apply with offload only")
        return
    if config.method not in ZO_METHODS:
        raise ConfigError(
            f"offload is for {', '.join(ZO_METHODS)} (method is {config.method}): adam and lora "
            "need gradients, which cannot flow through the swapped-in blocks, and dfo-lora's "
            "adapter hooks are not built for streamed blocks"
        )
    if config.device_map is not None:
        raise ConfigError(
            "give offload or device_map, not both: offload places the model itself (blocks "
            "on the host, the rest on device)"
        )


def _check_compile(config: TrainConfig) -> None:
    if not isinstance(config.compile, bool):
        raise ConfigError(f"compile must be true or false, got {config.compile!r}")
    if not config.compile:
        return
    if config.method not in ZO_METHODS:
        raise ConfigError(f"compile is for {', '.join(ZO_METHODS)} (method is {config.method})")
    if config.resolved_mode not in ("inplace", "shadow"):
        raise ConfigError(
            f"compile needs mode 'inplace' or 'shadow' (mode is {config.resolved_mode}, from "
            f"dtype {config.dtype}): virtual mode's per-module hooks would split the compiled "
            "graph"
        )
    if config.offload or config.device_map is not None:
        raise ConfigError("compile runs a model on one device: not with offload or device_map")
