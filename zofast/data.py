"""Labelled examples: LM-BFF k-shot folders, Hugging Face datasets and the bundled demo set.

All readers return :class:`Example` objects with integer labels ``0 .. num_labels - 1`` in the
order of the task's label words (see :mod:`zofast.tasks`).
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .layouts import (
    COLUMN_HINT,
    KNOWN_COLUMNS,
    LAYOUTS,
    parse_label_map,
    read_table,
    resolve_layout,
)
from .tasks import Task, get_task

__all__ = ["Example", "load_kshot", "load_hf_dataset", "load_demo", "LAYOUTS"]

SPLITS = ("train", "dev", "test")
_TABLE_EXTS = ("csv", "tsv")
_HF_EXTS = ("jsonl", "json", "parquet")


@dataclass(frozen=True)
class Example:
    """One labelled example.

    Args:
        text_a: the sentence (first sentence for pair tasks).
        label: class id, ``0 .. num_labels - 1``.
        text_b: the second sentence for pair tasks (RTE), else ``None``.

    Example:
        >>> Example("A warm, funny film.", 1)
        Example(text_a='A warm, funny film.', label=1, text_b=None)
    """

    text_a: str
    label: int
    text_b: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.text_a, str):
            raise TypeError(f"text_a must be a string, got {type(self.text_a).__name__}")
        if self.text_b is not None and not isinstance(self.text_b, str):
            raise TypeError(f"text_b must be a string or None, got {type(self.text_b).__name__}")
        if isinstance(self.label, bool) or not isinstance(self.label, int):
            raise TypeError(f"label must be an int, got {self.label!r}")


def _split_files(root: Path, task: Task) -> dict[str, Path]:
    """The file of each split: the layout's stem (MNLI: ``dev_matched``) or the split's name,
    with the layout's extension first, then csv, tsv, jsonl, json, parquet."""
    layout = LAYOUTS.get(task.name.strip().lower())
    exts = (*([layout.ext] if layout else []), *_TABLE_EXTS, *_HF_EXTS)
    stems = dict(layout.files) if layout else {}
    out = {}
    for split in SPLITS:
        names = dict.fromkeys((stems.get(split, split), split))
        path = next(
            (root / f"{n}.{e}" for e in exts for n in names if (root / f"{n}.{e}").is_file()),
            None,
        )
        if path is not None:
            out[split] = path
    return out


def load_kshot(
    folder: str | Path,
    task: str | Task,
    *,
    text_columns: Sequence[str | int] | None = None,
    label_column: str | int | None = None,
    header: bool | None = None,
    label_map: Mapping[str, Any] | Sequence[str] | None = None,
) -> dict[str, list[Example]]:
    """Read a folder of train / dev / test files, e.g. LM-BFF's ``data/k-shot/SST-2/16-42``.

    Every task of LM-BFF's suite is read in the layout LM-BFF writes (:mod:`zofast.layouts`:
    headerless ``label,text`` csv for sst-5 / mr / cr / mpqa / subj / trec, GLUE tsv for SST-2,
    CoLA and the pair tasks, MNLI's ``dev_matched`` / ``test_matched``, STS-B binned at 2.5).
    Other layouts, and tasks without a built-in one, are read from the column arguments, or by
    header names (``sentence``, ``text``, ``sentence1``, ``label``, ...). ``.jsonl``, ``.json``
    and ``.parquet`` files are read by :func:`load_hf_dataset` (columns by name only).

    Args:
        folder: the folder holding the ``train``, ``dev`` and ``test`` files.
        task: a task name (case-insensitive) or :class:`~zofast.tasks.Task`; its name picks the
            layout, its label names and words the meaning of label values.
        text_columns: columns of ``text_a`` (and ``text_b`` for pair tasks): header names or
            0-based positions (``"1"`` = 1); None = the task's layout.
        label_column: the label column, a name or a position; None = the task's layout.
        header: whether the files start with a header row; None = the layout's, or a header
            when a column is given by name.
        label_map: label value → class id (an id, label name or label word of the task), as a
            mapping or ``"VALUE=ID"`` strings; None = ids, label names or the layout's rule.

    Returns:
        ``{split: [Example, ...]}`` for each of train/dev/test present in the folder.

    Raises:
        FileNotFoundError: no folder, or no split file in it.
        ValueError: columns or labels that cannot be read (the message names the arguments,
            and the command-line flags, that fix it).

    Example:
        >>> splits = load_kshot("../shared/data/k-shot/SST-2/16-42", "sst-2")
        >>> len(splits["train"]), splits["train"][0].label
        (32, 0)
        >>> load_kshot("reviews/", "mr", text_columns=["body"], label_column="stars",
        ...            label_map=["1=terrible", "5=great"])["train"][0]
        Example(text_a='Loved it.', label=1, text_b=None)
    """
    the_task = get_task(task)
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"k-shot data folder not found: {root}")
    files = _split_files(root, the_task)
    if not files:
        layout = LAYOUTS.get(the_task.name.strip().lower())
        stems = dict(layout.files) if layout else {}
        ext = layout.ext if layout else "csv/tsv/jsonl/json/parquet"
        expected = ", ".join(f"{stems.get(s, s)}.{ext}" for s in SPLITS)
        raise FileNotFoundError(f"no {expected} in {root} (task {the_task.name})")
    mapping = parse_label_map(label_map, the_task)
    out = {}
    for split, path in files.items():
        ext = path.suffix[1:]
        if ext in _TABLE_EXTS:
            layout = resolve_layout(
                the_task, ext, text_columns=text_columns, label_column=label_column, header=header
            )
            out[split] = read_table(path, the_task, layout, mapping)
            continue
        names = list(text_columns or ()) + ([] if label_column is None else [label_column])
        if any(isinstance(c, int) or str(c).strip().lstrip("-").isdigit() for c in names):
            raise ValueError(f"{path}: columns of .{ext} files are named, not numbered")
        cols = dict(zip(the_task.text_fields, text_columns or (), strict=False))
        out[split] = load_hf_dataset(
            path, the_task, split, label=label_column, label_map=mapping, **cols
        )
    for split, examples in out.items():
        if not examples:
            raise ValueError(f"{files[split]} holds no examples")
    return out


