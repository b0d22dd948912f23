"""Column layouts of csv / tsv data files: LM-BFF's k-shot folders and any layout given by flags.

A :class:`Layout` says where a task's text fields and label are in its files. Every task of
LM-BFF's suite has one, as LM-BFF writes its k-shot folders (``tools/generate_k_shot_data.py``)
and reads them (``src/processors.py``):

* ``SST-2``, ``sst-5``, ``mr``, ``cr``, ``mpqa``, ``subj``, ``trec``: headerless csv
  ``label,text`` (SST-2: GLUE tsv with header ``sentence, label``);
* ``CoLA``: GLUE's headerless tsv ``source, label, original label, sentence``;
* the pair tasks: GLUE tsv with a header, columns found by name (``sentence1``/``sentence2``,
  ``question``/``sentence``, ``question1``/``question2``, ``#1 String``/``#2 String``) and the
  label in ``label``, ``gold_label``, ``is_duplicate``, ``Quality`` or ``score``;
* ``MNLI``: dev and test files ``dev_matched.tsv`` / ``test_matched.tsv`` (``MNLI-mm``:
  ``test_mismatched.tsv``);
* ``STS-B``: the similarity score binned as LM-BFF samples its k-shot splits: class 1 ("Yes")
  when the score is >= 2.5, else class 0 ("No").

Any other layout is described by the overrides of :func:`resolve_layout` (on the command line
``--text-columns``, ``--label-column``, ``--header/--no-header`` and ``--label-map``): columns
by header name or 0-based position (negative counts from the end). Files of a task without a
built-in layout are read by name when their first row is a header of known column names
(``text``, ``sentence``, ``sentence1``, ``label``, ...), and as LM-BFF's ``label,text`` when
they are headerless with two columns.

Label values become class ids through, in order: the label map, the layout's threshold, the
task's ``label_names`` (``entailment`` → 0 for RTE), or the value itself as an integer id.
"""

from __future__ import annotations

import csv
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .tasks import Task

__all__ = [
    "Layout",
    "LAYOUTS",
    "KNOWN_COLUMNS",
    "COLUMN_HINT",
    "resolve_layout",
    "parse_label_map",
    "read_table",
]

Column = int | str

#: What to pass when columns cannot be found: the command-line flags (Python spelling added).
COLUMN_HINT = (
    "name the columns with --text-columns COL [COL] and --label-column COL (header names or "
    "0-based positions; --no-header for files without a header row) and map label values with "
    "--label-map VALUE=ID ... (Python: {python})"
)
PYTHON_COLUMNS = "text_columns=, label_column=, header=, label_map="

#: Header names tried, in order, for each role when a layout does not name its columns.
KNOWN_COLUMNS = {
    "text_a": ("text_a", "sentence", "sentence1", "text", "premise", "question", "question1",
               "#1 String", "content"),
    "text_b": ("text_b", "sentence2", "hypothesis", "question2", "#2 String"),
    "label": ("label", "labels", "gold_label", "coarse_label", "label-coarse", "is_duplicate",
              "Quality", "score"),
}  # fmt: skip

_HINT = COLUMN_HINT.format(python=PYTHON_COLUMNS)
_MAP = "map label values to class ids with --label-map VALUE=ID (Python: label_map=)"
SPLIT_FILES = (("train", "train"), ("dev", "dev"), ("test", "test"))


