"""Closures for paired steps: a batch stacked twice, and one loss per copy.

A paired optimizer (``LOZO(model, ..., paired=True)``, see :mod:`zofast.optim.paired`) calls its
closure once per step; the closure runs the model on the batch stacked twice (the first copy is
evaluated at W + ε·Z, the second at W − ε·Z) and returns (L+, L−). For a transformers model and
its batch (a dict with ``labels``) that is::

    opt = zofast.LOZO(model, lr=1e-6, paired=True)
    for batch in loader:
        loss = opt.step(lambda: zofast.paired.losses(model, batch))

:func:`losses` computes each copy's loss as the model's own ``forward(..., labels=...)`` does
(causal LM, masked LM, sequence and token classification heads), averaged over each copy alone.
``zofast train --paired`` and ``ZOTrainer`` (``zo_paired=True``) use it (zofast train through
:meth:`zofast.scoring.Scorer.losses` of ``batch.repeat(2)``).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

import torch
import torch.nn.functional as F

__all__ = ["losses", "stack"]

_CAUSAL = ("ForCausalLM", "ForConditionalGeneration", "LMHeadModel")
_TOKENS = ("ForMaskedLM", "ForTokenClassification")


def stack(inputs):
    """The batch stacked twice along its first dimension: the input of a paired forward.

    Args:
        inputs: a tensor (its first dimension is the batch), or a mapping of model inputs
            (``BatchEncoding``, dict): every tensor whose first dimension is the batch's
            (that of ``input_ids``, else of the first tensor) is stacked, the rest (a
            ``(1, L)`` ``position_ids``, non-tensors) kept as they are.

    Returns:
        The same kind of object, with 2·B rows: rows B .. 2B − 1 repeat rows 0 .. B − 1.

    Example:
        >>> stack({"input_ids": torch.ones(3, 5, dtype=torch.long), "n": 1})["input_ids"].shape
        torch.Size([6, 5])
    """
    if isinstance(inputs, torch.Tensor):
        if inputs.dim() == 0:
            raise ValueError("stack needs a tensor with a batch dimension, got a 0-d tensor")
        return torch.cat([inputs, inputs])
    if not isinstance(inputs, Mapping):
        raise TypeError(f"stack takes a tensor or a mapping of inputs, got {type(inputs).__name__}")
    tensors = [v for v in inputs.values() if isinstance(v, torch.Tensor) and v.dim()]
    first = inputs.get("input_ids")
    if not isinstance(first, torch.Tensor):
        if not tensors:
            raise ValueError("stack found no tensor with a batch dimension in the inputs")
        first = tensors[0]
    batch = first.shape[0]
    out = {
        k: torch.cat([v, v]) if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == batch
        else v
        for k, v in inputs.items()
    }  # fmt: skip
    return out


def _loss_type(model) -> str:
    """The model's head, as transformers names it ("ForCausalLM", ...)."""
    kind = getattr(model, "loss_type", None)
    name = type(model).__name__
    if kind is None:
        heads = (*_CAUSAL, *_TOKENS, "ForSequenceClassification")
        kind = next((k for k in heads if k in name), None)
    if kind in _CAUSAL:
        return "ForCausalLM"
    return kind


def _cross_entropy(logits, labels, items) -> torch.Tensor:
    """transformers' cross-entropy: the mean over labels ≠ -100, or their sum / `items`."""
    if items is None:
        return F.cross_entropy(logits, labels)
    return F.cross_entropy(logits, labels, reduction="sum") / torch.as_tensor(items).to(logits)


def _copy_loss(model, kind: str, logits, labels, items) -> torch.Tensor:
    """One copy's loss, as the model's forward computes it from its logits and the labels."""
    logits = logits.float()
    labels = labels.to(logits.device)
    if kind == "ForCausalLM":  # tokens < n predict n; -100 ignored
        shifted = F.pad(labels, (0, 1), value=-100)[..., 1:]
        return _cross_entropy(logits.reshape(-1, logits.shape[-1]), shifted.reshape(-1), items)
    if kind in _TOKENS:
        return _cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), items)
    config = model.config
    problem = getattr(config, "problem_type", None)
    n_labels = config.num_labels
    if problem is None:
        if n_labels == 1:
            problem = "regression"
        elif labels.dtype in (torch.long, torch.int):
            problem = "single_label_classification"
        else:
            problem = "multi_label_classification"
    if problem == "regression":
        if n_labels == 1:
            return F.mse_loss(logits.squeeze(), labels.squeeze().float())
        return F.mse_loss(logits, labels.float())
    if problem == "single_label_classification":
        return _cross_entropy(logits.view(-1, n_labels), labels.view(-1), items)
    return F.binary_cross_entropy_with_logits(logits, labels.float())


def losses(model: torch.nn.Module, inputs, num_items_in_batch=None) -> torch.Tensor:
    """(L+, L−): one forward of `model` over `inputs` stacked twice, each copy's loss.

    The closure of a paired step for a transformers model: ``opt.step(lambda:
    zofast.paired.losses(model, batch))``. Run it under ``torch.no_grad()`` (``step`` does).

    Args:
        model: a transformers model with a causal LM (``...ForCausalLM``, ``...LMHeadModel``),
            masked LM, token classification or sequence classification head.
        inputs: its keyword inputs, with ``labels`` (a dict or ``BatchEncoding``, batch first).
        num_items_in_batch: as transformers' models take it: the cross-entropy losses are then
            each copy's sum divided by it instead of its mean (what ``Trainer`` passes).

    Returns:
        A float32 tensor of two losses: the first copy's and the second's, each computed as
        ``model(**inputs, num_items_in_batch=...).loss`` would be on that copy alone (the mean
        over the copy's labelled tokens or examples by default; causal LM labels are shifted,
        -100 is ignored).

    Raises:
        ValueError: no ``labels``, or a head whose loss this function does not know (write the
            closure by hand: run the model once on :func:`stack` (inputs), return both losses).

    Example:
        >>> import transformers
        >>> config = transformers.GPT2Config(n_embd=8, n_layer=1, n_head=2, vocab_size=20)
        >>> model = transformers.GPT2LMHeadModel(config).eval()
        >>> ids = torch.arange(12).view(2, 6)
        >>> batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        >>> opt = LOZO(model, lr=1e-3, paired=True)
        >>> loss = opt.step(lambda: losses(model, batch))  # one forward of 4 rows
    """
    if not isinstance(inputs, Mapping) or inputs.get("labels") is None:
        raise ValueError("zofast.paired.losses needs the model's inputs with their labels")
    kind = _loss_type(model)
    if kind not in ("ForCausalLM", *_TOKENS, "ForSequenceClassification"):
        raise ValueError(
            f"zofast.paired.losses does not know the loss of {type(model).__name__} (head "
            f"{kind!r}): write the closure yourself, running the model once on "
            "zofast.paired.stack(inputs) and returning (L+, L−)"
        )
    labels = inputs["labels"]
    rest = {k: v for k, v in inputs.items() if k != "labels"}
    if "use_cache" not in rest and "use_cache" in inspect.signature(model.forward).parameters:
        rest["use_cache"] = False  # no key / value cache for a loss
    out = model(**stack(rest))
    logits = out["logits"] if isinstance(out, Mapping) else out[0]
    first, second = logits.chunk(2)
    items = num_items_in_batch
    return torch.stack([_copy_loss(model, kind, h, labels, items) for h in (first, second)])
