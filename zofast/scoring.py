"""Label logits of a prompted classifier, without gradients and without new parameters.

How each kind of model (:mod:`zofast.models`) turns an example into ``n_labels`` logits:

* ``"mlm"``: the task template with the mask token; the LM head's logits of each label word's
  first token at the mask position.
* ``"causal"``: the template up to ``{mask}``; the LM head's logits of each label word's first
  token as the next token after the prompt (the last non-pad token: rows are right-padded,
  which leaves the real tokens' positions and causal attention untouched).
* ``"encoder"``: the raw text fields (a pair for two-field tasks) are embedded by masked mean
  pooling of the last hidden state and compared by cosine similarity with the embeddings of the
  task's label descriptions; logits = ``encoder_scale`` (20) · cosine. The description rows are
  appended to every batch, so one forward pass embeds both with the same (perturbed) weights.

Every logit is ``head_logits(forward_hidden(batch), batch)``: code that runs the transformer
itself (e.g. a population of LoRA adapters stacked along the batch dimension with
``batch.repeat(P)``) reuses :meth:`Scorer.head_logits` on its own final hidden states.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .data import Example
from .encoding import Batch, ExampleTokenizer
from .models import LoadedModel
from .tasks import Task, get_task

__all__ = ["Batch", "Scorer"]

_MLM_HEAD_CHAINS = {
    "distilbert": ("vocab_transform", "activation", "vocab_layer_norm", "vocab_projector"),
    "electra": ("generator_predictions", "generator_lm_head"),
    "modernbert": ("head", "decoder"),
}


class Scorer:
    """Turns examples into label logits for one model and one task.

    Args:
        loaded: the output of :func:`zofast.models.load_model`.
        task: a :class:`~zofast.tasks.Task` or a built-in task name.
        max_length: longest row in tokens, special tokens included (capped at the tokenizer's
            ``model_max_length``); longer examples lose the end of their longest text field (the
            mask and template words are kept).
        encoder_scale: logits = ``encoder_scale`` · cosine for encoder models.
        pad_multiple: a batch's width is its longest row rounded up to a multiple of this
            (at most ``max_length``): a handful of shapes instead of one per batch, so that
            shape-keyed caches (cuDNN attention plans, compiled kernels) stay warm. Padding is
            masked: the logits do not depend on it beyond float rounding.

    Example:
        >>> scorer = Scorer(load_model(), "sst-2")
        >>> batch = scorer.encode([Example("a fine, moving film", 1)])
        >>> scorer.logits(batch).shape
        torch.Size([1, 2])
    """

    def __init__(
        self,
        loaded: LoadedModel,
        task: Task | str,
        *,
        max_length: int = 256,
        encoder_scale: float = 20.0,
        pad_multiple: int = 16,
    ) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.kind = loaded.kind
        self.task = get_task(task)
        self.encoder_scale = float(encoder_scale)
        self.num_labels = self.task.num_labels
        self.example_tokenizer = ExampleTokenizer(
            loaded, self.task, max_length=max_length, pad_multiple=pad_multiple
        )
        self.pad_token_id = self.example_tokenizer.pad_token_id
        self.label_token_ids = self.example_tokenizer.label_token_ids
        self._compiled: tuple | None = None  # (base model, its torch.compile wrapper)
        self._compile = False

    def compile(self) -> None:
        """Run the transformer through ``torch.compile`` (dynamic shapes: one compilation for
        every batch width) from now on. Its weights stay the module's parameters, read at each
        call, so in-place perturbations and updates reach the compiled forward; hooks on its
        modules (the exact modes') would split the graph."""
        self._compile = True

    def _transformer(self) -> torch.nn.Module:
        """The base model forward_hidden runs: compiled (once per base model) after compile()."""
        base = self.model.base_model
        if not self._compile:
            return base
        if self._compiled is None or self._compiled[0] is not base:
            self._compiled = (base, torch.compile(base, dynamic=True))
        return self._compiled[1]

    @property
    def device(self) -> torch.device:
        """Device of the model."""
        return next(self.model.parameters()).device

    def label_tokens(self) -> list[str]:
        """The scored token of each label word (``mlm``/``causal``), as vocabulary strings.

        Returns:
            One token string per class, e.g. ``["Ġterrible", "Ġgreat"]`` for RoBERTa.

        Example:
            >>> Scorer(load_model("roberta-base"), "sst-2").label_tokens()  # needs network
            ['Ġterrible', 'Ġgreat']
        """
        if self.label_token_ids is None:
            raise ValueError("encoder models score label descriptions, not label tokens")
        return self.tokenizer.convert_ids_to_tokens(self.label_token_ids.tolist())

    def encode(self, examples: Sequence[Example]) -> Batch:
        """Tokenise examples into one right-padded batch on the model's device.

        Args:
            examples: :class:`~zofast.data.Example` objects (labels must be valid class ids).

        Returns:
            A :class:`Batch` with ``num_copies=1``.

        Example:
            >>> batch = scorer.encode(load_demo()["train"][:8])
            >>> batch.labels.shape
            torch.Size([8])
        """
        return self.example_tokenizer.encode(examples).to(self.device)

    def forward_hidden(self, batch: Batch) -> torch.Tensor:
        """Run the base transformer and return its final hidden states.

        This is ``model.base_model(...).last_hidden_state``: the output of the last
        transformer layer, after the final layer norm for pre-LN causal models (GPT-2 ``ln_f``,
        Llama ``norm``, OPT ``final_layer_norm`` and ``project_out``), i.e. exactly what the LM
        head consumes; for BERT/RoBERTa the output of the last encoder layer (before the MLM
        head's own transform).

        Args:
            batch: from :meth:`encode` (any ``num_copies``).

        Returns:
            ``(batch.num_rows, L, hidden)`` tensor in the model's dtype.

        Example:
            >>> hidden = scorer.forward_hidden(batch)
            >>> torch.equal(scorer.head_logits(hidden, batch), scorer.logits(batch))
            True
        """
        kwargs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        if batch.token_type_ids is not None:
            kwargs["token_type_ids"] = batch.token_type_ids
        return self._transformer()(**kwargs).last_hidden_state

    def _mlm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        model = self.model
        chain = _MLM_HEAD_CHAINS.get(getattr(model.config, "model_type", ""))
        if chain is not None:
            out = hidden
            for name in chain:
                out = getattr(model, name)(out)
            return out
        base = model.base_model
        heads = [
            m
            for m in model.children()
            if m is not base and any(True for _ in m.parameters(recurse=True))
        ]
        if len(heads) != 1:
            raise NotImplementedError(
                f"cannot find the MLM head of {type(model).__name__}: expected one module "
                "besides the base model"
            )
        return heads[0](hidden)

    def head_logits(self, last_hidden_state: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Label logits from the final hidden states of the base transformer.

        ``last_hidden_state`` must be what :meth:`forward_hidden` returns for the same batch:
        ``model.base_model(...).last_hidden_state``, i.e. after the final layer norm (and OPT's
        ``project_out``) for causal models. Rows may be a stacked batch from
        :meth:`Batch.repeat`; each copy's examples are compared with that copy's own label
        description rows (encoders). Runs with or without autograd, as the caller decides.

        Args:
            last_hidden_state: ``(batch.num_rows, L, hidden)``.
            batch: the batch the hidden states belong to.

        Returns:
            ``(batch.num_copies * batch.num_examples, num_labels)`` float32 logits, copy-major.

        Example:
            >>> stacked = batch.repeat(3)
            >>> scorer.head_logits(scorer.forward_hidden(stacked), stacked).shape
            torch.Size([3 * len(examples), 2])
        """
        rows, width = batch.input_ids.shape
        if last_hidden_state.dim() != 3 or last_hidden_state.shape[:2] != (rows, width):
            raise ValueError(
                f"last_hidden_state must have shape ({rows}, {width}, hidden) for this batch, "
                f"got {tuple(last_hidden_state.shape)}"
            )
        copies, n, per_copy = batch.num_copies, batch.num_examples, batch.rows_per_copy
        if self.kind == "encoder":
            mask = batch.attention_mask.unsqueeze(-1).to(last_hidden_state.device, torch.float32)
            summed = (last_hidden_state.to(torch.float32) * mask).sum(dim=1)
            pooled = summed / mask.sum(dim=1).clamp_min(1.0)
            pooled = F.normalize(pooled, dim=-1).view(copies, per_copy, -1)
            cos = torch.einsum("cnh,clh->cnl", pooled[:, :n], pooled[:, n:])
            return (self.encoder_scale * cos).reshape(copies * n, self.num_labels)
        row_index = torch.arange(rows, device=last_hidden_state.device)
        row_index = row_index.view(copies, per_copy)[:, :n].reshape(-1)
        # (a model split by a device map: the hidden states, the batch and the head may each be
        # on another device)
        picked = last_hidden_state[row_index, batch.positions.to(row_index.device)]
        if self.kind == "mlm":
            scores = self._mlm_head(picked)
            return scores[:, self.label_token_ids.to(scores.device)].to(torch.float32)
        head = self.model.get_output_embeddings()
        ids = self.label_token_ids.to(head.weight.device)
        bias = getattr(head, "bias", None)
        logits = F.linear(
            picked.to(head.weight.device), head.weight[ids], None if bias is None else bias[ids]
        )
        logits = logits.to(torch.float32)
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        if cap:
            logits = cap * torch.tanh(logits / cap)
        return logits

    def logits(self, batch: Batch) -> torch.Tensor:
        """Label logits of a batch, without gradients.

        Args:
            batch: from :meth:`encode` (any ``num_copies``).

        Returns:
            ``(batch.num_copies * batch.num_examples, num_labels)`` float32 tensor.

        Example:
            >>> scorer.logits(scorer.encode(examples)).argmax(dim=1)
            tensor([1, 0, 1])
        """
        with torch.no_grad():
            return self.head_logits(self.forward_hidden(batch), batch)

    def loss(self, batch: Batch) -> torch.Tensor:
        """Mean cross-entropy of the label logits, without gradients.

        Args:
            batch: from :meth:`encode`.

        Returns:
            A float32 scalar tensor.

        Example:
            >>> float(scorer.loss(batch))
            0.6931
        """
        with torch.no_grad():
            logits = self.logits(batch)
            return F.cross_entropy(logits, batch.labels.to(logits.device))

    def losses(self, batch: Batch) -> torch.Tensor:
        """Mean cross-entropy of the label logits of each copy of a stacked batch, without
        gradients: (L+, L−) of a paired step's ``batch.repeat(2)`` (zofast.optim.paired).

        Args:
            batch: from :meth:`encode`, or stacked with :meth:`Batch.repeat`.

        Returns:
            A ``(batch.num_copies,)`` float32 tensor; each entry is :meth:`loss` of that copy.

        Example:
            >>> scorer.losses(batch.repeat(2)).shape
            torch.Size([2])
        """
        with torch.no_grad():
            logits = self.logits(batch)
            labels = batch.labels.to(logits.device)
            per_example = F.cross_entropy(logits, labels, reduction="none")
            return per_example.view(batch.num_copies, batch.num_examples).mean(dim=1)

    def predict(self, examples: Sequence[Example], batch_size: int = 32) -> torch.Tensor:
        """Predicted class of every example.

        Args:
            examples: examples to classify (labels are checked but not used).
            batch_size: examples per forward pass.

        Returns:
            ``(len(examples),)`` long tensor on the CPU.

        Example:
            >>> scorer.predict(load_demo()["test"][:4])
            tensor([1, 0, 0, 1])
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        examples = list(examples)
        preds = [
            self.logits(self.encode(examples[i : i + batch_size])).argmax(dim=1).cpu()
            for i in range(0, len(examples), batch_size)
        ]
        return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)

    def accuracy(self, examples: Sequence[Example], batch_size: int = 32) -> float:
        """Fraction of examples whose highest label logit is the true label.

        Args:
            examples: labelled examples.
            batch_size: examples per forward pass.

        Returns:
            Accuracy in ``[0, 1]``.

        Example:
            >>> Scorer(load_model(), "demo").accuracy(load_demo()["test"])
            0.725
        """
        examples = list(examples)
        if not examples:
            raise ValueError("accuracy needs at least one example")
        labels = torch.tensor([ex.label for ex in examples])
        return float((self.predict(examples, batch_size) == labels).float().mean())
