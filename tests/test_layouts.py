"""zofast.layouts: every LM-BFF k-shot layout, read from tiny files written as LM-BFF writes them,
and any other layout named by columns, positions, a header flag and a label map."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from zofast.data import Example, load_kshot
from zofast.layouts import LAYOUTS, Layout, parse_label_map, read_table, resolve_layout
from zofast.tasks import Task, get_task, list_tasks

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

T = "\t"
A, B = "A man is sleeping .", "A man rests ."


def _tsv(*rows: list[str]) -> str:
    return "".join(T.join(map(str, row)) + "\n" for row in rows)


MNLI_HEAD = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse",
             "sentence2_binary_parse", "sentence1_parse", "sentence2_parse", "sentence1",
             "sentence2", "label1"]  # fmt: skip
SNLI_HEAD = ["index", "captionID", "pairID", "sentence1_binary_parse", "sentence2_binary_parse",
             "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1"]  # fmt: skip
STSB_HEAD = ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1",
             "sentence2", "score"]  # fmt: skip


def _mnli(label: str, extra: int = 0) -> list[str]:
    return ["7", "p", "q", "fiction", "( A )", "( B )", "(ROOT A)", "(ROOT B)", A, B, label,
            *[label] * extra, label]  # fmt: skip


# task -> ({file name: contents}, {split: [(text_a, text_b, label), ...]}), each file as LM-BFF's
# tools/generate_k_shot_data.py writes it from the original data.
CASES = {
    "SST-2": (
        {"train.tsv": _tsv(["sentence", "label"], ['it \'s "fine" , sort of', 1]),
         "test.tsv": _tsv(["sentence", "label"], ["a dull mess", 0])},
        {"train": [('it \'s "fine" , sort of', None, 1)], "test": [("a dull mess", None, 0)]},
    ),
    "sst-5": (
        {"train.csv": '4,"a gorgeous , witty film"\n0,dreadful\n', "dev.csv": "2,fine\n"},
        {"train": [("a gorgeous , witty film", None, 4), ("dreadful", None, 0)],
         "dev": [("fine", None, 2)]},
    ),
    "mr": ({"test.csv": '1,"the rock is "" destined "" to be great"\n'},
           {"test": [('the rock is " destined " to be great', None, 1)]}),
    "cr": ({"train.csv": "0,the battery dies fast\n"},
           {"train": [("the battery dies fast", None, 0)]}),
    "mpqa": ({"train.csv": "1,support\n0,failure\n"},
             {"train": [("support", None, 1), ("failure", None, 0)]}),
    "subj": ({"dev.csv": "1,the film is set in 1912 .\n"},
             {"dev": [("the film is set in 1912 .", None, 1)]}),
    "trec": ({"train.csv": '4,"What county is Modesto , California in ?"\n'},
             {"train": [("What county is Modesto , California in ?", None, 4)]}),
    "CoLA": ({"train.tsv": _tsv(["gj04", 1, "", "Our friends won't buy this analysis."],
                                ["gj04", 0, "*", "They drank the pub."])},
             {"train": [("Our friends won't buy this analysis.", None, 1),
                        ("They drank the pub.", None, 0)]}),
    "MNLI": (
        {"train.tsv": _tsv(MNLI_HEAD + ["gold_label"], _mnli("neutral")),
         "dev_matched.tsv": _tsv(MNLI_HEAD + ["label2", "label3", "label4", "label5", "gold_label"],
                                 _mnli("contradiction", 4)),
         "test_matched.tsv": _tsv(MNLI_HEAD + ["gold_label"], _mnli("entailment")),
         "test_mismatched.tsv": _tsv(MNLI_HEAD + ["gold_label"], _mnli("neutral"))},
        {"train": [(A, B, 2)], "dev": [(A, B, 0)], "test": [(A, B, 1)]},
    ),
    "MNLI-mm": (
        {"train.tsv": _tsv(MNLI_HEAD + ["gold_label"], _mnli("neutral")),
         "test_matched.tsv": _tsv(MNLI_HEAD + ["gold_label"], _mnli("entailment")),
         "test_mismatched.tsv": _tsv(MNLI_HEAD + ["gold_label"], _mnli("contradiction"))},
        {"train": [(A, B, 2)], "test": [(A, B, 0)]},
    ),
    "SNLI": (
        {"train.tsv": _tsv(SNLI_HEAD + ["gold_label"],
                           ["1", "c", "p", "( A )", "( B )", "(A)", "(B)", A, B, "neutral",
                            "entailment"])},
        {"train": [(A, B, 1)]},
    ),
    "QNLI": ({"dev.tsv": _tsv(["index", "question", "sentence", "label"],
                              [3, "Who sleeps?", A, "not_entailment"])},
             {"dev": [("Who sleeps?", A, 1)]}),
    "RTE": ({"train.tsv": _tsv(["index", "sentence1", "sentence2", "label"],
                               [9, 'The "big" dog barked.', "A dog barked.", "entailment"])},
            {"train": [('The "big" dog barked.', "A dog barked.", 0)]}),
    "MRPC": ({"train.tsv": "\ufeff" + _tsv(["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
                                          [1, 702876, 702977, A, B], [0, 1, 2, B, A])},
             {"train": [(A, B, 1), (B, A, 0)]}),
    "QQP": ({"test.tsv": _tsv(["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
                              [5, 11, 12, "Why?", "How?", 0])},
            {"test": [("Why?", "How?", 0)]}),
    "STS-B": (
        {"train.tsv": _tsv(STSB_HEAD, [0, "main", "f", "2012", 1, "none", "none", A, B, "2.500"],
                           [1, "main", "f", "2012", 2, "none", "none", B, A, "2.4"])},
        {"train": [(A, B, 1), (B, A, 0)]},
    ),
}  # fmt: skip


def _write(root: Path, files: dict[str, str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (root / name).write_text(text, encoding="utf-8")
    return root


def test_every_builtin_task_has_a_layout_and_a_case():
    assert set(LAYOUTS) == set(list_tasks()) - {"demo"}
    assert {name.lower() for name in CASES} == set(LAYOUTS)


@pytest.mark.parametrize("name", sorted(CASES))
def test_lm_bff_layouts(tmp_path, name):
    files, expected = CASES[name]
    got = load_kshot(_write(tmp_path / name, files), name.lower())
    assert set(got) == set(expected)
    for split, rows in expected.items():
        assert got[split] == [Example(a, y, b) for a, b, y in rows], split


def test_lm_bff_layout_errors_name_the_file_line_and_flags(tmp_path):
    root = _write(tmp_path / "mnli", {"train.tsv": _tsv(MNLI_HEAD + ["gold_label"], _mnli("-"))})
    with pytest.raises(ValueError, match=r"train\.tsv:2: label '-' is not an integer.*--label-map"):
        load_kshot(root, "mnli")
    root = _write(tmp_path / "stsb", {"train.tsv": _tsv(STSB_HEAD, [0] * 9 + ["high"])})
    with pytest.raises(ValueError, match="score 'high' is not a number"):
        load_kshot(root, "sts-b")
    root = _write(tmp_path / "qqp", {"train.tsv": _tsv(["id", "question1", "is_duplicate"])})
    with pytest.raises(ValueError, match="no text_b column 'question2'.*--text-columns"):
        load_kshot(root, "qqp")
    with pytest.raises(FileNotFoundError, match="train.tsv, dev_matched.tsv, test_matched.tsv"):
        load_kshot(_write(tmp_path / "empty", {}), "MNLI")


def test_issue_example_mr_headerless_csv_under_any_task_name(tmp_path):
    """The run of issue 17: MR's headerless label,text csv read for a task zofast does not know."""
    root = _write(tmp_path / "mr", {"train.csv": '0,"any enjoyment , sadly"\n1,great fun\n'})
    mine = Task.custom("{text_a} It was {mask}.", ["terrible", "great"], name="mine")
    assert load_kshot(root, mine)["train"] == [
        Example("any enjoyment , sadly", 0),
        Example("great fun", 1),
    ]
    three = _write(tmp_path / "three", {"train.csv": "x,0,any enjoyment\ny,1,great fun\n"})
    with pytest.raises(ValueError, match=r"a headerless file of 3 columns; name the columns with "
                       r"--text-columns COL \[COL\] and --label-column COL"):  # fmt: skip
        load_kshot(three, mine)
    with pytest.raises(ValueError, match="if line 1 is a header, pass --header"):
        load_kshot(_write(tmp_path / "hdr", {"train.csv": "label,review\n1,fun\n"}), "mr")
    got = load_kshot(three, mine, text_columns=["2"], label_column=1)
    assert got["train"][1] == Example("great fun", 1)
    got = load_kshot(three, mine, text_columns=[-1], label_column=-2, label_map=["0=1", "1=0"])
    assert [ex.label for ex in got["train"]] == [1, 0]