_FILE_BUILDERS = {
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"delimiter": "\t"}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
}


def _pick(columns: Iterable[str], wanted: str | None, role: str, source: str) -> str | None:
    columns = list(columns)
    if wanted is not None:
        if wanted not in columns:
            raise ValueError(f"{source}: column {wanted!r} for {role} not in {columns}")
        return wanted
    return next((c for c in KNOWN_COLUMNS[role] if c in columns), None)


def load_hf_dataset(
    name_or_path: str | Path,
    task: str | Task,
    split: str = "train",
    *,
    text_a: str | None = None,
    text_b: str | None = None,
    label: str | None = None,
    label_map: Mapping[Any, Any] | Sequence[str] | None = None,
    **load_kwargs: Any,
) -> list[Example]:
    """Load a split with ``datasets.load_dataset`` and convert it to examples.

    A local ``.csv``/``.tsv``/``.json``/``.jsonl``/``.parquet`` file is read with the matching
    builder; anything else (a hub name such as ``"glue"`` with ``name="sst2"`` in
    ``load_kwargs``, or a local dataset folder) is passed to ``load_dataset`` as is. Columns are
    found by name (``text_a``/``sentence``/``sentence1``/``text``/..., ``text_b``/``sentence2``/
    ``hypothesis``, ``label``/``gold_label``/...; :data:`zofast.layouts.KNOWN_COLUMNS`) unless
    given. Labels are mapped with ``label_map`` when given (a value it does not name is an
    error), else by name: the task's ``label_names`` (``entailment`` → 0 for RTE), and a
    ``ClassLabel``'s ids through its names when they are the task's label names (GLUE MNLI's
    0 = entailment becomes MNLI's 1), else through its own order.

    Args:
        name_or_path: hub dataset name, local dataset folder or data file.
        task: task name or :class:`Task`; decides the number of labels and whether ``text_b``
            is needed.
        split: split to load (a single data file has only ``"train"``).
        text_a: column for the first text (default: found by name).
        text_b: column for the second text (default: found by name, pair tasks only).
        label: column for the label (default: found by name).
        label_map: label value → class id (an id, label name or label word of the task), as a
            mapping or ``"VALUE=ID"`` strings.
        **load_kwargs: passed to ``datasets.load_dataset`` (e.g. ``name="sst2"``).

    Returns:
        A list of :class:`Example`.

    Example:
        >>> train = load_hf_dataset("glue", "sst-2", "train", name="sst2")  # doctest: +SKIP
        >>> dev = load_hf_dataset("my_reviews.csv", "demo")  # doctest: +SKIP

        (The first needs network, the second a file of your own.)
    """
    try:
        import datasets
    except ImportError as e:
        raise ImportError(
            "load_hf_dataset needs the datasets package: pip install 'zofast[datasets]'"
        ) from e
    the_task = get_task(task)
    source = str(name_or_path)
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix in _FILE_BUILDERS:
        if not path.is_file():
            raise FileNotFoundError(f"data file not found: {path}")
        if path.stat().st_size == 0:
            raise ValueError(f"{path}: the file is empty")
        builder, extra = _FILE_BUILDERS[suffix]
        try:
            with _quiet(datasets):
                ds = datasets.load_dataset(
                    builder, data_files={split: str(path)}, split=split, **{**extra, **load_kwargs}
                )
        except Exception as error:  # a local file that its builder cannot read: bad input
            raise ValueError(
                f"{path}: cannot be read as {suffix[1:]}: {_root_cause(error)}"
            ) from None
    else:
        if (path.is_absolute() or source.startswith(".")) and not path.exists():
            raise FileNotFoundError(f"dataset folder not found: {path}")
        ds = datasets.load_dataset(source, split=split, **load_kwargs)
    columns = ds.column_names
    col_a = _pick(columns, text_a, "text_a", source)
    col_label = _pick(columns, label, "label", source)
    pair = "text_b" in the_task.text_fields
    col_b = _pick(columns, text_b, "text_b", source) if pair or text_b else None
    if col_a is None or col_label is None or (pair and col_b is None):
        raise ValueError(
            f"{source}: cannot find the {' and '.join(the_task.text_fields)} and label columns of "
            f"task {the_task.name} in {columns}; "
            + COLUMN_HINT.format(python="text_a=, text_b=, label=, label_map=")
        )
    label_map = parse_label_map(label_map, the_task)
    mapping = _label_mapping(ds.features.get(col_label), the_task, label_map)
    n = the_task.num_labels
    out = []
    for i, row in enumerate(ds):
        where = f"{source} [{split}] row {i}"
        raw = row[col_label]
        value = mapping.get(raw, mapping.get(str(raw).strip(), raw)) if mapping else raw
        if label_map is not None and value is raw:
            raise ValueError(
                f"{source} [{split}] row {i}: label {raw!r} is not in the label map "
                f"{sorted(label_map)}"
            )
        y = _class_id(value)
        if y is None:
            raise ValueError(
                f"{source} [{split}] row {i}: label {raw!r} is not a class id; map label values "
                "with --label-map VALUE=ID (Python: label_map=)"
            )
        if not 0 <= y < n:
            hint = " (unlabelled split? GLUE test splits have label -1)" if y == -1 else ""
            raise ValueError(f"{where}: label {y} outside 0..{n - 1}{hint}")
        a = _text(row[col_a], col_a, where)
        b = None if col_b is None else _text(row[col_b], col_b, where)
        out.append(Example(a, y, b))
    if not out:
        raise ValueError(f"{source} [{split}] holds no examples")
    return out


