"""The accuracy grid's protocol (issue 15): which runs exist, with which settings, in which order.

A *variant* is a method with its fixed settings (rank, steps, evaluation period, dtypes, the lr
grid); a *cell* is one run: a variant on one (task, seed) in one dtype at one lr. Two stages:

* ``select``: every variant that has an lr grid, on the three tasks and seeds 13 and 21 only, in
  float32, at each of its 3 learning rates (:mod:`zofast.grid.selection` picks one per variant);
* ``final``: every variant on the three tasks and all five seeds at its chosen lr, in each of its
  dtypes (ZO methods: float32 and bfloat16 with the default settings, mode and rounding "auto";
  first-order methods and DFO-LoRA: float32). A final cell that a select cell already ran
  (seeds 13 and 21, float32, the chosen lr) is that run: it is not run again.

Budgets: 20,000 ZO steps (2 forwards each: 40,000 forwards), dev evaluated every 500 steps; the
first-order methods at the same budget (a step counts 3 forwards: 13,333 steps, evaluated every
333 steps, the same forward spacing) and at 1,000 steps (evaluated every 100); DFO-LoRA 8,000
calls (rank 4, population 20, intrinsic dimension 500, as ``python -m zofast.experiments dfo``),
evaluated every 400 calls. Batch 16, ε 1e-3, every weight trained (no freeze), the best dev
checkpoint tested (its weights kept in memory).

Learning-rate grids (half-decade steps around what is known to train MiniLM; one grid per family):

* ZO (MeZO, LOZO rank 2 and 4, LOZO-M): 3e-6, 1e-5, 3e-5. MeZO fp32 at 1e-5 reaches training loss
  0.04 in 5,000 steps on SST-2, so 20,000 steps at 1e-5 can fit the 32 training examples; 3e-5 is
  the fastest rate the 100-step CPU grid trained stably with (it used 3e-5 to 6e-5); 3e-6 covers
  the case where the best dev accuracy needs slow, long training. The same grid for every ZO
  method, so that no method gets a finer search than another.
* Adam on all weights: 1e-5, 3e-5, 1e-4 (the usual BERT-size fine-tuning range).
* LoRA: 1e-4, 3e-4, 1e-3 (adapters start at zero and need larger steps).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

TASKS = {"sst-2": "SST-2", "rte": "RTE", "trec": "trec"}
"""Task name → its folder of LM-BFF 16-shot splits (``<folder>/16-<seed>``)."""
SEEDS = (13, 21, 42, 87, 100)
SELECT_SEEDS = (13, 21)
DTYPES = ("float32", "bfloat16")
STAGES = ("select", "final")
ZO_LRS = (3e-6, 1e-5, 3e-5)
ADAM_LRS = (1e-5, 3e-5, 1e-4)
LORA_LRS = (1e-4, 3e-4, 1e-3)
ZO_STEPS = 20_000
FO_STEPS = 1_000
#: Training examples per task in a 16-shot split (16 per class): DFO-LoRA's forwards per call.
TRAIN_SIZE = {"sst-2": 32, "rte": 32, "trec": 96}


@dataclass(frozen=True)
class Variant:
    """One method with its fixed settings.

    Args:
        method: a :data:`zofast.train.METHODS` name, or ``"zero-shot"`` (no training).
        steps: optimizer steps (DFO-LoRA: calls).
        eval_every: steps between dev evaluations.
        lrs: the learning-rate grid; empty: no lr to choose (zero-shot, DFO-LoRA).
        dtypes: weight dtypes of the final stage.
        rank: LOZO's, LoRA's or DFO-LoRA's rank; None where it does not apply.
        label: the column title in the report.

    Example:
        >>> Variant("lozo", 20000, 500, ZO_LRS, DTYPES, rank=4, label="LOZO r4").name
        'lozo-r4-20000'
    """

    method: str
    steps: int
    eval_every: int
    lrs: tuple[float, ...] = ()
    dtypes: tuple[str, ...] = ("float32",)
    rank: int | None = None
    label: str = ""

    @property
    def name(self) -> str:
        """A unique name: method, rank and steps (``"mezo-20000"``, ``"lora-r8-1000"``)."""
        rank = f"-r{self.rank}" if self.rank is not None else ""
        return f"{self.method}{rank}-{self.steps}" if self.steps else self.method

    @property
    def per_step(self) -> int:
        """Forwards per step (first-order steps count 3; a DFO-LoRA call: see :meth:`forwards`)."""
        from zofast.train import FORWARDS_PER_STEP

        return FORWARDS_PER_STEP.get(self.method, 0)

    def forwards(self, task: str) -> int:
        """The run's forward passes (DFO-LoRA: calls × the batches of the training set)."""
        if self.method == "dfo-lora":
            return self.steps * math.ceil(TRAIN_SIZE[task] / 16)
        return self.steps * self.per_step