def test_column_flags_by_name_position_header_and_label_map(tmp_path):
    reviews = _write(
        tmp_path / "reviews",
        {"train.csv": "id,stars,body\n1,5,Loved it.\n2,1,Awful.\n",
         "dev.tsv": "id\tstars\tbody\n3\t5\tGood.\n"},
    )  # fmt: skip
    got = load_kshot(
        reviews, "mr", text_columns=["body"], label_column="stars", label_map={"1": 0, "5": 1}
    )
    assert got == {
        "train": [Example("Loved it.", 1), Example("Awful.", 0)],
        "dev": [Example("Good.", 1)],
    }
    words = load_kshot(reviews, "mr", text_columns=[2], label_column=1, header=True,
                       label_map=["1=terrible", "5=positive"])  # fmt: skip
    assert words == got
    with pytest.raises(ValueError, match=r"label '5' is not in the label map \['1'\]"):
        load_kshot(reviews, "mr", text_columns=["body"], label_column="stars", label_map=["1=0"])
    with pytest.raises(ValueError, match="no label column 'rating' in header"):
        load_kshot(reviews, "mr", text_columns=["body"], label_column="rating")
    with pytest.raises(ValueError, match="label column 7 is outside the 3 columns"):
        load_kshot(reviews, "mr", text_columns=["body"], label_column=7)
    with pytest.raises(ValueError, match=r"reads 1 text field\(s\).*2 text column"):
        load_kshot(reviews, "mr", text_columns=["body", "id"])
    with pytest.raises(ValueError, match="is a name but a headerless file"):
        load_kshot(reviews, "mr", text_columns=["body"], label_column=1, header=False)
    pairs = _write(tmp_path / "pairs", {"train.tsv": "p\th\ty\nA dog.\tAn animal.\tyes\n"})
    got = load_kshot(pairs, "rte", text_columns=["p", "h"], label_column="y",
                     label_map=["yes=entailment", "no=not_entailment"])  # fmt: skip
    assert got["train"] == [Example("A dog.", 0, "An animal.")]