@contextlib.contextmanager
def _quiet(datasets):
    """No progress bars or logged errors from datasets while it reads a local file: a failure
    comes back as one ValueError (the CLI prints it as one line), success says nothing."""
    logging = datasets.utils.logging
    verbosity, bars = logging.get_verbosity(), datasets.is_progress_bar_enabled()
    logging.set_verbosity(logging.CRITICAL + 10)
    datasets.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bar()


def _class_id(value: Any) -> int | None:
    """A label value as a class id: an int, a float with no fractional part (1.0, as pandas
    writes an int column with gaps), or a string of an int; None for anything else (1.7, True,
    "one"), which int() would truncate or accept silently."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return int(value) if math.isfinite(value) and float(value).is_integer() else None
    if isinstance(value, str):
        text = value.strip()
        return int(text) if re.fullmatch(r"[+-]?\d+", text) else None
    return None


def _text(value: Any, column: str, where: str) -> str:
    """A text field as it is: missing (None) or non-text values are errors, not "None"."""
    if value is None:
        raise ValueError(f"{where}: text column {column!r} is missing (null)")
    if not isinstance(value, str):
        raise ValueError(f"{where}: text column {column!r} holds {type(value).__name__} {value!r}")
    return value


def _root_cause(error: BaseException) -> str:
    """The innermost cause of a chained exception, in one line (datasets wraps the reader's)."""
    seen = set()
    while (error.__cause__ or error.__context__) is not None and id(error) not in seen:
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _label_mapping(feature: Any, task: Task, label_map: dict[Any, int] | None) -> dict[Any, int]:
    if label_map is not None:
        return dict(label_map)
    mapping: dict[Any, int] = {name: i for i, name in enumerate(task.label_names or ())}
    names = getattr(feature, "names", None)
    if names and set(names) <= set(mapping):
        mapping.update({j: mapping[name] for j, name in enumerate(names)})
    elif names:
        mapping.update({name: j for j, name in enumerate(names)})
    return mapping


def load_demo() -> dict[str, list[Example]]:
    """The bundled sentiment demo set (original short reviews written for zofast).

    Products, films, restaurants, hotels and apps; label 0 = negative, 1 = positive; balanced
    train (64), dev (64) and test (200) splits. Use it with ``get_task("demo")``.

    Returns:
        ``{"train": [...], "dev": [...], "test": [...]}``.

    Example:
        >>> demo = load_demo()
        >>> len(demo["train"]), len(demo["test"])
        (64, 200)
    """
    root = Path(__file__).resolve().parent / "demo_data"
    out = {}
    for split in SPLITS:
        path = root / f"{split}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(
                f"demo data file missing: {path}; the zofast installation is incomplete "
                "(package data zofast/demo_data/*.jsonl)"
            )
        text = path.read_text(encoding="utf-8")
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        out[split] = [Example(r["text"], int(r["label"])) for r in rows]
    return out
