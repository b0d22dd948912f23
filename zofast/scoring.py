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

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data import Example
from .models import LoadedModel
from .tasks import Task, get_task

__all__ = ["Batch", "Scorer"]

ROW_CACHE_SIZE = 200_000
"""Examples whose token rows a :class:`Scorer` keeps (emptied when full: the bound is memory)."""

_MLM_HEAD_CHAINS = {
    "distilbert": ("vocab_transform", "activation", "vocab_layer_norm", "vocab_projector"),
    "electra": ("generator_predictions", "generator_lm_head"),
    "modernbert": ("head", "decoder"),
}


@dataclass
class Batch:
    """Tokenised examples, ready for one forward pass.

    Row layout: ``num_copies`` copies of ``rows_per_copy`` rows each, copy-major; in every copy
    the first ``num_examples`` rows are the examples and the rest (encoders only) are the label
    description rows. ``labels`` and ``positions`` have one entry per example row of every copy
    (``num_copies * num_examples``), in the same order as the logits.

    Args:
        input_ids: ``(num_copies * rows_per_copy, L)`` long, right-padded.
        attention_mask: same shape, 1 for real tokens.
        labels: ``(num_copies * num_examples,)`` long class ids.
        positions: ``(num_copies * num_examples,)`` scoring position of each example row (mask
            position for masked LMs, last real token otherwise).
        num_examples: examples per copy.
        rows_per_copy: rows per copy (``num_examples`` + label descriptions for encoders).
        num_copies: how many stacked copies (1 from :meth:`Scorer.encode`).
        token_type_ids: segment ids when the tokenizer makes them (encoder pairs), else ``None``.

    Example:
        >>> batch = scorer.encode(examples)
        >>> stacked = batch.repeat(20)  # 20 population members, one copy each
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    positions: torch.Tensor
    num_examples: int
    rows_per_copy: int
    num_copies: int = 1
    token_type_ids: torch.Tensor | None = None

    @property
    def num_rows(self) -> int:
        """Number of rows of ``input_ids``."""
        return self.input_ids.shape[0]

    def repeat(self, copies: int) -> Batch:
        """Stack ``copies`` copies of the whole batch along the batch dimension.

        Copy ``p`` occupies rows ``p * rows_per_copy : (p + 1) * rows_per_copy`` of the result
        and logit rows ``p * num_examples : (p + 1) * num_examples``.

        Args:
            copies: number of copies (P).

        Returns:
            A new :class:`Batch` with ``num_copies`` multiplied by ``copies``.

        Example:
            >>> big = batch.repeat(4)
            >>> big.num_rows == 4 * batch.num_rows
            True
        """
        if not isinstance(copies, int) or copies < 1:
            raise ValueError(f"copies must be a positive int, got {copies!r}")

        def rep(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            return t.repeat(copies, *([1] * (t.dim() - 1)))

        return dataclasses.replace(
            self,
            input_ids=rep(self.input_ids),
            attention_mask=rep(self.attention_mask),
            labels=rep(self.labels),
            positions=rep(self.positions),
            token_type_ids=rep(self.token_type_ids),
            num_copies=self.num_copies * copies,
        )

    def to(self, device: str | torch.device) -> Batch:
        """Move every tensor to ``device``.

        Args:
            device: target device.

        Returns:
            A new :class:`Batch`.

        Example:
            >>> batch = batch.to("cuda")
        """
        return dataclasses.replace(
            self,
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            labels=self.labels.to(device),
            positions=self.positions.to(device),
            token_type_ids=None if self.token_type_ids is None else self.token_type_ids.to(device),
        )


def _special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """Ids the tokenizer adds before and after a single sequence."""
    probe = "hello world"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start]), list(full[start + len(plain) :])
    raise ValueError("cannot locate the text inside the tokenizer's special-token template")


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
        limit = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(limit, int) and 0 < limit < 1_000_000:
            max_length = min(int(max_length), limit)
        self.max_length = int(max_length)
        if not isinstance(pad_multiple, int) or pad_multiple < 1:
            raise ValueError(f"pad_multiple must be a positive integer, got {pad_multiple!r}")
        self.pad_multiple = pad_multiple
        self._row_cache: dict[Example, tuple[list[int], list[int] | None]] = {}
        self._descriptions: list[tuple[list[int], list[int] | None]] | None = None
        self._prefix, self._suffix = _special_tokens(self.tokenizer)
        if self.kind == "causal":
            self._suffix = []
        if self.max_length < len(self._prefix) + len(self._suffix) + 4:
            raise ValueError(f"max_length={max_length} is too small for this tokenizer")
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        self.pad_token_id = int(pad)
        self.label_token_ids: torch.Tensor | None = None
        self.descriptions: tuple[str, ...] | None = None
        if self.kind in ("mlm", "causal"):
            template = self.task.template_for(self.kind)
            if not self.task.has_mask(self.kind):
                raise ValueError(
                    f"template {template!r} of task {self.task.name!r} has no {{mask}} "
                    f"placeholder; {self.kind} models need one"
                )
            if self.kind == "mlm" and self.tokenizer.mask_token_id is None:
                raise ValueError(f"the tokenizer of {loaded.name} has no mask token")
            self.task.render(Example("x", 0, "x"), self._mask_string(), kind=self.kind)
            self.label_token_ids = self._label_tokens()
        elif self.kind == "encoder":
            self.descriptions = self.task.descriptions()
            if len(self.descriptions) != self.num_labels:
                raise ValueError("one label description per class is needed")
        else:
            raise ValueError(f"unknown model kind {self.kind!r}")

    @property
    def device(self) -> torch.device:
        """Device of the model."""
        return next(self.model.parameters()).device

    def _mask_string(self) -> str:
        return self.tokenizer.mask_token if self.kind == "mlm" else ""

    def _tokenize(self, text: str) -> tuple[list[int], list[tuple[int, int]] | None]:
        try:
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
        except (NotImplementedError, ValueError, TypeError):
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]), None

    def _label_tokens(self) -> torch.Tensor:
        prefix, space = self.task.label_context(self.kind)
        words = self.task.words_for(self.kind)
        ids = []
        for word in words:
            full_ids, offsets = self._tokenize(prefix + space + word)
            if offsets is not None:
                first = next((i for i, (_, end) in enumerate(offsets) if end > len(prefix)), None)
            else:
                prefix_ids = self._tokenize(prefix)[0] if prefix else []
                first = len(prefix_ids) if full_ids[: len(prefix_ids)] == prefix_ids else None
            if first is None or first >= len(full_ids):
                raise ValueError(f"label word {word!r} produces no token after {prefix!r}")
            ids.append(full_ids[first])
        if len(set(ids)) != len(ids):
            tokens = self.tokenizer.convert_ids_to_tokens(ids)
            raise ValueError(
                f"label words {list(words)} of task {self.task.name!r} share first tokens "
                f"{tokens}; choose words that start with different tokens"
            )
        return torch.tensor(ids, dtype=torch.long)

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

    def _prompt_ids(self, example: Example) -> list[int]:
        """Token ids of one example's prompt, truncated to fit ``max_length``."""
        budget = self.max_length - len(self._prefix) - len(self._suffix)
        mask = self._mask_string()
        for _ in range(8):
            text, spans = self.task.render(example, mask, kind=self.kind)
            ids, offsets = self._tokenize(text)
            excess = len(ids) - budget
            if excess <= 0:
                return self._prefix + ids + self._suffix
            example = self._shorten(example, text, spans, ids, offsets, excess)
        raise ValueError(f"cannot fit example into max_length={self.max_length}: {example!r}")

    def _shorten(self, example, text, spans, ids, offsets, excess) -> Example:
        """Drop the last ``excess`` tokens of the example's longest text field."""

        def field_tokens(name: str) -> list[int]:
            start, end = spans[name]
            if offsets is None:
                return list(range(len(self._tokenize(text[start:end])[0])))
            return [i for i, (s, e) in enumerate(offsets) if s >= start and e <= end and e > s]

        counts = {name: field_tokens(name) for name in spans}
        name = max(counts, key=lambda n: len(counts[n]))
        start, end = spans[name]
        toks = counts[name]
        if len(toks) <= excess:
            raise ValueError(
                f"example does not fit max_length={self.max_length} even with an empty "
                f"{name}: {example!r}"
            )
        if offsets is None:
            keep = math.floor((end - start) * (len(toks) - excess) / len(toks))
        else:
            keep = offsets[toks[len(toks) - excess]][0] - start
        current = text[start:end]
        return dataclasses.replace(example, **{name: current[:keep]})

    def _rows(self, examples: Sequence[Example]) -> list[tuple[list[int], list[int] | None]]:
        """Each example's token ids (and token type ids, where the tokenizer makes them),
        cached: a run encodes the same few-shot examples thousands of times, and tokenising
        them costs more host time than a small model's forward."""
        missing = [ex for ex in dict.fromkeys(examples) if ex not in self._row_cache]
        if missing:
            if len(self._row_cache) + len(missing) > ROW_CACHE_SIZE:
                self._row_cache.clear()
            if self.kind == "encoder":
                self._row_cache.update(zip(missing, self._encoder_rows(missing), strict=True))
            else:
                self._row_cache.update((ex, (self._prompt_ids(ex), None)) for ex in missing)
        return [self._row_cache[ex] for ex in examples]

    def _encoder_rows(
        self, examples: Sequence[Example]
    ) -> list[tuple[list[int], list[int] | None]]:
        fields = self.task.text_fields
        kw = {"truncation": True, "max_length": self.max_length}
        if "text_b" in fields:
            for ex in examples:
                if ex.text_b is None:
                    raise ValueError(f"task {self.task.name!r} needs text_b: {ex!r}")
            enc = self.tokenizer(
                [ex.text_a for ex in examples], [ex.text_b for ex in examples], **kw
            )
        else:
            enc = self.tokenizer([ex.text_a for ex in examples], **kw)
        types = enc.get("token_type_ids") or [None] * len(examples)
        return list(zip(enc["input_ids"], types, strict=True))

    def _description_rows(self) -> list[tuple[list[int], list[int] | None]]:
        """The label descriptions' rows, appended to every encoder batch (tokenised once)."""
        if self._descriptions is None:
            kw = {"truncation": True, "max_length": self.max_length}
            desc = self.tokenizer(list(self.descriptions), **kw)
            types = desc.get("token_type_ids") or [None] * len(desc["input_ids"])
            self._descriptions = list(zip(desc["input_ids"], types, strict=True))
        return self._descriptions

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
        examples = list(examples)
        if not examples:
            raise ValueError("encode needs at least one example")
        for ex in examples:
            if not 0 <= ex.label < self.num_labels:
                raise ValueError(f"label {ex.label} outside 0..{self.num_labels - 1}: {ex!r}")
        rows = self._rows(examples)
        if self.kind == "encoder":
            rows = rows + self._description_rows()
        ids = [r for r, _ in rows]
        longest = max(len(r) for r in ids)
        width = max(
            longest, min(-(-longest // self.pad_multiple) * self.pad_multiple, self.max_length)
        )
        input_ids = torch.full((len(ids), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, r in enumerate(ids):
            input_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            attention_mask[i, : len(r)] = 1
        token_type_ids = None
        if all(t is not None for _, t in rows):
            token_type_ids = torch.zeros((len(ids), width), dtype=torch.long)
            for i, (_, t) in enumerate(rows):
                token_type_ids[i, : len(t)] = torch.tensor(t, dtype=torch.long)
        n = len(examples)
        if self.kind == "mlm":
            is_mask = input_ids[:n] == self.tokenizer.mask_token_id
            counts = is_mask.sum(dim=1)
            if not torch.all(counts == 1):
                bad = int(torch.nonzero(counts != 1)[0, 0])
                raise ValueError(
                    f"row {bad} has {int(counts[bad])} mask tokens after tokenisation: "
                    f"{examples[bad]!r}"
                )
            positions = is_mask.long().argmax(dim=1)
        else:
            positions = attention_mask[:n].sum(dim=1) - 1
        device = self.device
        return Batch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            labels=torch.tensor([ex.label for ex in examples], dtype=torch.long),
            positions=positions,
            num_examples=n,
            rows_per_copy=len(ids),
            token_type_ids=token_type_ids,
        ).to(device)

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
        return self.model.base_model(**kwargs).last_hidden_state

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
