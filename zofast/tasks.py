"""Prompt tasks: a template, label words for language models and label descriptions for encoders.

Template syntax
---------------
A template is a plain string with placeholders in braces:

* ``{text_a}`` and ``{text_b}``: the example's text fields (``text_b`` only for sentence pairs);
* ``{mask}``: where the label word goes (the mask token for masked LMs; for causal LMs the prompt
  stops there and the label word is scored as the next token);
* modifiers after a bar change a text field: ``{text_a|strip_punct}`` drops trailing punctuation,
  ``{text_b|lower_first}`` lowercases the first character, ``{text_a|upper_first}`` uppercases it;
  several can be chained, e.g. ``{text_b|strip_punct|lower_first}``;
* ``{{`` and ``}}`` are literal braces.

Text fields are stripped of surrounding whitespace before they are inserted; everything else is
kept verbatim, including the spaces around ``{mask}``: ``"{text_a} It was {mask}."`` scores the
label word *with* a leading space (`` great`` for BPE vocabularies), as LM-BFF does.

Which model kind uses what (see :mod:`zofast.scoring`):

* masked LMs: ``template`` and ``label_words``;
* causal LMs: ``causal_template`` and ``causal_label_words`` when set, else ``template`` and
  ``label_words``; the text after ``{mask}`` is ignored and no text field may follow it;
* encoders without an LM head: the raw text fields (a pair for two-field tasks) and
  ``label_descriptions``; when those are not given they are derived from the template by dropping
  the text fields and putting each label word in place of ``{mask}``
  (``"{text_a} It was {mask}."`` gives ``"It was great."``).
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Task", "get_task", "list_tasks", "TEXT_FIELDS", "MODIFIERS"]

TEXT_FIELDS = ("text_a", "text_b")

_PUNCT = string.punctuation + " \t"


def _strip_punct(text: str) -> str:
    return text.rstrip(_PUNCT)


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def _upper_first(text: str) -> str:
    return text[:1].upper() + text[1:]


MODIFIERS = {
    "strip_punct": _strip_punct,
    "lower_first": _lower_first,
    "upper_first": _upper_first,
}

_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")


@dataclass(frozen=True)
class _Segment:
    kind: str
    text: str = ""
    modifiers: tuple[str, ...] = ()


def _parse_template(template: str) -> tuple[_Segment, ...]:
    """Split a template into literal, field and mask segments, checking every placeholder."""
    if not isinstance(template, str) or not template.strip():
        raise ValueError("template must be a non-empty string")
    segments: list[_Segment] = []
    literal: list[str] = []
    pos = 0
    for match in _TOKEN.finditer(template):
        literal.append(template[pos : match.start()])
        pos = match.end()
        token = match.group(0)
        if token in ("{{", "}}"):
            literal.append(token[0])
            continue
        if match.group(1) is None:
            raise ValueError(
                f"unbalanced brace at position {match.start()} in template {template!r}; "
                "write {{ or }} for a literal brace"
            )
        if literal:
            segments.append(_Segment("literal", "".join(literal)))
            literal = []
        parts = [p.strip() for p in match.group(1).split("|")]
        name, modifiers = parts[0], tuple(parts[1:])
        if name == "mask":
            if modifiers:
                raise ValueError(f"{{mask}} takes no modifiers in template {template!r}")
            segments.append(_Segment("mask"))
        elif name in TEXT_FIELDS:
            for mod in modifiers:
                if mod not in MODIFIERS:
                    raise ValueError(
                        f"unknown modifier {mod!r} in template {template!r}; "
                        f"known: {', '.join(sorted(MODIFIERS))}"
                    )
            segments.append(_Segment("field", name, modifiers))
        else:
            raise ValueError(
                f"unknown placeholder {{{name}}} in template {template!r}; "
                "use {text_a}, {text_b} or {mask}"
            )
    literal.append(template[pos:])
    if "".join(literal):
        segments.append(_Segment("literal", "".join(literal)))
    n_mask = sum(s.kind == "mask" for s in segments)
    if n_mask > 1:
        raise ValueError(f"template {template!r} has {n_mask} {{mask}} placeholders; at most one")
    fields = {s.text for s in segments if s.kind == "field"}
    if "text_a" not in fields:
        raise ValueError(f"template {template!r} must contain {{text_a}}")
    return tuple(segments)


def _field_text(example: Any, name: str, modifiers: Sequence[str]) -> str:
    value = getattr(example, name, None)
    if value is None:
        raise ValueError(f"the template uses {{{name}}} but the example has no {name}: {example!r}")
    text = str(value).strip()
    for mod in modifiers:
        text = MODIFIERS[mod](text)
    return text


def _words(value: Sequence[str] | None, what: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        raise TypeError(f"{what} must be a sequence of strings, not a single string {value!r}")
    words = tuple(value)
    for w in words:
        if not isinstance(w, str) or not w.strip():
            raise ValueError(f"{what} must be non-empty strings, got {w!r}")
    return words


@dataclass(frozen=True)
class Task:
    """A classification task phrased as a prompt.

    Args:
        name: short identifier (``get_task`` looks built-ins up by it, case-insensitively).
        template: prompt template for masked LMs (and causal LMs unless ``causal_template`` is
            set); see the module docstring for the syntax.
        label_words: one word per class, index = label id; the first token of each is scored.
        label_descriptions: one sentence per class, embedded by encoders without an LM head;
            derived from ``template`` and ``label_words`` when not given.
        causal_template: template used for causal LMs instead of ``template``; ``{mask}`` must be
            its last placeholder.
        causal_label_words: label words used with ``causal_template``.
        label_names: human-readable class names, for reports only.

    Example:
        >>> task = Task("sentiment", "{text_a} It was {mask}.", ("terrible", "great"))
        >>> task.num_labels, task.text_fields
        (2, ('text_a',))
    """

    name: str
    template: str
    label_words: tuple[str, ...] | None = None
    label_descriptions: tuple[str, ...] | None = None
    causal_template: str | None = None
    causal_label_words: tuple[str, ...] | None = None
    label_names: tuple[str, ...] | None = None
    _segments: tuple[_Segment, ...] = field(init=False, repr=False, compare=False)
    _causal_segments: tuple[_Segment, ...] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError("task name must be a non-empty string")
        words = _words(self.label_words, "label_words")
        descriptions = _words(self.label_descriptions, "label_descriptions")
        causal_words = _words(self.causal_label_words, "causal_label_words")
        names = _words(self.label_names, "label_names")
        object.__setattr__(self, "label_words", words)
        object.__setattr__(self, "label_descriptions", descriptions)
        object.__setattr__(self, "causal_label_words", causal_words)
        object.__setattr__(self, "label_names", names)
        if words is None and descriptions is None:
            raise ValueError(f"task {self.name!r} needs label_words or label_descriptions")
        segments = _parse_template(self.template)
        object.__setattr__(self, "_segments", segments)
        counts = {len(x) for x in (words, descriptions, causal_words, names) if x is not None}
        if len(counts) != 1:
            raise ValueError(
                f"task {self.name!r}: label_words, label_descriptions, causal_label_words and "
                "label_names must all have one entry per class"
            )
        if self.num_labels < 2:
            raise ValueError(f"task {self.name!r} needs at least two labels")
        causal_segments = None
        if self.causal_template is not None:
            causal_segments = _parse_template(self.causal_template)
            if not any(s.kind == "mask" for s in causal_segments):
                raise ValueError(f"causal_template {self.causal_template!r} needs a {{mask}}")
            fields = {s.text for s in segments if s.kind == "field"}
            causal_fields = {s.text for s in causal_segments if s.kind == "field"}
            if fields != causal_fields:
                raise ValueError(
                    f"task {self.name!r}: template and causal_template use different text fields"
                )
        object.__setattr__(self, "_causal_segments", causal_segments)

    @classmethod
    def custom(
        cls,
        template: str,
        label_words: Sequence[str] | None = None,
        *,
        name: str = "custom",
        label_descriptions: Sequence[str] | None = None,
        causal_template: str | None = None,
        causal_label_words: Sequence[str] | None = None,
        label_names: Sequence[str] | None = None,
    ) -> Task:
        """Build a task from a template string.

        Args:
            template: e.g. ``"{text_a} It was {mask}."`` (syntax in the module docstring).
            label_words: one word per class, label id = position in the list.
            name: identifier used in reports.
            label_descriptions: sentences for encoder models, one per class (optional).
            causal_template: separate template for causal LMs (optional).
            causal_label_words: label words for ``causal_template`` (optional).
            label_names: human-readable class names (optional).

        Returns:
            A validated :class:`Task`.

        Example:
            >>> t = Task.custom("{text_a|strip_punct}? {mask}, {text_b|lower_first}", ["Yes", "No"])
            >>> t.text_fields
            ('text_a', 'text_b')
        """
        return cls(
            name=name,
            template=template,
            label_words=label_words,
            label_descriptions=label_descriptions,
            causal_template=causal_template,
            causal_label_words=causal_label_words,
            label_names=label_names,
        )

    @property
    def num_labels(self) -> int:
        """Number of classes."""
        return len(self.label_words if self.label_words is not None else self.label_descriptions)

    @property
    def text_fields(self) -> tuple[str, ...]:
        """The example fields the template reads, in ``TEXT_FIELDS`` order."""
        used = {s.text for s in self._segments if s.kind == "field"}
        return tuple(f for f in TEXT_FIELDS if f in used)

    def has_mask(self, kind: str = "mlm") -> bool:
        """Whether the template used for ``kind`` (``"mlm"`` or ``"causal"``) has ``{mask}``.

        Args:
            kind: ``"mlm"`` or ``"causal"``.

        Returns:
            ``True`` if the template contains ``{mask}``.

        Example:
            >>> Task.custom("{text_a}", label_descriptions=["bad", "good"]).has_mask()
            False
        """
        return any(s.kind == "mask" for s in self._segments_for(kind))

    def words_for(self, kind: str) -> tuple[str, ...]:
        """Label words used for a model kind (``"mlm"`` or ``"causal"``).

        Args:
            kind: ``"mlm"`` or ``"causal"``.

        Returns:
            One word per class.

        Example:
            >>> get_task("rte").words_for("causal")
            ('Yes', 'No')
        """
        if kind == "causal" and self.causal_label_words is not None:
            return self.causal_label_words
        if self.label_words is None:
            raise ValueError(
                f"task {self.name!r} has only label_descriptions; {kind} models need label_words"
            )
        return self.label_words

    def _segments_for(self, kind: str) -> tuple[_Segment, ...]:
        if kind == "causal" and self._causal_segments is not None:
            return self._causal_segments
        return self._segments

    def template_for(self, kind: str) -> str:
        """The template string used for a model kind.

        Args:
            kind: ``"mlm"`` or ``"causal"``.

        Returns:
            ``causal_template`` for causal models when set, else ``template``.

        Example:
            >>> get_task("sst-2").template_for("causal")
            '{text_a} It was {mask}'
        """
        if kind == "causal" and self.causal_template is not None:
            return self.causal_template
        return self.template

    def render(
        self, example: Any, mask_token: str, *, kind: str = "mlm"
    ) -> tuple[str, dict[str, tuple[int, int]]]:
        """Fill the template with an example.

        For ``kind="causal"`` the text stops at ``{mask}`` (spaces and tabs before it are dropped,
        newlines kept) and ``mask_token`` is not used; for ``kind="mlm"`` spaces and tabs before
        ``{mask}`` are dropped and ``mask_token`` is put in its place (the label word's leading
        space is part of the label token, see :meth:`label_context`).

        Args:
            example: any object with ``text_a`` (and ``text_b`` if the template uses it).
            mask_token: the tokenizer's mask token string.
            kind: ``"mlm"`` or ``"causal"``.

        Returns:
            ``(text, spans)`` where ``spans[field] = (start, end)`` character offsets of each text
            field in ``text`` (used for truncation).

        Example:
            >>> from zofast.data import Example
            >>> get_task("sst-2").render(Example("a fine film", 1), "<mask>")[0]
            'a fine film It was<mask>.'
        """
        segments = self._segments_for(kind)
        if not any(s.kind == "mask" for s in segments):
            raise ValueError(
                f"template {self.template_for(kind)!r} of task {self.name!r} has no {{mask}}; "
                f"{kind} models need one"
            )
        out: list[str] = []
        spans: dict[str, tuple[int, int]] = {}
        length = 0
        for index, seg in enumerate(segments):
            if seg.kind == "mask":
                text = "".join(out).rstrip(" \t")
                if kind == "causal":
                    if any(s.kind == "field" for s in segments[index:]):
                        raise ValueError(
                            f"template {self.template_for(kind)!r} of task {self.name!r} has a "
                            "text field after {mask}; causal models need {mask} last "
                            "(set causal_template)"
                        )
                    return text, spans
                out, length = [text, mask_token], len(text) + len(mask_token)
                continue
            piece = (
                seg.text if seg.kind == "literal" else _field_text(example, seg.text, seg.modifiers)
            )
            if seg.kind == "field":
                spans[seg.text] = (length, length + len(piece))
            out.append(piece)
            length += len(piece)
        return "".join(out), spans

    def label_context(self, kind: str) -> tuple[str, str]:
        """Text before ``{mask}`` (dummy fields) and the whitespace before the label word.

        The label token of each word is the first token that tokenizing ``prefix + space + word``
        adds after ``prefix``; at the very start of the text the space is ``" "`` (as LM-BFF).

        Args:
            kind: ``"mlm"`` or ``"causal"``.

        Returns:
            ``(prefix, space)``.

        Example:
            >>> get_task("sst-2").label_context("mlm")
            ('Text It was', ' ')
        """
        out: list[str] = []
        for seg in self._segments_for(kind):
            if seg.kind == "mask":
                raw = "".join(out)
                prefix = raw.rstrip(" \t")
                return prefix, (raw[len(prefix) :] if prefix else " ")
            out.append(seg.text if seg.kind == "literal" else "Text")
        raise ValueError(f"template of task {self.name!r} has no {{mask}}")

    def descriptions(self) -> tuple[str, ...]:
        """Label descriptions for encoders: the given ones, or ones derived from the template.

        Returns:
            One sentence per class.

        Example:
            >>> Task.custom("{text_a} Overall: {mask}!", ["bad", "good"]).descriptions()
            ('Overall: bad!', 'Overall: good!')
        """
        if self.label_descriptions is not None:
            return self.label_descriptions
        out = []
        for word in self.label_words:
            parts = []
            for seg in self._segments:
                if seg.kind == "literal":
                    parts.append(seg.text)
                elif seg.kind == "mask":
                    parts.append(word)
            out.append(" ".join("".join(parts).split()))
        return tuple(out)


_IT_WAS = "{text_a} It was {mask}."
_THIS_IS = "{text_a} This is {mask}."
_NLI = "{text_a|strip_punct}? {mask}, {text_b|lower_first}"
_PARA = "{text_a} {mask}, {text_b|lower_first}"
_RTE_CAUSAL = '{text_a}\nDoes this mean that "{text_b}" is true? Yes or No?\n{mask}'
_CB_CAUSAL = 'Suppose {text_a} Can we infer that "{text_b}"? Yes, No, or Maybe?\n{mask}'
_SAME_CAUSAL = "{text_a}\n{text_b}\nDo both %s mean the same thing? Yes or No?\n{mask}"
_NEG_POS = ("negative", "positive")
_NLI3 = ("contradiction", "entailment", "neutral")
_NLI3_DESC = ("No, that is not true.", "Yes, that is true.", "Maybe that is true.")
_SAME_DESC = ("No, they mean different things.", "Yes, they mean the same thing.")

# LM-BFF's manual prompts (Gao et al. 2021, Table 1; run_experiment.sh) in the order of their
# label ids; causal prompts as MeZO's OPT templates phrase them where it has one (SST-2, RTE, CB
# for three-way NLI), else zofast's in the same style. Columns: name, template, label words,
# label names (the raw label values of the data files), causal template, label descriptions
# (None: derived from the template).
_TABLE = (
    ("SST-2", _IT_WAS, ("terrible", "great"), _NEG_POS, "{text_a} It was {mask}", None),
    (
        "sst-5",
        _IT_WAS,
        ("terrible", "bad", "okay", "good", "great"),
        ("very negative", "negative", "neutral", "positive", "very positive"),
        "{text_a} It was {mask}",
        None,
    ),
    ("mr", _IT_WAS, ("terrible", "great"), _NEG_POS, "{text_a} It was {mask}", None),
    ("cr", _IT_WAS, ("terrible", "great"), _NEG_POS, "{text_a} It was {mask}", None),
    ("mpqa", _IT_WAS, ("terrible", "great"), _NEG_POS, "{text_a} It was {mask}", None),
    (
        "subj",
        _THIS_IS,
        ("subjective", "objective"),
        ("subjective", "objective"),
        "{text_a} This is {mask}",
        None,
    ),
    (
        "trec",
        "{mask}: {text_a}",
        ("Description", "Entity", "Expression", "Human", "Location", "Number"),
        ("DESC", "ENTY", "ABBR", "HUM", "LOC", "NUM"),
        "{text_a} Answer type: {mask}",
        (
            "It asks for a description.",
            "It asks for an entity.",
            "It asks for an abbreviation.",
            "It asks for a person.",
            "It asks for a location.",
            "It asks for a number.",
        ),
    ),
    (
        "CoLA",
        _THIS_IS,
        ("incorrect", "correct"),
        ("unacceptable", "acceptable"),
        "{text_a} This is {mask}",
        None,
    ),
    ("MNLI", _NLI, ("No", "Yes", "Maybe"), _NLI3, _CB_CAUSAL, _NLI3_DESC),
    ("MNLI-mm", _NLI, ("No", "Yes", "Maybe"), _NLI3, _CB_CAUSAL, _NLI3_DESC),
    ("SNLI", _NLI, ("No", "Yes", "Maybe"), _NLI3, _CB_CAUSAL, _NLI3_DESC),
    (
        "QNLI",
        _NLI,
        ("Yes", "No"),
        ("entailment", "not_entailment"),
        "Question: {text_a}\nSentence: {text_b}\nDoes the sentence answer the question? "
        "Yes or No?\n{mask}",
        ("Yes, the sentence answers the question.", "No, it does not answer the question."),
    ),
    (
        "RTE",
        _NLI,
        ("Yes", "No"),
        ("entailment", "not_entailment"),
        _RTE_CAUSAL,
        ("Yes, that is true.", "No, that is not true."),
    ),
    (
        "MRPC",
        _PARA,
        ("No", "Yes"),
        ("not_equivalent", "equivalent"),
        _SAME_CAUSAL % "sentences",
        _SAME_DESC,
    ),
    (
        "QQP",
        _PARA,
        ("No", "Yes"),
        ("not_duplicate", "duplicate"),
        _SAME_CAUSAL % "questions",
        ("No, they ask different things.", "Yes, they ask the same thing."),
    ),
    (
        "STS-B",
        _PARA,
        ("No", "Yes"),
        ("dissimilar", "similar"),
        _SAME_CAUSAL % "sentences",
        _SAME_DESC,
    ),
    ("demo", _IT_WAS, ("terrible", "great"), _NEG_POS, "{text_a} It was {mask}", None),
)

_BUILTIN = {
    name.lower(): Task(
        name=name,
        template=template,
        label_words=words,
        label_names=names,
        causal_template=causal,
        label_descriptions=descriptions,
    )
    for name, template, words, names, causal, descriptions in _TABLE
}
_ALIASES = {
    **{key.replace("-", ""): key for key in _BUILTIN},
    "sst": "sst-2",
    "demo-sentiment": "demo",
}


def _key(name: str) -> str:
    key = name.strip().lower().replace("_", "-")
    return _ALIASES.get(key, _ALIASES.get(key.replace("-", ""), key))


def list_tasks() -> list[str]:
    """Names of the built-in tasks.

    Returns:
        Sorted names accepted by :func:`get_task`.

    Example:
        >>> list_tasks()[:6]
        ['cola', 'cr', 'demo', 'mnli', 'mnli-mm', 'mpqa']
    """
    return sorted(_BUILTIN)


def get_task(name: str | Task) -> Task:
    """Look a built-in task up by name (case-insensitive; ``sst2`` = ``SST-2``).

    The built-ins are LM-BFF's few-shot suite (SST-2, SST-5, MR, CR, MPQA, Subj, TREC, CoLA,
    MNLI, MNLI-mm, SNLI, QNLI, RTE, MRPC, QQP, STS-B binned at 2.5) with LM-BFF's manual templates
    and label words for masked LMs (e.g. SST-2 ``"{text_a} It was {mask}."``, terrible/great;
    RTE ``"{text_a|strip_punct}? {mask}, {text_b|lower_first}"``, Yes/No); causal templates
    follow MeZO's OPT prompts where it has one. docs/tasks.md has the whole table. ``demo`` is
    the sentiment task of :func:`zofast.data.load_demo`.

    Args:
        name: task name, or a :class:`Task` (returned unchanged).

    Returns:
        The :class:`Task`.

    Example:
        >>> get_task("SST-2").label_words
        ('terrible', 'great')
    """
    if isinstance(name, Task):
        return name
    if not isinstance(name, str):
        raise TypeError(f"task must be a name or a Task, got {type(name).__name__}")
    key = _key(name)
    if key not in _BUILTIN:
        raise ValueError(f"unknown task {name!r}; built-in tasks: {', '.join(list_tasks())}")
    return _BUILTIN[key]
