"""Labelled examples: LM-BFF k-shot folders, Hugging Face datasets and the bundled demo set.

All readers return :class:`Example` objects with integer labels ``0 .. num_labels - 1`` in the
order of the task's label words (see :mod:`zofast.tasks`).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import numbers
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .tasks import Task, get_task

__all__ = ["Example", "load_kshot", "load_hf_dataset", "load_demo", "KSHOT_FORMATS"]

SPLITS = ("train", "dev", "test")
RTE_LABELS = {"entailment": 0, "not_entailment": 1}


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


def _read_rows(path: Path, delimiter: str, quoting: int) -> list[list[str]]:
    try:
        with path.open(encoding="utf-8", newline="") as f:
            return [row for row in csv.reader(f, delimiter=delimiter, quoting=quoting) if row]
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except csv.Error as error:
        raise ValueError(
            f"{path}: malformed {'TSV' if delimiter == chr(9) else 'CSV'}: {error}"
        ) from None


def _int_label(value: str, path: Path, line: int, num_labels: int) -> int:
    try:
        label = int(value.strip())
    except ValueError:
        raise ValueError(f"{path}:{line}: label {value!r} is not an integer") from None
    if not 0 <= label < num_labels:
        raise ValueError(f"{path}:{line}: label {label} outside 0..{num_labels - 1}")
    return label


def _check_header(path: Path, rows: list[list[str]], header: list[str]) -> list[list[str]]:
    if not rows or [c.strip() for c in rows[0]] != header:
        got = rows[0] if rows else "an empty file"
        raise ValueError(f"{path}: expected header {header}, got {got}")
    return rows[1:]


def _read_sst2(path: Path) -> list[Example]:
    rows = _check_header(path, _read_rows(path, "\t", csv.QUOTE_NONE), ["sentence", "label"])
    out = []
    for line, row in enumerate(rows, start=2):
        if len(row) != 2:
            raise ValueError(f"{path}:{line}: expected 2 tab-separated columns, got {len(row)}")
        out.append(Example(row[0], _int_label(row[1], path, line, 2)))
    return out


def _read_rte(path: Path) -> list[Example]:
    header = ["index", "sentence1", "sentence2", "label"]
    rows = _check_header(path, _read_rows(path, "\t", csv.QUOTE_NONE), header)
    out = []
    for line, row in enumerate(rows, start=2):
        if len(row) != 4:
            raise ValueError(f"{path}:{line}: expected 4 tab-separated columns, got {len(row)}")
        label = row[3].strip()
        if label not in RTE_LABELS:
            raise ValueError(f"{path}:{line}: label {label!r} is not one of {list(RTE_LABELS)}")
        out.append(Example(row[1], RTE_LABELS[label], row[2]))
    return out


def _read_trec(path: Path) -> list[Example]:
    rows = _read_rows(path, ",", csv.QUOTE_MINIMAL)
    out = []
    for line, row in enumerate(rows, start=1):
        if len(row) != 2:
            raise ValueError(f"{path}:{line}: expected 2 columns label,question, got {len(row)}")
        out.append(Example(row[1], _int_label(row[0], path, line, 6)))
    return out


KSHOT_FORMATS = {
    "SST-2": ("tsv", _read_sst2),
    "RTE": ("tsv", _read_rte),
    "trec": ("csv", _read_trec),
}
_KSHOT_KEYS = {name.lower().replace("-", ""): name for name in KSHOT_FORMATS}


def _kshot_name(task: str | Task) -> str:
    name = task.name if isinstance(task, Task) else task
    if not isinstance(name, str):
        raise TypeError(f"task must be a name or a Task, got {type(task).__name__}")
    key = name.strip().lower().replace("-", "").replace("_", "")
    if key not in _KSHOT_KEYS:
        raise ValueError(
            f"no k-shot reader for task {name!r}; known formats: {', '.join(KSHOT_FORMATS)}"
        )
    return _KSHOT_KEYS[key]


def load_kshot(folder: str | Path, task: str | Task) -> dict[str, list[Example]]:
    """Read one LM-BFF k-shot folder, e.g. ``data/k-shot/SST-2/16-42``.

    Formats: ``SST-2`` tsv with header ``sentence, label``; ``RTE`` tsv with header
    ``index, sentence1, sentence2, label`` (``entailment`` = 0, ``not_entailment`` = 1);
    ``trec`` csv without header ``label,question`` (labels 0-5).

    Args:
        folder: the folder holding ``train``, ``dev`` and ``test`` files.
        task: ``"SST-2"``, ``"RTE"`` or ``"trec"`` (case-insensitive) or the matching Task.

    Returns:
        ``{split: [Example, ...]}`` for each of train/dev/test present in the folder.

    Example:
        >>> splits = load_kshot("../shared/data/k-shot/SST-2/16-42", "sst-2")
        >>> len(splits["train"]), splits["train"][0].label
        (32, 0)
    """
    name = _kshot_name(task)
    ext, reader = KSHOT_FORMATS[name]
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"k-shot data folder not found: {root}")
    out = {
        split: reader(root / f"{split}.{ext}")
        for split in SPLITS
        if (root / f"{split}.{ext}").is_file()
    }
    for split, examples in out.items():
        if not examples:
            raise ValueError(f"{root / f'{split}.{ext}'} holds no examples")
    if not out:
        raise FileNotFoundError(
            f"no {', '.join(f'{s}.{ext}' for s in SPLITS)} in {root} (format of task {name})"
        )
    return out


_HF_COLUMNS = {
    "text_a": ("text_a", "sentence", "sentence1", "text", "premise", "question", "content"),
    "text_b": ("text_b", "sentence2", "hypothesis"),
    "label": ("label", "labels", "coarse_label", "label-coarse"),
}
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
    return next((c for c in _HF_COLUMNS[role] if c in columns), None)


def load_hf_dataset(
    name_or_path: str | Path,
    task: str | Task,
    split: str = "train",
    *,
    text_a: str | None = None,
    text_b: str | None = None,
    label: str | None = None,
    label_map: dict[Any, int] | None = None,
    **load_kwargs: Any,
) -> list[Example]:
    """Load a split with ``datasets.load_dataset`` and convert it to examples.

    A local ``.csv``/``.tsv``/``.json``/``.jsonl``/``.parquet`` file is read with the matching
    builder; anything else (a hub name such as ``"glue"`` with ``name="sst2"`` in
    ``load_kwargs``, or a local dataset folder) is passed to ``load_dataset`` as is. Columns are
    found by name (``text_a``/``sentence``/``sentence1``/``text``/..., ``text_b``/``sentence2``/
    ``hypothesis``, ``label``/``coarse_label``) unless given. String labels are mapped with
    ``label_map``, the dataset's ``ClassLabel`` names, the task's ``label_names`` or, for RTE,
    ``entailment``/``not_entailment``.

    Args:
        name_or_path: hub dataset name, local dataset folder or data file.
        task: task name or :class:`Task`; decides the number of labels and whether ``text_b``
            is needed.
        split: split to load (a single data file has only ``"train"``).
        text_a: column for the first text (default: found by name).
        text_b: column for the second text (default: found by name, pair tasks only).
        label: column for the label (default: found by name).
        label_map: maps raw label values to class ids.
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
            f"{source}: cannot find the text/label columns for task {the_task.name} in {columns}; "
            "pass text_a=, text_b=, label="
        )
    mapping = _label_mapping(ds.features.get(col_label), the_task, label_map)
    n = the_task.num_labels
    out = []
    for i, row in enumerate(ds):
        where = f"{source} [{split}] row {i}"
        raw = row[col_label]
        value = mapping.get(raw, mapping.get(str(raw).strip(), raw)) if mapping else raw
        y = _class_id(value)
        if y is None:
            raise ValueError(f"{where}: label {raw!r} is not a class id; pass label_map=")
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
    mapping: dict[Any, int] = {}
    if task.label_names is not None:
        mapping.update({name: i for i, name in enumerate(task.label_names)})
    if task.name.lower() == "rte":
        mapping.update(RTE_LABELS)
    names = getattr(feature, "names", None)
    if names:
        mapping.update({name: i for i, name in enumerate(names)})
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