_FO_BUDGET = 2 * ZO_STEPS // 3
VARIANTS = (
    Variant("zero-shot", 0, 1, label="zero-shot"),
    Variant("mezo", ZO_STEPS, 500, ZO_LRS, DTYPES, label="MeZO"),
    Variant("lozo", ZO_STEPS, 500, ZO_LRS, DTYPES, rank=2, label="LOZO r2"),
    Variant("lozo", ZO_STEPS, 500, ZO_LRS, DTYPES, rank=4, label="LOZO r4"),
    Variant("lozo-m", ZO_STEPS, 500, ZO_LRS, DTYPES, rank=2, label="LOZO-M r2"),
    Variant("adam", _FO_BUDGET, 333, ADAM_LRS, label=f"Adam {_FO_BUDGET:,}"),
    Variant("adam", FO_STEPS, 100, ADAM_LRS, label=f"Adam {FO_STEPS:,}"),
    Variant("lora", _FO_BUDGET, 333, LORA_LRS, rank=8, label=f"LoRA {_FO_BUDGET:,}"),
    Variant("lora", FO_STEPS, 100, LORA_LRS, rank=8, label=f"LoRA {FO_STEPS:,}"),
    Variant("dfo-lora", 8000, 400, rank=4, label="DFO-LoRA"),
)
"""Every variant of the grid, in the report's column order."""


@dataclass(frozen=True)
class Protocol:
    """The whole grid: variants, tasks, seeds and the settings every run shares.

    Args:
        variants: the variants (:data:`VARIANTS`).
        tasks: task names (keys of :data:`TASKS`).
        seeds: data seeds of the final stage (also the run seeds).
        select_seeds: seeds of the lr selection.
        batch_size: examples per step.
        eps: the ZO perturbation scale.
        eval_batch_size: examples per evaluation forward.
        log_every: steps between logged training losses (the loss curve's points).

    Example:
        >>> len(Protocol().cells("select"))
        144
    """

    variants: tuple[Variant, ...] = VARIANTS
    tasks: tuple[str, ...] = tuple(TASKS)
    seeds: tuple[int, ...] = SEEDS
    select_seeds: tuple[int, ...] = SELECT_SEEDS
    batch_size: int = 16
    eps: float = 1e-3
    eval_batch_size: int = 64
    log_every: int = 100

    def variant(self, name: str) -> Variant:
        """The variant called ``name`` (ValueError naming the known ones otherwise)."""
        for v in self.variants:
            if v.name == name:
                return v
        raise ValueError(f"unknown variant {name!r}; known: {', '.join(self.names)}")

    @property
    def names(self) -> list[str]:
        """The variants' names."""
        return [v.name for v in self.variants]

    def cells(self, stage: str, chosen: dict[str, float] | None = None) -> list[Cell]:
        """The cells of a stage, longest first (:meth:`Cell.order`).

        Args:
            stage: ``"select"`` or ``"final"``.
            chosen: variant name → chosen lr (final stage); a variant with an lr grid and no
                choice yet has no final cells.

        Returns:
            The cells, in the order workers take them.
        """
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
        out = []
        for v in self.variants:
            if stage == "select":
                if v.lrs:
                    out += [
                        Cell(t, s, v, "float32", lr)
                        for t in self.tasks
                        for s in self.select_seeds
                        for lr in v.lrs
                    ]
                continue
            if v.lrs and (chosen or {}).get(v.name) is None:
                continue
            lr = chosen[v.name] if v.lrs else None
            out += [Cell(t, s, v, d, lr) for t in self.tasks for s in self.seeds for d in v.dtypes]
        return sorted(out, key=lambda c: c.order(self.tasks))

    def to_dict(self) -> dict[str, Any]:
        """The protocol as JSON (variants by their fields)."""
        return {
            "variants": [{"name": v.name, **asdict(v)} for v in self.variants],
            "tasks": list(self.tasks),
            "seeds": list(self.seeds),
            "select_seeds": list(self.select_seeds),
            "batch_size": self.batch_size,
            "eps": self.eps,
            "eval_batch_size": self.eval_batch_size,
            "log_every": self.log_every,
        }


