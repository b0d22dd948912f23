"""Fine-tuning runs: a config, the training loop, its log, plot and checkpoint-as-seeds.

``train(TrainConfig(...))`` loads a model, a task and its data, measures zero-shot accuracy, runs
a zeroth-order optimizer (LOZO, LOZO-M, MeZO), the first-order baseline (Adam) or the
derivative-free DFO-LoRA search (:mod:`zofast.dfo.lora`; its checkpoint replaces the
trajectories), evaluates on the dev split every ``eval_every`` steps, keeps the best dev
checkpoint, reports its test accuracy and writes, under ``output_dir``:

* ``log.jsonl``: one JSON object per line (``config``, ``zero_shot``, ``train``, ``eval``,
  ``final`` events), written as the run goes, so an interrupted run leaves a readable log;
* ``curves.png``: training loss and dev accuracy against steps (:mod:`zofast.plot`);
* ``trajectory.json``: the whole run as seeds and projected gradients (zeroth-order methods);
  ``zofast replay`` rebuilds the final weights from it bit for bit;
* ``trajectory-best.json``: the prefix of that trajectory up to the best dev evaluation;
  replaying it rebuilds the best weights (the ones whose test accuracy is reported);
* ``result.json``: the :class:`TrainResult` summary; ``model/`` (with ``save_model``): the best
  weights as a transformers folder (safetensors).

Keeping the best checkpoint
    When dev accuracy improves (ties broken by lower dev loss), the trained tensors are copied
    to host memory; at the end they are loaded back for the test evaluation. The alternative,
    replaying the best trajectory prefix from a fresh copy of the base model, costs as many
    weight passes as training itself did (MeZO on MiniLM: about 0.45 s per step on 2 CPU cores),
    whereas a copy costs one memcpy per improvement. The prefix is saved anyway, so the best
    weights can always be rebuilt without the copy.

Forward-pass budget
    A zeroth-order step costs 2 forward passes (L+ and L−, same batch); an Adam step costs one
    forward and one backward pass, counted as 3 forward passes (a backward pass costs about two
    forwards: gradients with respect to activations and to weights). ``forward_budget`` turns a
    budget into steps: ``steps = forward_budget // FORWARDS_PER_STEP[method]``, so a 3000-step
    ZO run (6000 forwards) and a 2000-step Adam run spend the same compute. A DFO-LoRA step is a
    call (one candidate on the whole training set): ``ceil(len(train) / batch_size)`` forwards.
    Evaluation passes are not counted (every method evaluates the same number of times).

Randomness
    Minibatches are drawn without replacement within each epoch from a ``torch.Generator``
    seeded with ``seed``; the zeroth-order noise comes from the optimizer's run seed (the same
    ``seed``). The global RNG is never touched, so a run is reproducible bit for bit on the same
    machine.

Example:
    >>> from zofast.train import TrainConfig, train
    >>> result = train(TrainConfig(method="lozo", lr=3e-5, steps=800, eval_every=50,
    ...                            freeze="word_embeddings"))
    >>> result.zero_shot_test, result.test
    (0.725, 0.81)
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from zofast.data import Example, load_demo, load_hf_dataset, load_kshot
from zofast.models import LoadedModel, load_model
from zofast.optim.modes import MODES, ROUNDINGS, auto_mode
from zofast.scoring import Scorer
from zofast.tasks import Task, get_task

__all__ = [
    "METHODS",
    "ZO_METHODS",
    "FORWARDS_PER_STEP",
    "DEFAULT_LR",
    "ConfigError",
    "TrainConfig",
    "TrainResult",
    "train",
    "evaluate",
    "load_splits",
    "resolve_task",
    "trainable_parameters",
    "trajectory_prefix",
]

METHODS = ("lozo", "lozo-m", "mezo", "dfo-lora", "adam")
ZO_METHODS = ("lozo", "lozo-m", "mezo")
FORWARDS_PER_STEP = {"lozo": 2, "lozo-m": 2, "mezo": 2, "adam": 3}
DEFAULT_LR = {"lozo": 3e-5, "lozo-m": 3e-5, "mezo": 6e-5, "adam": 3e-5}
DEFAULT_MOMENTUM = {"lozo-m": 0.7}
DTYPES = ("float32", "bfloat16", "float16")
_DATA_EXTS = (".jsonl", ".json", ".csv", ".tsv", ".parquet")


class ConfigError(ValueError):
    """A bad run configuration or input (unknown task/method, missing data, bad values).

    Raised before any weight is changed or any file is written; the CLI prints its message and
    exits with code 2.
    """


@dataclass
class TrainConfig:
    """Everything a run needs; each default says why it is the default.

    Args:
        model: model name or folder; None = the embedded all-MiniLM-L6-v2 (offline, 22M
            parameters, fast enough on 2 CPU cores).
        task: built-in task name (``demo``, ``sst-2``, ``rte``, ``trec``), or the name of a custom
            task when ``template`` is given; ``demo`` matches the bundled data set.
        data: ``"demo"`` (the bundled set), an LM-BFF k-shot folder, or a folder of
            ``train``/``dev``/``test`` ``.jsonl``/``.json``/``.csv``/``.tsv``/``.parquet`` files;
            ``demo`` needs nothing outside the package.
        template: prompt template of a custom task (see :mod:`zofast.tasks`); None = built-in.
        label_words: label words of a custom task, one per class.
        method: ``lozo``, ``lozo-m``, ``mezo``, ``dfo-lora`` or ``adam``; LOZO is the project's
            main method (low-rank noise: fewer effective dimensions than MeZO's).
        lr: learning rate; None = ``DEFAULT_LR[method]`` (tuned for MiniLM on the demo set's
            dev split, docs/results.md; far larger than the 1e-6/1e-7 of billion-parameter runs,
            which take 100x more steps).
        eps: perturbation scale ε; 1e-3 as in MeZO's and LOZO's published runs.
        rank: rank r of LOZO's U·Vᵀ; 2, LOZO's recommendation for small budgets (OPT: 1-2).
        nu: steps between redraws of V; 50, inside LOZO's recommended 50-100.
        popsize: DFO-LoRA candidates per generation; 20, as the authors' code.
        intrinsic_dim: DFO-LoRA numbers searched per layer; 500, as the authors' code.
        momentum: β of LOZO-M; None = 0.7 for lozo-m (the low end of the paper's 0.7-0.9: the
            first step, which initialises the momentum, weighs 1/(1-β) times any later one, 10x
            at 0.9, which derails short runs) and 0 otherwise.
        weight_decay: decay of matrices (biases and norms exempt); 0, as in MeZO's runs.
        steps: optimizer steps; 1000, a few minutes for MiniLM on 2 CPU cores.
        forward_budget: if set, overrides ``steps`` with ``forward_budget //
            FORWARDS_PER_STEP[method]`` so methods compare at equal compute.
        batch_size: examples per step; 16, MeZO's batch size (capped at the train split's size).
        eval_every: steps between dev evaluations; 100 keeps evaluation under ~5 % of the run.
        eval_batch_size: examples per evaluation forward pass; 64 amortises padding well.
        seed: seeds the minibatch order and the zeroth-order noise; 42, an LM-BFF split seed.
        output_dir: where the log, plot and trajectories go; None =
            ``runs/<task>-<method>-s<seed>``.
        max_length: longest prompt in tokens; 128 holds every 16-shot SST-2/RTE/TREC example.
        dtype: weight dtype; float32, the fastest on a CPU (bf16 / fp16 train as well: mode
            "auto" applies their perturbations exactly and rounds their updates stochastically).
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ...
        freeze: regex; parameters whose name matches it (``re.search``) are not trained; None =
            train everything, as MeZO does.
        mode: ``"auto"`` (for bf16 / fp16 weights an exact mode: ``"virtual"`` for lozo /
            lozo-m without weight decay, ``"shadow"`` otherwise; ``"inplace"`` for float32,
            where in-place rounding is negligible and fastest), ``"inplace"``, ``"shadow"`` or,
            for lozo / lozo-m, ``"virtual"``; see docs/usage.md.
        rounding: ``"auto"`` (stochastic for bf16 / fp16), ``"nearest"`` or ``"stochastic"``:
            how update passes round to the weight dtype.
        pipeline: fuse the next step's perturbation into the update (2 weight passes per ZO step
            instead of 3; in place only); None = on where the mode is in place. The optimizer
            settles before every evaluation and at the end, so the results are those of an
            unpipelined run up to rounding.
        save_model: also write the best weights as a transformers folder (``model/``); off by
            default because the trajectory already rebuilds them.
        zero_shot_test: measure zero-shot test accuracy (the dev one is always measured: it is
            the step-0 candidate for the best checkpoint); off saves a test pass when a sweep
            measures it once per split.
        progress: show a tqdm progress bar (loss, dev accuracy, steps/s).
        plot: draw ``curves.png`` at the end (about a second; sweeps may skip it and call
            :func:`zofast.plot.plot_run` on the log later).
        log_every: steps between ``train`` lines of the JSONL log (mean loss over the window).

    Example:
        >>> cfg = TrainConfig(method="mezo", steps=200, lr=1e-5)
        >>> cfg.validate().method
        'mezo'
    """

    model: str | None = None
    task: str = "demo"
    data: str = "demo"
    template: str | None = None
    label_words: tuple[str, ...] | None = None
    method: str = "lozo"
    lr: float | None = None
    eps: float = 1e-3
    rank: int = 2
    nu: int = 50
    popsize: int = 20
    intrinsic_dim: int = 500
    momentum: float | None = None
    weight_decay: float = 0.0
    steps: int = 1000
    forward_budget: int | None = None
    batch_size: int = 16
    eval_every: int = 100
    eval_batch_size: int = 64
    seed: int = 42
    output_dir: str | None = None
    max_length: int = 128
    dtype: str = "float32"
    device: str = "auto"
    freeze: str | None = None
    mode: str = "auto"
    rounding: str = "auto"
    pipeline: bool | None = None
    save_model: bool = False
    zero_shot_test: bool = True
    progress: bool = True
    plot: bool = True
    log_every: int = 10

    def validate(self) -> TrainConfig:
        """Check every field that can be checked without loading anything.

        Returns:
            ``self``, for chaining.

        Raises:
            ConfigError: the first bad field, in one line.

        Example:
            >>> TrainConfig(rank=0).validate()
            Traceback (most recent call last):
            zofast.train.ConfigError: rank must be an integer >= 1, got 0
        """
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.lr is not None and not (_is_real(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be > 0, got {self.lr!r}")
        if not (_is_real(self.eps) and self.eps > 0):
            raise ConfigError(f"eps must be > 0, got {self.eps!r}")
        counts = ("rank", "nu", "popsize", "intrinsic_dim", "batch_size", "eval_every")
        for name in (*counts, "eval_batch_size", "log_every"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        if not _is_int(self.steps) or self.steps < 0:
            raise ConfigError(f"steps must be an integer >= 0, got {self.steps!r}")
        budget = self.forward_budget
        if budget is not None and (not _is_int(budget) or budget < 0):
            raise ConfigError(f"forward_budget must be an integer >= 0, got {budget!r}")
        if self.momentum is not None:
            if not (_is_real(self.momentum) and 0 <= self.momentum < 1):
                raise ConfigError(f"momentum must be in [0, 1), got {self.momentum!r}")
            if self.momentum > 0 and self.method != "lozo-m":
                raise ConfigError(f"momentum applies to lozo-m only (method is {self.method})")
            if self.momentum == 0 and self.method == "lozo-m":
                raise ConfigError("lozo-m with momentum 0 is plain LOZO: use method lozo")
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.rounding not in ROUNDINGS:
            raise ConfigError(
                f"rounding must be one of {', '.join(ROUNDINGS)}, got {self.rounding!r}"
            )
        if self.pipeline and self.resolved_mode != "inplace":
            raise ConfigError(f"pipeline is for mode 'inplace' (mode is {self.resolved_mode})")
        if self.mode == "virtual" and self.method not in ("lozo", "lozo-m"):
            raise ConfigError(f"mode 'virtual' is LOZO's (method is {self.method})")
        if self.mode == "virtual" and self.weight_decay:
            raise ConfigError("mode 'virtual' needs weight_decay 0 (decay is a pass per step)")
        if not (_is_real(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not _is_int(self.seed) or not 0 <= self.seed < 2**63:
            raise ConfigError(f"seed must be an integer in 0..2**63-1, got {self.seed!r}")
        if not _is_int(self.max_length) or self.max_length < 8:
            raise ConfigError(f"max_length must be an integer >= 8, got {self.max_length!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.freeze is not None:
            try:
                re.compile(self.freeze)
            except re.error as error:
                raise ConfigError(
                    f"freeze is not a valid regex ({error}): {self.freeze!r}"
                ) from None
        if (self.template is None) != (self.label_words is None):
            raise ConfigError("a custom task needs both template and label_words")
        if self.template is None:
            try:
                get_task(self.task)
            except ValueError as error:
                raise ConfigError(str(error)) from None
        if self.data != "demo" and not Path(self.data).is_dir():
            raise ConfigError(f"data folder not found: {self.data}")
        return self

    @property
    def resolved_lr(self) -> float | None:
        """The learning rate used: ``lr`` or the method's default."""
        return self.lr if self.lr is not None else DEFAULT_LR.get(self.method)

    @property
    def resolved_mode(self) -> str:
        """The mode used: ``mode``, or for "auto" what the optimizers choose for ``dtype``."""
        if self.mode != "auto":
            return self.mode
        lozo = self.method in ("lozo", "lozo-m")
        return auto_mode(low=self.dtype != "float32", lowrank=lozo, decay=bool(self.weight_decay))

    @property
    def resolved_momentum(self) -> float:
        """The momentum used: ``momentum`` or the method's default."""
        return (
            self.momentum if self.momentum is not None else DEFAULT_MOMENTUM.get(self.method, 0.0)
        )

    @property
    def resolved_steps(self) -> int:
        """Steps run: ``steps``, or ``forward_budget`` divided by the method's cost per step.

        For ``dfo-lora`` a step is a call (one candidate on the whole training set); the
        conversion of a forward budget needs the training set's size (done in :func:`train`).
        """
        if self.forward_budget is None or self.method == "dfo-lora":
            return self.steps
        return self.forward_budget // FORWARDS_PER_STEP[self.method]

    @property
    def resolved_output_dir(self) -> Path:
        """``output_dir`` or ``runs/<task>-<method>-s<seed>``."""
        if self.output_dir is not None:
            return Path(self.output_dir)
        return Path("runs") / f"{_slug(self.task)}-{self.method}-s{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-serialisable dict (tuples become lists).

        Example:
            >>> TrainConfig().to_dict()["method"]
            'lozo'
        """
        out = dataclasses.asdict(self)
        if out["label_words"] is not None:
            out["label_words"] = list(out["label_words"])
        return out


@dataclass
class TrainResult:
    """What a run measured and where it wrote things.

    Accuracies are fractions in [0, 1]; ``None`` where a split is missing or was not measured.

    Args:
        config: the config of the run.
        zero_shot_dev: dev accuracy before training.
        zero_shot_test: test accuracy before training.
        best_dev: best dev accuracy seen (step 0 included).
        best_step: step of the best dev evaluation (0 = the untrained model).
        test: test accuracy of the best checkpoint.
        final_dev: dev accuracy after the last step.
        steps: steps run.
        forwards: forward-pass equivalents spent on training (see the module docstring).
        seconds: wall time of the training loop, evaluation included.
        train_seconds: wall time of the optimizer steps alone.
        output_dir: the run folder.
        files: name -> path of every file written (``log``, ``plot``, ``trajectory``, ...).
        history: the logged evaluations, ``[{"step": ..., "dev_acc": ..., "dev_loss": ...}]``.

    Example:
        >>> result = train(TrainConfig(steps=50))
        >>> sorted(result.files)
        ['log', 'plot', 'result', 'trajectory', 'trajectory_best']
    """

    config: TrainConfig
    zero_shot_dev: float | None
    zero_shot_test: float | None
    best_dev: float | None
    best_step: int
    test: float | None
    final_dev: float | None
    steps: int
    forwards: int
    seconds: float
    train_seconds: float
    output_dir: str
    files: dict[str, str] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict.

        Example:
            >>> json.dumps(result.to_dict())  # doctest: +SKIP
        """
        out = dataclasses.asdict(self)
        out["config"] = self.config.to_dict()
        return out


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-").lower() or "task"


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