@dataclass(frozen=True)
class Layout:
    """Where the examples of a task are in its csv / tsv files.

    Args:
        ext: ``"csv"`` (comma-separated, quoted as pandas writes it) or ``"tsv"``
            (tab-separated, no quoting, as GLUE).
        header: the first row names the columns (and is not an example); None = decide from
            the first row (a header when one of its cells is a known column name).
        text: the column of ``text_a`` and, for pair tasks, of ``text_b``: header names or
            0-based positions; ``()`` = find them by name (:data:`KNOWN_COLUMNS`).
        label: the label column, a name or a position; None = find it by name.
        files: ``(split, file stem)`` pairs, e.g. MNLI's ``("dev", "dev_matched")``.
        threshold: for score labels (STS-B): class 1 when the value is >= threshold, else 0.

    Example:
        >>> LAYOUTS["mr"]
        Layout(ext='csv', header=False, text=(1,), label=0, files=..., threshold=None)
    """

    ext: str = "csv"
    header: bool | None = None
    text: tuple[Column, ...] = ()
    label: Column | None = None
    files: tuple[tuple[str, str], ...] = SPLIT_FILES
    threshold: float | None = None

    def __post_init__(self) -> None:
        if self.ext not in ("csv", "tsv"):
            raise ValueError(f"layout ext must be 'csv' or 'tsv', got {self.ext!r}")
        if len(self.text) > 2:
            raise ValueError(f"at most two text columns (text_a, text_b), got {list(self.text)}")


_LABEL_TEXT = Layout("csv", False, (1,), 0)
_GLUE = Layout("tsv", True, ("sentence1", "sentence2"), "label")
_NLI3 = dataclasses.replace(_GLUE, label="gold_label")

#: The k-shot layout of every LM-BFF task, keyed by lower-case task name.
LAYOUTS: dict[str, Layout] = {
    "sst-2": Layout("tsv", True, ("sentence",), "label"),
    **dict.fromkeys(("sst-5", "mr", "cr", "mpqa", "subj", "trec"), _LABEL_TEXT),
    "cola": Layout("tsv", False, (3,), 1),
    "mnli": dataclasses.replace(
        _NLI3, files=(("train", "train"), ("dev", "dev_matched"), ("test", "test_matched"))
    ),
    "mnli-mm": dataclasses.replace(
        _NLI3, files=(("train", "train"), ("dev", "dev_matched"), ("test", "test_mismatched"))
    ),
    "snli": _NLI3,
    "qnli": dataclasses.replace(_GLUE, text=("question", "sentence")),
    "rte": _GLUE,
    "mrpc": Layout("tsv", True, ("#1 String", "#2 String"), "Quality"),
    "qqp": Layout("tsv", True, ("question1", "question2"), "is_duplicate"),
    "sts-b": dataclasses.replace(_GLUE, label="score", threshold=2.5),
}


def _column(value: Column) -> Column:
    """A column given on the command line: digits (with an optional minus) are a position."""
    if isinstance(value, bool):
        raise TypeError(f"a column is a name or a position, got {value!r}")
    if isinstance(value, int):
        return value
    text = str(value).strip()
    if text.lstrip("-").isdigit():
        return int(text)
    if not text:
        raise ValueError("a column name must not be empty")
    return text


def resolve_layout(
    task: Task,
    ext: str | None = None,
    *,
    text_columns: Sequence[Column] | None = None,
    label_column: Column | None = None,
    header: bool | None = None,
) -> Layout:
    """The layout to read ``task``'s files with: its built-in one, changed by the overrides.

    Args:
        task: the task; its name picks the built-in layout, its text fields say how many text
            columns are needed.
        ext: ``"csv"`` or ``"tsv"``, the extension of the files found (None = the layout's).
        text_columns: columns of ``text_a`` (and ``text_b``): names or 0-based positions.
        label_column: the label column: a name or a 0-based position.
        header: whether the files have a header row; None = the layout's, or a header when a
            column is given by name.

    Returns:
        A :class:`Layout`.

    Raises:
        ValueError: more or fewer text columns than the task reads.

    Example:
        >>> resolve_layout(get_task("mr"), text_columns=["review"], label_column="stars").header
        True
    """
    base = LAYOUTS.get(task.name.strip().lower(), Layout())
    changes: dict = {}
    if ext is not None and ext != base.ext:
        changes["ext"] = ext
    if text_columns is not None:
        columns = tuple(_column(c) for c in text_columns)
        if len(columns) != len(task.text_fields):
            raise ValueError(
                f"task {task.name} reads {len(task.text_fields)} text field(s) "
                f"({', '.join(task.text_fields)}) but {len(columns)} text column(s) were given: "
                f"{list(columns)}"
            )
        changes["text"] = columns
    if label_column is not None:
        changes["label"] = _column(label_column)
    if header is not None:
        changes["header"] = bool(header)
    elif any(isinstance(c, str) for c in (*changes.get("text", ()), changes.get("label"))):
        changes["header"] = True
    return dataclasses.replace(base, **changes) if changes else base


