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
  weights as a transformers folder (safetensors);
* ``checkpoint-<step>/``: the newest checkpoint (every ``checkpoint_every`` steps and at the end:
  JSON + safetensors, written to a temporary folder and renamed into place,
  :mod:`zofast.train.checkpoint`); :func:`resume` continues a stopped run from it and ends bit
  for bit as the uninterrupted run.

Divergence
    A NaN / infinite training or dev loss, or a step the optimizer refuses (FloatingPointError),
    stops the run at that step; the files above are still written, from the best dev checkpoint,
    and :attr:`TrainResult.diverged` says where and why.

Keeping the best checkpoint
    When dev accuracy improves (ties broken by lower dev loss), the trained tensors are copied
    to host memory; at the end they are loaded back for the test evaluation. The alternative,
    replaying the best trajectory prefix from a fresh copy of the base model, costs as many
    weight passes as training itself did (MeZO on MiniLM: about 0.45 s per step on 2 CPU cores),
    whereas a copy costs one memcpy per improvement. The prefix is saved anyway, so the best
    weights can always be rebuilt without the copy.

Forward-pass budget
    A zeroth-order step costs 2 forward passes (L+ and L−, same batch; 2q with ``directions``
    q); an Adam step costs one
    forward and one backward pass, counted as 3 forward passes (a backward pass costs about two
    forwards: gradients with respect to activations and to weights). ``forward_budget`` turns a
    budget into steps: ``steps = forward_budget // TrainConfig.forwards_per_step``, so a 3000-step
    ZO run (6000 forwards) and a 2000-step Adam run spend the same compute. A DFO-LoRA step is a
    call (one candidate on the whole training set): ``ceil(len(train) / batch_size)`` forwards.
    Evaluation passes are not counted (every method evaluates the same number of times).

Randomness
    Minibatches are drawn without replacement within each epoch from a ``torch.Generator``
    seeded with ``seed``; the zeroth-order noise comes from the optimizer's run seed (the same
    ``seed``). The global RNG is never touched, so a run is reproducible bit for bit on the same
    machine.

Modules
    :mod:`~zofast.train.config` (:class:`TrainConfig`, :class:`TrainResult`, constants),
    :mod:`~zofast.train.validation` (the checks of :meth:`TrainConfig.validate`),
    :mod:`~zofast.train.inputs` (task, data splits and their formats, model, trained tensors),
    :mod:`~zofast.train.evaluation` (:func:`evaluate`, :func:`trajectory_prefix`),
    :mod:`~zofast.train.methods` (each method behind one small protocol),
    :mod:`~zofast.train.loop` (the one loop, :func:`train` and :func:`resume`),
    :mod:`~zofast.train.checkpoint` (crash-safe checkpoint folders) and
    :mod:`~zofast.train.streaming` (``offload``: the blocks streamed from host memory).

Example:
    >>> from zofast.train import TrainConfig, train
    >>> result = train(TrainConfig(method="lozo", lr=3e-5, steps=800, eval_every=50,
    ...                            freeze="word_embeddings"))
    >>> result.zero_shot_test, result.test
    (0.725, 0.81)
"""

from zofast.train.config import (
    COLUMN_FIELDS,
    DEFAULT_LR,
    FORWARDS_PER_STEP,
    METHODS,
    ZO_METHODS,
    ConfigError,
    TrainConfig,
    TrainResult,
)
from zofast.train.evaluation import evaluate, trajectory_prefix
from zofast.train.inputs import load_splits, resolve_task, trainable_parameters
from zofast.train.loop import resume, train

__all__ = [
    "METHODS",
    "ZO_METHODS",
    "FORWARDS_PER_STEP",
    "DEFAULT_LR",
    "COLUMN_FIELDS",
    "ConfigError",
    "TrainConfig",
    "TrainResult",
    "train",
    "resume",
    "evaluate",
    "load_splits",
    "resolve_task",
    "trainable_parameters",
    "trajectory_prefix",
]