def load_splits(data: str, task: Task) -> dict[str, list[Example]]:
    """Read the train/dev/test splits of ``data`` for ``task``.

    Args:
        data: ``"demo"``, an LM-BFF k-shot folder (SST-2, RTE, trec formats) or a folder of
            ``train``/``dev``/``test`` files readable by :func:`zofast.data.load_hf_dataset`.
        task: the task (decides the k-shot format and the number of labels).

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
        files = {
            split: next(
                (
                    root / f"{split}{ext}"
                    for ext in _DATA_EXTS
                    if (root / f"{split}{ext}").is_file()
                ),
                None,
            )
            for split in ("train", "dev", "test")
        }
        if files["train"] is not None and files["train"].suffix in (".jsonl", ".json", ".parquet"):
            splits = {s: load_hf_dataset(p, task) for s, p in files.items() if p is not None}
        else:
            try:
                splits = load_kshot(root, task)
            except ValueError:
                splits = {s: load_hf_dataset(p, task) for s, p in files.items() if p is not None}
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


def _length(example: Example) -> int:
    return len(example.text_a) + len(example.text_b or "")


def zero_shot(scorer: Scorer, dev, test, config: TrainConfig, log) -> tuple:
    """Dev accuracy and loss and test accuracy of the untrained model (None where not asked),
    written to the log as the "zero_shot" record."""
    zs_dev = zs_dev_loss = zs_test = None
    if dev:
        zs_dev, zs_dev_loss = evaluate(scorer, dev, config.eval_batch_size)
    if test and config.zero_shot_test:
        zs_test = evaluate(scorer, test, config.eval_batch_size)[0]
    log.write("zero_shot", dev_acc=zs_dev, dev_loss=zs_dev_loss, test_acc=zs_test)
    return zs_dev, zs_dev_loss, zs_test


@torch.no_grad()
def evaluate(
    scorer: Scorer, examples: Sequence[Example], batch_size: int = 64
) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of the label logits on ``examples``.

    Examples are batched in order of length (less padding); the result does not depend on it.

    Args:
        scorer: a :class:`~zofast.scoring.Scorer` of the model and task.
        examples: labelled examples (at least one).
        batch_size: examples per forward pass.

    Returns:
        ``(accuracy, loss)``.

    Example:
        >>> acc, loss = evaluate(Scorer(load_model(), "demo"), load_demo()["dev"])
    """
    examples = sorted(examples, key=_length)
    if not examples:
        raise ValueError("evaluate needs at least one example")
    correct, total_loss = 0, 0.0
    for start in range(0, len(examples), batch_size):
        batch = scorer.encode(examples[start : start + batch_size])
        logits = scorer.logits(batch)
        correct += int((logits.argmax(dim=1) == batch.labels).sum())
        total_loss += float(F.cross_entropy(logits, batch.labels, reduction="sum"))
    return correct / len(examples), total_loss / len(examples)


