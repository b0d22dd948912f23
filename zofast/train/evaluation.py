"""Measuring a model on a split (:func:`evaluate`, the zero-shot record) and cutting a trajectory
at the best evaluation (:func:`trajectory_prefix`, :func:`trajectory_slice`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from zofast.data import Example
from zofast.scoring import Scorer

if TYPE_CHECKING:
    from zofast.train.config import TrainConfig


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
        labels = batch.labels.to(logits.device)  # a device map may put the head elsewhere
        correct += int((logits.argmax(dim=1) == labels).sum())
        total_loss += float(F.cross_entropy(logits, labels, reduction="sum"))
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
    return trajectory_slice(trajectory, 0, n_events)


def trajectory_slice(trajectory, start: int, stop: int):
    """Events ``start`` to ``stop`` (excluded) of a trajectory, as a new trajectory.

    An optimizer that has replayed the first ``start`` events continues with the slice's
    (its own step counter gives the slice's steps their seeds).

    Args:
        trajectory: a :class:`~zofast.trajectory.Trajectory`.
        start: the first event kept.
        stop: the first event not kept.

    Returns:
        A new :class:`~zofast.trajectory.Trajectory`.

    Example:
        >>> rest = trajectory_slice(opt.trajectory, 10, len(opt.trajectory.events))
    """
    from zofast.trajectory import SETTLE, STEP, Trajectory

    out = Trajectory(
        trajectory.method, trajectory.hyperparameters, trajectory.run_seed, trajectory.n_groups
    )
    out.params = trajectory.params
    out.device = trajectory.device
    for index, (kind, g, lrs, wds) in enumerate(trajectory.iter_events()):
        if index >= stop:
            break
        if index < start:
            continue
        if kind == STEP:
            out.record_step(g, lrs, wds)
        elif kind == SETTLE:
            out.record(kind)
        else:  # an abort, at direction g
            out.record(kind, g)
    return out