@dataclass(frozen=True)
class Cell:
    """One run of the grid.

    Example:
        >>> cell = Protocol().cells("select")[0]
        >>> cell.key
        ('rte', 13, 'lozo-m', 2, 'float32', 20000, 3e-06)
    """

    task: str
    seed: int
    variant: Variant = field(compare=False)
    dtype: str
    lr: float | None

    @property
    def key(self) -> tuple:
        """(task, seed, method, rank, dtype, steps, lr): what identifies a run in the records."""
        v = self.variant
        return (self.task, self.seed, v.method, v.rank, self.dtype, v.steps, self.lr)

    def order(self, tasks: tuple[str, ...]) -> tuple:
        """Sort key, longest first: most forwards; then RTE (longest texts) before SST-2 before
        TREC; bfloat16 (more passes per step in the exact modes) before float32; seed; lr."""
        rank = {"rte": 0, "sst-2": 1, "trec": 2}
        return (
            -self.variant.forwards(self.task),
            rank.get(self.task, 3),
            tasks.index(self.task),
            self.dtype != "bfloat16",
            self.seed,
            self.variant.name,
            self.lr or 0.0,
        )

    def describe(self) -> str:
        """One line for the progress log."""
        lr = f" lr {self.lr:g}" if self.lr is not None else ""
        return f"{self.task} seed {self.seed} {self.variant.name} {self.dtype}{lr}"

    def train_config(
        self,
        protocol: Protocol,
        data_root: str,
        model: str | None,
        out: str,
        compile: bool = False,
    ):
        """The :class:`~zofast.train.TrainConfig` of this cell (no plot, no checkpoint files,
        no progress bar; the log in ``out``, a temporary folder, is read for the curves);
        ``compile``: a float32 zeroth-order cell compiles its transformer.

        Example:
            >>> cell = Protocol().cells("select")[0]
            >>> cell.train_config(Protocol(), "k-shot", None, "tmp").data  # doctest: +SKIP
            'k-shot/RTE/16-13'
        """
        from zofast.train import TrainConfig

        v = self.variant
        zero_shot = v.method == "zero-shot"
        options: dict[str, Any] = {"rank": v.rank} if v.rank is not None else {}
        if v.method == "dfo-lora":
            options["intrinsic_dim"] = 500
        elif not zero_shot and v.method not in ("adam", "lora"):
            options["eps"] = protocol.eps
            options["compile"] = compile and self.dtype == "float32"
        return TrainConfig(
            model=model,
            task=self.task,
            data=str(Path(data_root) / TASKS[self.task] / f"16-{self.seed}"),
            method="mezo" if zero_shot else v.method,
            lr=self.lr,
            steps=v.steps,
            batch_size=protocol.batch_size,
            eval_every=v.eval_every,
            eval_batch_size=protocol.eval_batch_size,
            seed=self.seed,
            output_dir=out,
            dtype=self.dtype,
            zero_shot_test=zero_shot,
            progress=False,
            plot=False,
            log_every=protocol.log_every,
            checkpoint_every=0,
            **options,
        ).validate()


def with_steps(protocol: Protocol, scale: float) -> Protocol:
    """The protocol with every variant's steps and evaluation period scaled (at least 1; DFO-LoRA
    at least 41 calls, two generations): a short rehearsal of the same grid (tests; a first
    timing call on the GPU).

    Example:
        >>> with_steps(Protocol(), 0.001).variant("mezo-20").eval_every
        1
    """
    variants = tuple(
        replace(
            v,
            steps=max(41 if v.method == "dfo-lora" else 1, round(v.steps * scale))
            if v.steps
            else 0,
            eval_every=max(1, round(v.eval_every * scale)),
        )
        for v in protocol.variants
    )
    return replace(protocol, variants=variants)