def parse_label_map(pairs: Mapping | Sequence[str] | None, task: Task) -> dict[str, int] | None:
    """Label values to class ids, from a mapping or ``"VALUE=ID"`` strings.

    An ID is a class id (``0 .. num_labels - 1``), a label name or a label word of the task.

    Args:
        pairs: ``{"neg": 0, "pos": "great"}`` or ``["neg=0", "pos=great"]``; None = no map.
        task: the task whose classes the ids name.

    Returns:
        ``{value: class id}`` with string keys, or None.

    Raises:
        ValueError: a malformed pair or an ID that names no class.

    Example:
        >>> parse_label_map(["neg=terrible", "pos=1"], get_task("sst-2"))
        {'neg': 0, 'pos': 1}
    """
    if pairs is None:
        return None
    if isinstance(pairs, str):
        raise TypeError(f"label_map must be a mapping or a list of VALUE=ID, not {pairs!r}")
    if not isinstance(pairs, Mapping):
        items = []
        for pair in pairs:
            value, sep, target = str(pair).partition("=")
            if not sep or not value.strip() or not target.strip():
                raise ValueError(f"label map entry {pair!r} is not VALUE=ID (e.g. pos=1)")
            items.append((value, target))
        pairs = dict(items)
    names = {}
    for words in (task.label_words, task.label_names):
        names.update({w: i for i, w in enumerate(words or ())})
    out = {}
    for value, target in pairs.items():
        key = str(target).strip() if isinstance(target, str) else target
        if isinstance(key, str) and key.lstrip("-").isdigit():
            key = int(key)
        class_id = key if isinstance(key, int) and not isinstance(key, bool) else names.get(key)
        if class_id is None or not 0 <= class_id < task.num_labels:
            raise ValueError(
                f"label map {value}={target}: {target!r} is not a class of task {task.name} "
                f"(ids 0..{task.num_labels - 1} or {', '.join(map(str, names))})"
            )
        out[str(value).strip()] = class_id
    return out


class _Labels:
    """Turns raw label values of one file into class ids (see the module docstring)."""

    def __init__(self, task: Task, layout: Layout, label_map: dict[str, int] | None):
        self.n = task.num_labels
        self.map = label_map
        self.threshold = layout.threshold
        self.names = {name: i for i, name in enumerate(task.label_names or ())}

    def __call__(self, raw: str, where: str) -> int:
        value = raw.strip()
        if self.map is not None:
            if value not in self.map:
                raise ValueError(
                    f"{where}: label {value!r} is not in the label map {sorted(self.map)}"
                )
            return self.map[value]
        if self.threshold is not None:
            try:
                return int(float(value) >= self.threshold)
            except ValueError:
                raise ValueError(f"{where}: score {value!r} is not a number") from None
        if value in self.names:
            return self.names[value]
        try:
            label = int(value)
        except ValueError:
            known = f" or one of {list(self.names)}" if self.names else ""
            raise ValueError(f"{where}: label {value!r} is not an integer{known}; {_MAP}") from None
        if not 0 <= label < self.n:
            raise ValueError(f"{where}: label {label} outside 0..{self.n - 1}; {_MAP}")
        return label


def _read_rows(path: Path, ext: str) -> list[list[str]]:
    quoting = csv.QUOTE_NONE if ext == "tsv" else csv.QUOTE_MINIMAL
    delimiter = "\t" if ext == "tsv" else ","
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            return [row for row in csv.reader(f, delimiter=delimiter, quoting=quoting) if row]
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except csv.Error as error:
        raise ValueError(f"{path}: malformed {ext.upper()}: {error}") from None


