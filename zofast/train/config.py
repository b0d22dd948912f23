"""A run's configuration and result: :class:`TrainConfig`, :class:`TrainResult`, the method
constants and :class:`ConfigError`."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zofast.optim.modes import auto_mode

METHODS = ("lozo", "lozo-m", "mezo", "dfo-lora", "adam", "lora")
ZO_METHODS = ("lozo", "lozo-m", "mezo")
FORWARDS_PER_STEP = {"lozo": 2, "lozo-m": 2, "mezo": 2, "adam": 3, "lora": 3}
DEFAULT_LR = {"lozo": 3e-5, "lozo-m": 3e-5, "mezo": 6e-5, "adam": 3e-5, "lora": 3e-4}
DEFAULT_RANK = {"lora": 8}
DEFAULT_MOMENTUM = {"lozo-m": 0.7}
DTYPES = ("float32", "bfloat16", "float16")
OFFLOAD_UPDATES = ("host", "gpu")
#: The TrainConfig fields that say where the data files hold text and labels.
COLUMN_FIELDS = ("text_columns", "label_column", "header", "label_map")


class ConfigError(ValueError):
    """A bad run configuration or input (unknown task/method, missing data, bad values).

    Raised before any weight is changed or any file is written; the CLI prints its message and
    exits with code 2.
    """

    __module__ = "zofast.train"  # its public home (tracebacks and doctests name it so)


@dataclass
class TrainConfig:
    """Everything a run needs; each default says why it is the default.

    Args:
        model: model name or folder; None = the embedded all-MiniLM-L6-v2 (offline, 22M
            parameters, fast enough on 2 CPU cores).
        task: built-in task name (LM-BFF's suite: ``sst-2``, ``sst-5``, ``mr``, ``cr``, ``mpqa``,
            ``subj``, ``trec``, ``cola``, ``mnli``, ``snli``, ``qnli``, ``rte``, ``mrpc``, ``qqp``,
            ``sts-b``; docs/tasks.md), or the name of a custom task when ``template`` is given;
            ``demo`` matches the bundled data set.
        data: ``"demo"`` (the bundled set), an LM-BFF k-shot folder, or a folder of
            ``train``/``dev``/``test`` ``.jsonl``/``.json``/``.csv``/``.tsv``/``.parquet`` files;
            ``demo`` needs nothing outside the package.
        template: prompt template of a custom task (see :mod:`zofast.tasks`); None = built-in.
        label_words: label words of a custom task, one per class.
        text_columns: columns of text_a (and text_b) in the data files: header names or 0-based
            positions; None = the task's LM-BFF layout, or found by name.
        label_column: the label column, a header name or 0-based position; None = the task's
            layout, or found by name.
        header: whether csv / tsv files start with a header row; None = the task's layout, or
            a header when a column is given by name.
        label_map: VALUE=ID pairs mapping label values to classes (ID: class id, label name or
            label word); None = class ids or the task's label names, as LM-BFF's files hold.
        method: ``lozo``, ``lozo-m``, ``mezo``, ``dfo-lora``, ``adam`` (first order, all
            weights) or ``lora`` (first order, PEFT adapters on the attention projections,
            :mod:`zofast.train.lora`); LOZO is the project's main method (low-rank noise: fewer
            effective dimensions than MeZO's).
        lr: learning rate; None = ``DEFAULT_LR[method]`` (tuned for MiniLM on the demo set's
            dev split, docs/results-cpu-100-steps.md; far larger than the 1e-6/1e-7 of
            billion-parameter runs, which take 100x more steps).
        eps: perturbation scale ε; 1e-3 as in MeZO's and LOZO's published runs.
        rank: rank r of LOZO's U·Vᵀ, DFO-LoRA's or LoRA's adapters; None = 8 for lora (the
            usual LoRA rank, alpha 2r) and 2 otherwise, LOZO's recommendation for small budgets
            (OPT: 1-2).
        nu: steps between redraws of V; 50, inside LOZO's recommended 50-100.
        popsize: DFO-LoRA candidates per generation; 20, as the authors' code.
        intrinsic_dim: DFO-LoRA numbers searched per layer; 500, as the authors' code.
        momentum: β of LOZO-M; None = 0.7 for lozo-m (the low end of the paper's 0.7-0.9: the
            first step, which initialises the momentum, weighs 1/(1-β) times any later one, 10x
            at 0.9, which derails short runs) and 0 otherwise.
        weight_decay: decay of matrices (biases and norms exempt); 0, as in MeZO's runs.
        directions: perturbations per zeroth-order step (2 forwards each; the update averages
            their estimates); 1, as in MeZO's and LOZO's published runs.
        split: under torchrun, what the processes share out: ``"batch"`` (each takes a slice of
            every batch and evaluates every direction) or ``"directions"`` (each evaluates its
            own directions on the whole batch; needs an exact mode, i.e. bf16 / fp16 weights or
            ``mode`` shadow, and ``directions`` >= the number of processes); ``"batch"``, which
            works for any setting.
        steps: optimizer steps; 1000, a few minutes for MiniLM on 2 CPU cores.
        forward_budget: if set, overrides ``steps`` with ``forward_budget //
            forwards_per_step`` (``FORWARDS_PER_STEP[method]``, times ``directions`` for the
            zeroth-order methods) so methods compare at equal compute.
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
        device_map: split the model over devices instead of ``device``: ``"auto"`` (the GPUs in
            order, then the CPU) or a JSON object of module name -> device, e.g.
            ``{"model.decoder.layers.0": 0, "model.decoder.layers.1": "cpu", ...}``; CPU layers
            compute on the CPU (:mod:`zofast.device_map`; needs accelerate); one process, ZO
            methods and adam; None = the whole model on ``device``.
        offload: models larger than GPU memory: the model is loaded on the host, its repeated
            blocks (found by structure: OPT, GPT-2, Llama, BERT / RoBERTa layers) stay in pinned
            host memory and stream to ``device`` (a GPU) block by block while the rest sits on
            it (:mod:`zofast.offload`); lozo, lozo-m and mezo, one process, no device_map. Off
            by default: a model that fits trains faster from GPU memory.
        offload_update: with offload, where the update passes over the block tensors run:
            ``"host"`` (the C++ engine on the host copy) or ``"gpu"`` (on an uploaded copy,
            written back before the pass returns; the GPU's normals, within float32 rounding of
            the host's); "host" moves nothing more over the host link than the forwards do.
        prefetch: with offload, blocks uploaded ahead of the one computing (the GPU holds
            prefetch + 1 blocks); 1 hides each upload behind one block's compute.
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
        paired: lozo / lozo-m: evaluate a step's two losses in ONE forward over the batch stacked
            twice, the first copy at +ε and the second at −ε (zofast.optim.paired): fewer launches
            and one read of the weights per step, the same updates; needs an exact mode (mode
            "auto" then picks "virtual" or, with weight decay, "shadow", whatever the dtype).
            None = on for lozo / lozo-m with offload (outside mode "inplace"): every forward
            uploads every block, so one forward per step halves what a step moves over the host
            link, which bounds a streamed step; off otherwise: it doubles the forward's
            activations.
        compile: ``torch.compile`` the model's transformer (dynamic shapes) for lozo, lozo-m and
            mezo in mode "inplace" (float32 weights under mode "auto") or "shadow" (mezo's
            default for bf16 / fp16): a small model's eager forward is bound by Python's
            per-operation overhead, which compiling removes. In shadow mode a small model's
            tensors are all presets, swapped in before the forward, no hook
            (zofast.optim.shadow.plan_ways); a larger model's per-module hooks split the
            compiled graph at every layer, as virtual mode's would (refused).
            Off by default: compiling takes seconds to a minute before the first step, and
            the compiled forward rounds differently from the eager one in the last bits.
        save_model: also write the best weights as a transformers folder (``model/``); off by
            default because the trajectory already rebuilds them.
        zero_shot_test: measure zero-shot test accuracy (the dev one is always measured: it is
            the step-0 candidate for the best checkpoint); off saves a test pass when a sweep
            measures it once per split.
        progress: show a tqdm progress bar (loss, dev accuracy, steps/s).
        plot: draw ``curves.png`` at the end (about a second; sweeps may skip it and call
            :func:`zofast.plot.plot_run` on the log later).
        log_every: steps between ``train`` lines of the JSONL log (mean loss over the window).
        checkpoint_every: steps between checkpoints (``checkpoint-<step>/``: weights, optimizer
            state, data order, best snapshot, log offset; one more at the end), which
            ``zofast train --resume`` continues from; 100 costs one write of the trained weights
            per 100 steps (MiniLM: 90 MB, a fraction of a second); 0 = no checkpoints at all.

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
    text_columns: tuple[str, ...] | None = field(default=None, metadata={"metavar": "COL"})
    label_column: str | None = field(default=None, metadata={"metavar": "COL"})
    header: bool | None = None
    label_map: tuple[str, ...] | None = field(default=None, metadata={"metavar": "VALUE=ID"})
    method: str = "lozo"
    lr: float | None = None
    eps: float = 1e-3
    rank: int | None = None
    nu: int = 50
    popsize: int = 20
    intrinsic_dim: int = 500
    momentum: float | None = None
    weight_decay: float = 0.0
    directions: int = 1
    split: str = "batch"
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
    device_map: str | None = None
    offload: bool = False
    offload_update: str = "host"
    prefetch: int = 1
    freeze: str | None = None
    mode: str = "auto"
    rounding: str = "auto"
    pipeline: bool | None = None
    paired: bool | None = None
    compile: bool = False
    save_model: bool = False
    zero_shot_test: bool = True
    progress: bool = True
    plot: bool = True
    log_every: int = 10
    checkpoint_every: int = 100

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
        from zofast.train.validation import check  # here: validation imports this module

        check(self)
        return self

    @property
    def columns(self) -> dict[str, Any]:
        """The column arguments of :func:`zofast.data.load_kshot` (``text_columns``, ...)."""
        return {name: getattr(self, name) for name in COLUMN_FIELDS}

    @property
    def resolved_lr(self) -> float | None:
        """The learning rate used: ``lr`` or the method's default."""
        return self.lr if self.lr is not None else DEFAULT_LR.get(self.method)

    @property
    def resolved_rank(self) -> int:
        """The rank used: ``rank`` or the method's default."""
        return self.rank if self.rank is not None else DEFAULT_RANK.get(self.method, 2)

    @property
    def resolved_mode(self) -> str:
        """The mode used: ``mode``, or for "auto" what the optimizers choose for ``dtype``."""
        if self.mode != "auto":
            return self.mode
        lozo = self.method in ("lozo", "lozo-m")
        low = self.dtype != "float32"
        return auto_mode(
            low=low, lowrank=lozo, decay=bool(self.weight_decay), paired=self.resolved_paired
        )

    @property
    def resolved_paired(self) -> bool:
        """Whether a step takes one paired forward: ``paired``, or for None, with offload for
        lozo / lozo-m outside mode "inplace" (see ``paired``)."""
        lozo = self.method in ("lozo", "lozo-m")
        if self.paired is not None:
            return self.paired is True and lozo
        return self.offload is True and lozo and self.mode != "inplace"

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
        return self.forward_budget // self.forwards_per_step

    @property
    def forwards_per_step(self) -> int:
        """Forward passes per step: ``FORWARDS_PER_STEP[method]``, times ``directions`` for the
        zeroth-order methods."""
        per_direction = FORWARDS_PER_STEP[self.method]
        return per_direction * self.directions if self.method in ZO_METHODS else per_direction

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
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict` (unknown keys ignored), validated.

        Raises:
            TypeError: a value of a field that does not take it.
            ConfigError: a bad field (:meth:`validate`).

        Example:
            >>> custom = TrainConfig(template="{text_a} It was", label_words=("bad", "good"))
            >>> TrainConfig.from_dict(custom.to_dict()) == custom
            True
        """
        names = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in values.items() if k in names}
        for name in ("label_words", "text_columns", "label_map"):  # tuples, lists in JSON
            if fields.get(name) is not None:
                fields[name] = tuple(fields[name])
        return cls(**fields).validate()


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
        diverged: None, or why the run stopped early (``"step 12: training loss is nan"``); the
            files and the best checkpoint are those of the steps before it.

    Example:
        >>> result = train(TrainConfig(steps=50))
        >>> sorted(result.files)
        ['checkpoint', 'log', 'plot', 'result', 'trajectory', 'trajectory_best']
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
    diverged: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict.

        Example:
            >>> json.dumps(result.to_dict())  # doctest: +SKIP
        """
        out = dataclasses.asdict(self)
        out["config"] = self.config.to_dict()
        return out


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-").lower() or "task"
