"""LM-BFF's multi-class and pair tasks through every method and every model kind, on tiny models
and tiny k-shot folders written in LM-BFF's layouts (MNLI: three classes, sentence pairs, GLUE
tsv with dev_matched / test_matched; SST-5: five classes, headerless label,text csv)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from helpers_models import TINY_ARCHS, TINY_KINDS, make_tiny_model

from zofast import plot
from zofast.data import Example, load_kshot
from zofast.models import load_model
from zofast.scoring import Scorer
from zofast.tasks import get_task, list_tasks
from zofast.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")

PAIRS = [
    ("A man is playing a guitar.", "A man plays music.", "entailment"),
    ("A woman is slicing an onion.", "Nobody is cooking.", "contradiction"),
    ("Two dogs run in a field.", "The dogs are brothers.", "neutral"),
    ("A child is reading a book.", "A kid reads.", "entailment"),
    ("The hotel room was clean.", "The room was filthy.", "contradiction"),
    ("A chef is tasting soup.", "The soup is for a party.", "neutral"),
]
REVIEWS = ["awful, a waste", "weak and slow", "fine, nothing more", "a good film", "superb"]


def _mnli_file(rows) -> str:
    head = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse",
            "sentence2_binary_parse", "sentence1_parse", "sentence2_parse", "sentence1",
            "sentence2", "label1", "gold_label"]  # fmt: skip
    lines = ["\t".join(head)]
    for i, (a, b, y) in enumerate(rows):
        lines.append("\t".join([str(i), "p", "q", "fiction", "", "", "", "", a, b, y, y]))
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("kshot")
    mnli = root / "MNLI" / "16-42"
    mnli.mkdir(parents=True)
    (mnli / "train.tsv").write_text(_mnli_file(PAIRS))
    (mnli / "dev_matched.tsv").write_text(_mnli_file(PAIRS[:3]))
    (mnli / "test_matched.tsv").write_text(_mnli_file(PAIRS[3:]))
    sst5 = root / "sst-5" / "16-42"
    sst5.mkdir(parents=True)
    for split in ("train", "dev", "test"):
        (sst5 / f"{split}.csv").write_text("".join(f'{y},"{t}"\n' for y, t in enumerate(REVIEWS)))
    return {"mnli": str(mnli), "sst-5": str(sst5)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {arch: str(make_tiny_model(arch, root / arch)) for arch in TINY_ARCHS}


def test_folders_hold_every_class(folders):
    mnli = load_kshot(folders["mnli"], "MNLI")
    assert sorted(ex.label for ex in mnli["train"]) == [0, 0, 1, 1, 2, 2]
    assert all(ex.text_b for split in mnli.values() for ex in split)
    assert [ex.label for ex in load_kshot(folders["sst-5"], "sst-5")["test"]] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_every_task_scores_with_every_model_kind(tiny, arch):
    loaded = load_model(tiny[arch])
    assert loaded.kind == TINY_KINDS[arch]
    for name in list_tasks():
        task = get_task(name)
        scorer = Scorer(loaded, task, max_length=64)
        pair = "text_b" in task.text_fields
        examples = [Example("A fine film.", y, "It is good." if pair else None)
                    for y in range(task.num_labels)]  # fmt: skip
        logits = scorer.logits(scorer.encode(examples))
        assert logits.shape == (task.num_labels, task.num_labels), name
        assert torch.isfinite(logits).all(), name


def _run(tiny, folders, tmp_path, arch, task, method):
    dfo = {"steps": 9, "popsize": 4, "intrinsic_dim": 8, "rank": 1, "eval_every": 5}
    config = TrainConfig(
        model=tiny[arch], task=task, data=folders[task], method=method, lr=1e-3, steps=2,
        eval_every=2, batch_size=3, eval_batch_size=8, max_length=64, seed=7, progress=False,
        plot=False, log_every=1, output_dir=str(tmp_path / "run"),
    )  # fmt: skip
    if method == "dfo-lora":
        config = dataclasses.replace(config, **dfo)
    result = train(config)
    events = plot.read_log(result.files["log"])
    losses = [
        v for e in events if e["event"] in ("train", "eval") for k, v in e.items() if "loss" in k
    ]
    assert losses and all(math.isfinite(v) for v in losses), events
    assert result.steps == config.steps
    for acc in (result.zero_shot_dev, result.zero_shot_test, result.best_dev, result.test):
        assert acc is not None and 0 <= acc <= 1
    return result


@pytest.mark.parametrize("method", ["lozo", "lozo-m", "mezo", "adam", "dfo-lora"])
@pytest.mark.parametrize("arch", ["roberta", "gpt2", "bert-encoder"])
def test_pair_task_with_every_method_and_kind(tiny, folders, tmp_path, arch, method):
    _run(tiny, folders, tmp_path, arch, "mnli", method)


@pytest.mark.parametrize("method", ["lozo", "lozo-m", "mezo", "adam", "dfo-lora"])
def test_five_class_task_with_every_method(tiny, folders, tmp_path, method):
    arch = {"lozo": "opt", "lozo-m": "llama", "mezo": "bert", "adam": "roberta"}.get(method, "gpt2")
    _run(tiny, folders, tmp_path, arch, "sst-5", method)