def test_headers_found_by_known_names_and_hf_files(tmp_path):
    mine = Task.custom("{text_a} {mask}", ["bad", "good"], name="mine")
    header = _write(tmp_path / "h", {"train.tsv": "Sentence\tLabel\nnice\t1\n"})
    assert load_kshot(header, mine)["train"] == [Example("nice", 1)]
    rows = [{"text": "nice", "label": "positive"}, {"text": "meh", "label": "negative"}]
    jsonl = _write(tmp_path / "j", {"train.jsonl": "\n".join(map(json.dumps, rows))})
    assert [ex.label for ex in load_kshot(jsonl, "demo")["train"]] == [1, 0]
    both = ["positive=great", "negative=0"]
    got = load_kshot(jsonl, "sst-2", text_columns=["text"], label_map=both)
    assert got["train"][0] == Example("nice", 1)
    with pytest.raises(ValueError, match="named, not numbered"):
        load_kshot(jsonl, "sst-2", text_columns=["0"])


def test_parse_label_map_and_layout_overrides():
    sst2 = get_task("sst-2")
    assert parse_label_map(["neg=terrible", " pos = 1 "], sst2) == {"neg": 0, "pos": 1}
    assert parse_label_map({"n": "negative"}, sst2) == {"n": 0}
    assert parse_label_map(None, sst2) is None
    for bad, match in (["pos"], "not VALUE=ID"), (["pos=2"], "not a class"), (["x=meh"], "meh"):
        with pytest.raises(ValueError, match=match):
            parse_label_map(bad, sst2)
    with pytest.raises(TypeError, match="VALUE=ID"):
        parse_label_map("pos=1", sst2)
    mr = resolve_layout(get_task("mr"))
    assert mr == Layout("csv", False, (1,), 0)
    assert resolve_layout(get_task("mr"), label_column="stars").header is True
    assert resolve_layout(get_task("mr"), text_columns=["3"]).text == (3,)
    assert resolve_layout(get_task("sst-2"), "csv").ext == "csv"
    mnli = resolve_layout(get_task("mnli"))
    assert dict(mnli.files)["dev"] == "dev_matched" and mnli.label == "gold_label"
    with pytest.raises(ValueError, match="ext"):
        Layout("xlsx")


def test_read_table_empty_file(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("")
    assert read_table(path, get_task("mr"), LAYOUTS["mr"]) == []


def test_hf_class_label_ids_follow_their_names(tmp_path):
    """GLUE's MNLI on the hub numbers entailment, neutral, contradiction; LM-BFF (and zofast)
    contradiction, entailment, neutral: ids are mapped through the names."""
    datasets = pytest.importorskip("datasets")
    from zofast.data import load_hf_dataset

    features = datasets.Features(
        {"premise": datasets.Value("string"), "hypothesis": datasets.Value("string"),
         "label": datasets.ClassLabel(names=["entailment", "neutral", "contradiction"])}
    )  # fmt: skip
    rows = {"premise": ["a", "b", "c"], "hypothesis": ["x", "y", "z"], "label": [0, 1, 2]}
    path = tmp_path / "mnli.parquet"
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))
    got = load_hf_dataset(path, "mnli", cache_dir=str(tmp_path / "cache"))
    assert [ex.label for ex in got] == [1, 2, 0]
    assert got[0] == Example("a", 1, "x")
