"""Examples into token rows, and token rows into right-padded batches (:class:`Batch`).

What a row holds depends on the model's kind (:mod:`zofast.scoring` says how each is scored):
the task template rendered with the mask token (``"mlm"``) or up to ``{mask}`` (``"causal"``),
truncated to fit; or the raw text fields (``"encoder"``), with the label descriptions' rows
appended to every batch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .data import Example
from .models import LoadedModel
from .tasks import Task

__all__ = ["Batch", "ExampleTokenizer"]

ROW_CACHE_SIZE = 200_000
"""Examples whose token rows an :class:`ExampleTokenizer` keeps (emptied when full: the bound is
memory)."""


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
        num_copies: how many stacked copies (1 from :meth:`zofast.scoring.Scorer.encode`).
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


class ExampleTokenizer:
    """Turns examples into token rows, and rows into batches, for one model kind and one task.

    Args:
        loaded: the output of :func:`zofast.models.load_model` (its tokenizer, kind and name).
        task: the task.
        max_length: longest row in tokens, special tokens included (capped at the tokenizer's
            ``model_max_length``); see :class:`~zofast.scoring.Scorer`.
        pad_multiple: a batch's width is its longest row rounded up to a multiple of this (at
            most ``max_length``); see :class:`~zofast.scoring.Scorer`.
    """

    def __init__(
        self, loaded: LoadedModel, task: Task, *, max_length: int, pad_multiple: int
    ) -> None:
        self.tokenizer = loaded.tokenizer
        self.kind = loaded.kind
        self.task = task
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
            if len(self.descriptions) != self.task.num_labels:
                raise ValueError("one label description per class is needed")
        else:
            raise ValueError(f"unknown model kind {self.kind!r}")

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
        """Tokenise examples into one right-padded batch on the CPU.

        Args:
            examples: :class:`~zofast.data.Example` objects (labels must be valid class ids).

        Returns:
            A :class:`Batch` with ``num_copies=1``.
        """
        examples = list(examples)
        if not examples:
            raise ValueError("encode needs at least one example")
        for ex in examples:
            if not 0 <= ex.label < self.task.num_labels:
                raise ValueError(f"label {ex.label} outside 0..{self.task.num_labels - 1}: {ex!r}")
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
        return Batch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            labels=torch.tensor([ex.label for ex in examples], dtype=torch.long),
            positions=positions,
            num_examples=n,
            rows_per_copy=len(ids),
            token_type_ids=token_type_ids,
        )
