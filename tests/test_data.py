import json
import os
from pathlib import Path

import pytest

from zofast.data import Example, load_demo, load_hf_dataset, load_kshot
from zofast.tasks import Task

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

DATA = Path(os.environ.get("ZOFAST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
KSHOT = DATA / "k-shot"
needs_data = pytest.mark.skipif(
    not KSHOT.is_dir(), reason=f"few-shot data not found at {KSHOT} (set ZOFAST_DATA)"
)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_example_fields_and_validation():
    ex = Example("a film", 1)
    assert (ex.text_a, ex.label, ex.text_b) == ("a film", 1, None)
    assert Example("p", 0, "h").text_b == "h"
    with pytest.raises(TypeError, match="label"):
        Example("a", "1")
    with pytest.raises(TypeError, match="label"):
        Example("a", True)
    with pytest.raises(TypeError, match="text_a"):
        Example(None, 0)
    with pytest.raises(TypeError, match="text_b"):
        Example("a", 0, 3)


def test_load_kshot_formats(tmp_path):
    sst = tmp_path / "sst"
    _write(sst / "train.tsv", 'sentence\tlabel\nhe said "fine" , sort of\t1\nbad , bad film\t0\n')
    _write(sst / "test.tsv", "sentence\tlabel\nok\t1\n")
    out = load_kshot(sst, "SST-2")
    assert set(out) == {"train", "test"}
    assert out["train"] == [Example('he said "fine" , sort of', 1), Example("bad , bad film", 0)]

    rte = tmp_path / "rte"
    _write(
        rte / "dev.tsv",
        "index\tsentence1\tsentence2\tlabel\n"
        '7\tThe "big" dog barked.\tA dog barked.\tentailment\n'
        "8\tIt rained.\tIt was sunny.\tnot_entailment\n",
    )
    out = load_kshot(str(rte), "rte")
    assert out["dev"] == [
        Example('The "big" dog barked.', 0, "A dog barked."),
        Example("It rained.", 1, "It was sunny."),
    ]

    trec = tmp_path / "trec"
    _write(trec / "train.csv", '4,"What county is Modesto , California in ?"\n0,What is love ?\n')
    out = load_kshot(trec, Task.custom("{mask}: {text_a}", list("abcdef"), name="TREC"))
    assert out["train"] == [
        Example("What county is Modesto , California in ?", 4),
        Example("What is love ?", 0),
    ]


def test_load_kshot_errors(tmp_path):
    missing = tmp_path / "nowhere" / "16-42"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_kshot(missing, "SST-2")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"train\.tsv.*empty"):
        load_kshot(empty, "SST-2")
    with pytest.raises(ValueError, match="unknown task 'wnli'"):
        load_kshot(empty, "wnli")
    _write(tmp_path / "hdr" / "train.tsv", "text\tlabel\nfine\t1\n")
    with pytest.raises(ValueError, match=r"no text_a column 'sentence'.*--text-columns"):
        load_kshot(tmp_path / "hdr", "SST-2")
    assert load_kshot(tmp_path / "hdr", "SST-2", text_columns=["text"])["train"][0].label == 1
    _write(tmp_path / "lab" / "train.tsv", "sentence\tlabel\nfine\t2\n")
    with pytest.raises(ValueError, match=r"train\.tsv:2: label 2"):
        load_kshot(tmp_path / "lab", "SST-2")
    _write(tmp_path / "cols" / "train.tsv", "sentence\tlabel\nfine\t1\textra\n")
    with pytest.raises(ValueError, match=r"train\.tsv:2: expected 2 tab-separated columns"):
        load_kshot(tmp_path / "cols", "SST-2")
    _write(tmp_path / "rte" / "train.tsv", "index\tsentence1\tsentence2\tlabel\n1\ta\tb\tmaybe\n")
    with pytest.raises(ValueError, match="'maybe'"):
        load_kshot(tmp_path / "rte", "RTE")
    _write(tmp_path / "trec" / "test.csv", "x,What ?\n")
    with pytest.raises(ValueError, match="not an integer"):
        load_kshot(tmp_path / "trec", "trec")


@needs_data
@pytest.mark.parametrize(
    ("task", "n_train", "n_test", "n_labels", "pair"),
    [("SST-2", 32, 872, 2, False), ("RTE", 32, 277, 2, True), ("trec", 96, 500, 6, False)],
)
def test_load_kshot_shared_data(task, n_train, n_test, n_labels, pair):
    for seed in (13, 21, 42, 87, 100):
        out = load_kshot(KSHOT / task / f"16-{seed}", task)
        assert len(out["train"]) == len(out["dev"]) == n_train
        assert len(out["test"]) == n_test
        counts = [sum(ex.label == y for ex in out["train"]) for y in range(n_labels)]
        assert counts == [16] * n_labels
        assert all((ex.text_b is not None) == pair for split in out.values() for ex in split)


def test_load_hf_dataset_csv_and_jsonl(tmp_path):
    csv_path = _write(tmp_path / "reviews.csv", 'sentence,label\n"great, really",1\nawful,0\n')
    got = load_hf_dataset(csv_path, "sst-2", cache_dir=str(tmp_path / "cache"))
    assert got == [Example("great, really", 1), Example("awful", 0)]
    rows = [{"text": "nice", "label": 1}, {"text": "meh", "label": 0}]
    jsonl = _write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    got = load_hf_dataset(jsonl, "demo", split="validation", cache_dir=str(tmp_path / "cache"))
    assert got == [Example("nice", 1), Example("meh", 0)]


def test_load_hf_dataset_pairs_label_names_and_columns(tmp_path):
    cache = str(tmp_path / "cache")
    tsv = _write(
        tmp_path / "rte.tsv",
        "premise\thypothesis\tlabel\nA man sleeps.\tA man rests.\tentailment\n"
        "A man runs.\tNobody moves.\tnot_entailment\n",
    )
    got = load_hf_dataset(tsv, "RTE", cache_dir=cache)
    assert got == [
        Example("A man sleeps.", 0, "A man rests."),
        Example("A man runs.", 1, "Nobody moves."),
    ]
    custom = _write(tmp_path / "c.csv", "body,stars\nlovely,pos\nbad,neg\n")
    got = load_hf_dataset(
        custom,
        "demo",
        text_a="body",
        label="stars",
        label_map={"neg": 0, "pos": 1},
        cache_dir=cache,
    )
    assert got == [Example("lovely", 1), Example("bad", 0)]
    named = _write(tmp_path / "n.csv", "text,label\nlovely,positive\nbad,negative\n")
    assert [ex.label for ex in load_hf_dataset(named, "demo", cache_dir=cache)] == [1, 0]


def test_load_hf_dataset_errors(tmp_path):
    cache = str(tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        load_hf_dataset(tmp_path / "missing.csv", "sst-2")
    with pytest.raises(ValueError, match="unknown task"):
        load_hf_dataset(tmp_path / "missing.csv", "nope")
    bad = _write(tmp_path / "bad.csv", "review,label\nfine,1\n")
    with pytest.raises(ValueError, match="cannot find the text_a and label columns.*--text-col"):
        load_hf_dataset(bad, "sst-2", cache_dir=cache)
    with pytest.raises(ValueError, match="column 'body'"):
        load_hf_dataset(bad, "sst-2", text_a="body", cache_dir=cache)
    unlabelled = _write(tmp_path / "u.csv", "sentence,label\nfine,-1\n")
    with pytest.raises(ValueError, match="GLUE test splits"):
        load_hf_dataset(unlabelled, "sst-2", cache_dir=cache)
    strings = _write(tmp_path / "s.csv", "sentence,label\nfine,maybe\n")
    with pytest.raises(ValueError, match="--label-map VALUE=ID"):
        load_hf_dataset(strings, "sst-2", cache_dir=cache)
    no_pair = _write(tmp_path / "p.csv", "sentence1,label\nfine,entailment\n")
    with pytest.raises(ValueError, match="text_b="):
        load_hf_dataset(no_pair, "rte", cache_dir=cache)


BAD_FILES = [
    ("null.jsonl", '{"sentence": "good", "label": 1}\n{"sentence": null, "label": 0}\n',
     "row 1: text column 'sentence' is missing"),
    ("number.jsonl", '{"sentence": 12, "label": 1}\n', "text column 'sentence' holds int 12"),
    ("float.jsonl", '{"sentence": "good", "label": 1.7}\n', "label 1.7 is not a class id"),
    ("bool.jsonl", '{"sentence": "good", "label": true}\n', "label True is not a class id"),
    ("broken.jsonl", '{"sentence": "good"}\n{"sentence": "ba', "cannot be read as jsonl"),
    ("empty.jsonl", "", "the file is empty"),
    ("header.csv", "sentence,label\n", "cannot be read as csv: .* no data"),
    ("latin1.csv", "sentence,label\ncaf\xe9,1\n", "cannot be read as csv"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "text", "match"), BAD_FILES)
def test_bad_data_files_raise_one_value_error_naming_the_file(tmp_path, name, text, match):
    path = tmp_path / name
    path.write_bytes(text.encode("latin-1" if name.startswith("latin1") else "utf-8"))
    before = path.read_bytes()
    with pytest.raises(ValueError, match=match) as raised:
        load_hf_dataset(path, "sst-2", cache_dir=str(tmp_path / "cache"))
    assert name in str(raised.value) and "\n" not in str(raised.value)
    assert path.read_bytes() == before


def test_integral_float_labels_are_class_ids(tmp_path):
    # pandas writes an int column with gaps as floats: 1.0 is class 1, not an error.
    path = _write(tmp_path / "f.jsonl", '{"sentence": "good", "label": 1.0}\n')
    assert load_hf_dataset(path, "sst-2", cache_dir=str(tmp_path / "c")) == [Example("good", 1)]


def test_kshot_empty_split_and_wrong_encoding(tmp_path):
    _write(tmp_path / "a" / "train.tsv", "sentence\tlabel\nfine\t1\n")
    _write(tmp_path / "a" / "dev.tsv", "sentence\tlabel\n")
    with pytest.raises(ValueError, match=r"dev\.tsv holds no examples"):
        load_kshot(tmp_path / "a", "SST-2")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "train.tsv").write_bytes(b"sentence\tlabel\ncaf\xe9\t1\n")
    with pytest.raises(ValueError, match=r"train\.tsv: not UTF-8 text"):
        load_kshot(tmp_path / "b", "SST-2")


def test_load_demo():
    demo = load_demo()
    assert {k: len(v) for k, v in demo.items()} == {"train": 64, "dev": 64, "test": 200}
    texts = []
    for split, examples in demo.items():
        labels = [ex.label for ex in examples]
        assert labels.count(0) == labels.count(1) == len(examples) // 2, split
        assert all(ex.text_b is None and len(ex.text_a.split()) >= 4 for ex in examples)
        texts += [ex.text_a for ex in examples]
    assert len(set(texts)) == len(texts)