def _has_header(first: list[str], layout: Layout) -> bool:
    named = {c for c in (*layout.text, layout.label) if isinstance(c, str)}
    known = {c.lower() for names in KNOWN_COLUMNS.values() for c in names}
    return any(c.strip() in named or c.strip().lower() in known for c in first)


def _positions(
    path: Path, task: Task, layout: Layout, header: list[str] | None, width: int
) -> tuple[list[int], int]:
    """Column indices of the task's text fields and of the label."""
    where = f"header {header}" if header is not None else f"a headerless file of {width} columns"

    def index(column: Column, role: str) -> int:
        if isinstance(column, int):
            if not -width <= column < width:
                raise ValueError(
                    f"{path}: {role} column {column} is outside the {width} columns; " + _HINT
                )
            return column % width
        if header is None:
            raise ValueError(f"{path}: {role} column {column!r} is a name but {where}; " + _HINT)
        if column not in header:
            raise ValueError(f"{path}: no {role} column {column!r} in {where}; " + _HINT)
        return header.index(column)

    def found(role: str) -> int | None:
        lower = [h.lower() for h in header or ()]
        return next(
            (lower.index(c.lower()) for c in KNOWN_COLUMNS[role] if c.lower() in lower), None
        )

    fields = task.text_fields
    text = list(layout.text)
    label = layout.label
    if not text and header is None and len(fields) == 1 and width == 2 and label in (None, 0):
        text, label = [1], 0
    if text:
        cols = [index(c, f) for c, f in zip(text, fields, strict=False)]
    else:
        cols = [found(f) for f in fields]
    label_col = index(label, "label") if label is not None else found("label")
    if len(cols) != len(fields) or None in cols or label_col is None:
        raise ValueError(
            f"{path}: cannot find the {' and '.join(fields)} and label columns of task "
            f"{task.name} in {where}; " + _HINT
        )
    return cols, label_col


def read_table(
    path: str | Path, task: Task, layout: Layout, label_map: dict[str, int] | None = None
) -> list:
    """Read one csv / tsv file into examples.

    Args:
        path: the file.
        task: the task (number of labels, label names, text fields).
        layout: where the columns are (:func:`resolve_layout`).
        label_map: label value → class id (:func:`parse_label_map`), applied before anything
            else.

    Returns:
        A list of :class:`zofast.data.Example`.

    Raises:
        ValueError: a missing column, a short row or a label that is not a class, naming the
            file, the line and the flags that fix it.

    Example:
        >>> read_table("mr/16-42/train.csv", get_task("mr"), LAYOUTS["mr"])[0].label
        0
    """
    from .data import Example

    path = Path(path)
    rows = _read_rows(path, layout.ext)
    if not rows:
        return []
    has_header = layout.header if layout.header is not None else _has_header(rows[0], layout)
    header = [c.strip() for c in rows[0]] if has_header else None
    body = rows[1:] if has_header else rows
    width = len(header) if header is not None else len(rows[0])
    cols, label_col = _positions(path, task, layout, header, width)
    labels = _Labels(task, layout, label_map)
    out = []
    first_line = 2 if has_header else 1
    for line, row in enumerate(body, start=first_line):
        if len(row) != width:
            sep = "tab" if layout.ext == "tsv" else "comma"
            raise ValueError(
                f"{path}:{line}: expected {width} {sep}-separated columns (as line 1), "
                f"got {len(row)}"
            )
        try:
            label = labels(row[label_col], f"{path}:{line}")
        except ValueError as error:
            if line == 1:
                raise ValueError(f"{error} (if line 1 is a header, pass --header)") from None
            raise
        texts = [row[c] for c in cols]
        out.append(Example(texts[0], label, *texts[1:]))
    return out