def trajectory_prefix(trajectory, n_events: int):
    """The first ``n_events`` events of a trajectory, as a new trajectory.

    Replaying the prefix rebuilds the weights the run had right after those events.

    Args:
        trajectory: a :class:`~zofast.trajectory.Trajectory`.
        n_events: how many events to keep (``len(trajectory.events)`` at the time of interest).

    Returns:
        A new :class:`~zofast.trajectory.Trajectory`.

    Example:
        >>> best = trajectory_prefix(opt.trajectory, 10)
        >>> best.steps <= opt.trajectory.steps
        True
    """
    from zofast.trajectory import STEP, Trajectory

    out = Trajectory(
        trajectory.method, trajectory.hyperparameters, trajectory.run_seed, trajectory.n_groups
    )
    out.params = trajectory.params
    out.device = trajectory.device
    for index, (kind, g, lrs, wds) in enumerate(trajectory.iter_events()):
        if index >= n_events:
            break
        if kind == STEP:
            out.record_step(g, lrs, wds)
        else:
            out.record(kind)
    return out


class _Log:
    """The JSONL log: one object per line, flushed as written."""

    def __init__(self, path: Path):
        self.path = path
        self._file = path.open("w", encoding="utf-8")

    def write(self, event: str, **fields: Any) -> None:
        self._file.write(json.dumps({"event": event, **fields}, allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class _Batches:
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


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _build_optimizer(config: TrainConfig, model: torch.nn.Module):
    from zofast.optim import LOZO, MeZO, param_groups

    groups = param_groups(model, config.weight_decay)
    lr = config.resolved_lr
    if config.method == "adam":
        params = [p for g in groups for _, p in g["params"]]
        return torch.optim.Adam(params, lr=lr, weight_decay=config.weight_decay)
    common = {
        "lr": lr,
        "eps": config.eps,
        "seed": config.seed,
        "mode": config.resolved_mode,
        "rounding": config.rounding,
        "pipeline": config.resolved_mode == "inplace" and config.pipeline is not False,
        "model": model,
    }
    if config.method == "mezo":
        return MeZO(groups, **common)
    return LOZO(groups, rank=config.rank, nu=config.nu, momentum=config.resolved_momentum, **common)


def _setup(
    config: TrainConfig, loaded: LoadedModel | None
) -> tuple[LoadedModel, Scorer, dict[str, list[Example]], Task]:
    """Load the task, data and model; every failure here is a ConfigError (nothing written)."""
    task = resolve_task(config)
    splits = load_splits(config.data, task)
    if loaded is None:
        try:
            loaded = load_model(config.model, dtype=config.dtype, device=_device(config.device))
        except (OSError, ValueError, ImportError) as error:
            name = config.model or "(default)"
            raise ConfigError(f"cannot load model {name}: {error}") from None
    if config.method != "dfo-lora":
        trainable_parameters(loaded.model, config.freeze)
    try:
        scorer = Scorer(loaded, task, max_length=config.max_length)
    except (ValueError, NotImplementedError) as error:
        raise ConfigError(f"model and task do not fit together: {error}") from None
    return loaded, scorer, splits, task


def train(config: TrainConfig, *, loaded: LoadedModel | None = None) -> TrainResult:
    """Run one fine-tuning run (see the module docstring for what it does and writes).

    Args:
        config: the run configuration.
        loaded: an already loaded model to train in place (its current weights are the base);
            None loads ``config.model``. The model ends holding the best dev checkpoint.

    Returns:
        A :class:`TrainResult`.

    Raises:
        ConfigError: bad configuration or input, raised before any weight or file is written.

    Example:
        >>> result = train(TrainConfig(method="lozo", steps=300, output_dir="runs/demo"))
        >>> result.files["trajectory"]
        'runs/demo/trajectory.json'
    """
    config.validate()
    loaded, scorer, splits, _ = _setup(config, loaded)
    if config.method == "dfo-lora":
        return _train_dfo(config, loaded, scorer, splits)
    model = loaded.model
    model.eval()
    try:
        optimizer = _build_optimizer(config, model)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    out_dir = config.resolved_output_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    log = _Log(out_dir / "log.jsonl")
    try:
        return _run(config, loaded, scorer, splits, optimizer, out_dir, log)
    finally:
        log.close()


def _run(config, loaded, scorer, splits, optimizer, out_dir: Path, log: _Log) -> TrainResult:
    from zofast import plot

    model = loaded.model
    zo = config.method in ZO_METHODS
    steps = config.resolved_steps
    cost = FORWARDS_PER_STEP[config.method]
    dev, test = splits.get("dev"), splits.get("test")
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    log.write(
        "config",
        **config.to_dict(),
        resolved={"lr": config.resolved_lr, "momentum": config.resolved_momentum, "steps": steps},
        model_kind=loaded.kind,
        trained_parameters=sum(p.numel() for _, p in trained),
        splits={k: len(v) for k, v in splits.items()},
    )
    started = time.perf_counter()
    ebs = config.eval_batch_size
    zs_dev, zs_dev_loss, zs_test = zero_shot(scorer, dev, test, config, log)

    history: list[dict] = []

    def snapshot() -> dict[str, torch.Tensor]:
        return {n: p.detach().to("cpu", copy=True) for n, p in trained}

    best = {"key": None, "step": 0, "events": 0, "weights": None, "dev": zs_dev}
    if dev:
        history.append({"step": 0, "dev_acc": zs_dev, "dev_loss": zs_dev_loss})
        best["key"] = (zs_dev, -zs_dev_loss)
        if steps > 0:
            best["weights"] = snapshot()

    batches = _Batches(splits["train"], config.batch_size, config.seed)
    losses: list[float] = []
    window: list[float] = []
    train_seconds = 0.0
    final_dev = zs_dev
    bar = _progress(config, steps)
    try:
        for step in range(1, steps + 1):
            examples = batches.next()
            t0 = time.perf_counter()
            batch = scorer.encode(examples)
            if zo:
                loss = optimizer.step(lambda batch=batch: scorer.loss(batch))
            else:
                loss = _adam_step(optimizer, scorer, batch)
            train_seconds += time.perf_counter() - t0
            if not math.isfinite(loss):
                raise FloatingPointError(f"training loss is {loss} at step {step}")
            losses.append(loss)
            window.append(loss)
            if step % config.log_every == 0 or step == steps:
                log.write(
                    "train",
                    step=step,
                    loss=sum(window) / len(window),
                    forwards=step * cost,
                    steps_per_s=step / train_seconds if train_seconds > 0 else None,
                    elapsed=time.perf_counter() - started,
                )
                window = []
            if dev and (step % config.eval_every == 0 or step == steps):
                if zo:
                    optimizer.settle()
                acc, dev_loss = evaluate(scorer, dev, ebs)
                final_dev = acc
                improved = (acc, -dev_loss) > best["key"]
                if improved:
                    best.update(key=(acc, -dev_loss), step=step, weights=snapshot(), dev=acc)
                    if zo:
                        best["events"] = len(optimizer.trajectory.events)
                history.append({"step": step, "dev_acc": acc, "dev_loss": dev_loss})
                log.write("eval", step=step, dev_acc=acc, dev_loss=dev_loss, best=improved)
                if bar is not None:
                    bar.set_postfix(loss=f"{loss:.4f}", dev=f"{acc:.3f}", best=f"{best['dev']:.3f}")
            elif bar is not None and step % 5 == 0:
                postfix = {"loss": f"{sum(losses[-20:]) / len(losses[-20:]):.4f}"}
                if best["dev"] is not None:
                    postfix["best"] = f"{best['dev']:.3f}"
                bar.set_postfix(postfix)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        if zo:
            optimizer.settle()
            if optimizer.mode != "inplace":
                optimizer.detach()  # the hooks come off: a plain model from here on

    if not dev:
        best["step"] = steps
        if zo:
            best["events"] = len(optimizer.trajectory.events)
    elif best["weights"] is not None:
        with torch.no_grad():
            for name, p in trained:
                p.copy_(best["weights"][name].to(p.device))
        best["weights"] = None
    files: dict[str, str] = {}
    if zo:
        path = out_dir / "trajectory.json"
        optimizer.trajectory.save(path)
        files["trajectory"] = str(path)
        path = out_dir / "trajectory-best.json"
        trajectory_prefix(optimizer.trajectory, best["events"]).save(path)
        files["trajectory_best"] = str(path)
    if config.method == "adam":
        optimizer.zero_grad(set_to_none=True)
    test_acc = evaluate(scorer, test, ebs)[0] if test else None
    seconds = time.perf_counter() - started
    log.write(
        "final",
        best_step=best["step"],
        best_dev=best["dev"],
        test_acc=test_acc,
        zero_shot_dev=zs_dev,
        zero_shot_test=zs_test,
        steps=steps,
        forwards=steps * cost,
        seconds=seconds,
        train_seconds=train_seconds,
    )
    files["log"] = str(log.path)
    if config.plot:
        plot_path = out_dir / "curves.png"
        plot.plot_run(log.path, plot_path)
        files["plot"] = str(plot_path)
    if config.save_model:
        model_dir = out_dir / "model"
        loaded.model.save_pretrained(model_dir)
        loaded.tokenizer.save_pretrained(model_dir)
        files["model"] = str(model_dir)
    result = TrainResult(
        config=config,
        zero_shot_dev=zs_dev,
        zero_shot_test=zs_test,
        best_dev=best["dev"],
        best_step=best["step"],
        test=test_acc,
        final_dev=final_dev,
        steps=steps,
        forwards=steps * cost,
        seconds=seconds,
        train_seconds=train_seconds,
        output_dir=str(out_dir),
        files=files,
        history=history,
    )
    return _saved(result)


def _saved(result: TrainResult) -> TrainResult:
    """result, written to <output_dir>/result.json (a path its own files list names)."""
    path = Path(result.output_dir) / "result.json"
    result.files["result"] = str(path)
    path.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return result


def _adam_step(optimizer: torch.optim.Optimizer, scorer: Scorer, batch) -> float:
    optimizer.zero_grad(set_to_none=True)
    with torch.enable_grad():
        logits = scorer.head_logits(scorer.forward_hidden(batch), batch)
        loss = F.cross_entropy(logits, batch.labels)
        loss.backward()
    optimizer.step()
    return float(loss.detach())


def _progress(config: TrainConfig, steps: int):
    if not config.progress or steps == 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=steps, desc=f"{config.method} {config.task}", unit="step", dynamic_ncols=True)


def _train_dfo(config: TrainConfig, loaded: LoadedModel, scorer: Scorer, splits) -> TrainResult:
    """DFO-LoRA (:class:`zofast.dfo.lora.DFOLoRA`) with the same log, plot and result files.

    Steps are DFO "calls" (one candidate evaluated on the whole training set); a forward budget
    converts at ``ceil(len(train) / batch_size)`` forward passes per call. ``rank`` is the LoRA
    rank (the authors use 4), ``eval_every`` counts calls. The model's weights are never
    changed: the adapters are forward hooks, left on the model with the best dev snapshot
    applied. Files: ``dfo/`` (checkpoint: JSON + safetensors), ``adapter/`` with ``save_model``
    (a PEFT LoRA adapter).
    """
    try:
        from zofast.dfo.lora import DFOLoRA
    except ImportError as error:
        raise ConfigError(f"method dfo-lora needs zofast.dfo.lora.DFOLoRA: {error}") from None
    from zofast import plot

    train_set, dev, test = splits["train"], splits.get("dev"), splits.get("test")
    per_call = math.ceil(len(train_set) / config.batch_size)
    calls = config.steps if config.forward_budget is None else config.forward_budget // per_call
    if calls < config.popsize:
        raise ConfigError(
            f"dfo-lora needs a budget of at least one generation ({config.popsize} calls), got "
            f"{calls}"
        )
    try:
        dfo = DFOLoRA(
            loaded,
            rank=config.rank,
            intrinsic_dim=config.intrinsic_dim,
            popsize=config.popsize,
            seed=config.seed,
        )
    except ValueError as error:
        raise ConfigError(f"dfo-lora: {error}") from None
    out_dir = config.resolved_output_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    log = _Log(out_dir / "log.jsonl")
    started = time.perf_counter()
    try:
        log.write(
            "config",
            **config.to_dict(),
            resolved={"steps": calls, "forwards_per_call": per_call},
            model_kind=loaded.kind,
            splits={k: len(v) for k, v in splits.items()},
        )
        ebs = config.eval_batch_size
        zs_dev, zs_dev_loss, zs_test = zero_shot(scorer, dev, test, config, log)
        fit = dfo.fit(
            train_set,
            dev,
            budget=calls,
            eval_every=config.eval_every,
            log=out_dir / "dfo.jsonl",
            scorer=scorer,
            progress=config.progress,
        )
        history = [{"step": 0, "dev_acc": zs_dev, "dev_loss": zs_dev_loss}] if dev else []
        for record in plot.read_log(out_dir / "dfo.jsonl"):
            if record["step"] == 0:
                continue
            log.write("train", step=record["calls"], loss=record["loss"], elapsed=record["elapsed"])
            if record["dev_acc"] is not None:
                entry = {"step": record["calls"], "dev_acc": record["dev_acc"]}
                entry["dev_loss"] = record["dev_loss"]
                history.append(entry)
                log.write("eval", **entry, best=record["calls"] == fit.best_calls)
        test_acc = evaluate(scorer, test, ebs)[0] if test else None
        files = {"dfo": str(dfo.save(out_dir / "dfo"))}
        if config.save_model:
            files["adapter"] = str(dfo.export_peft(out_dir / "adapter"))
        best_step = fit.best_calls if fit.best_calls is not None else fit.calls
        seconds = time.perf_counter() - started
        log.write(
            "final",
            best_step=best_step,
            best_dev=fit.best_dev_acc,
            test_acc=test_acc,
            zero_shot_dev=zs_dev,
            zero_shot_test=zs_test,
            steps=fit.calls,
            forwards=fit.calls * per_call,
            seconds=seconds,
            train_seconds=fit.elapsed,
        )
        files["log"] = str(log.path)
    finally:
        log.close()
    if config.plot:
        files["plot"] = str(plot.plot_run(log.path, out_dir / "curves.png"))
    result = TrainResult(
        config=config,
        zero_shot_dev=zs_dev,
        zero_shot_test=zs_test,
        best_dev=fit.best_dev_acc,
        best_step=best_step,
        test=test_acc,
        final_dev=history[-1]["dev_acc"] if history else None,
        steps=fit.calls,
        forwards=fit.calls * per_call,
        seconds=seconds,
        train_seconds=fit.elapsed,
        output_dir=str(out_dir),
        files=files,
        history=history,
    )
    return _saved(result)
