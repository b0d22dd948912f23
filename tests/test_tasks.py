import dataclasses

import pytest

from zofast.data import Example
from zofast.tasks import Task, get_task, list_tasks

# LM-BFF's manual prompts as published: the template (run_experiment.sh's syntax) and the label
# value -> label word mapping of each task (Gao, Fisch & Chen 2021, Table 1 / run_experiment.sh).
LM_BFF = {
    "SST-2": ("*cls**sent_0*_It_was*mask*.*sep+*", {"0": "terrible", "1": "great"}),
    "sst-5": (
        "*cls**sent_0*_It_was*mask*.*sep+*",
        {"0": "terrible", "1": "bad", "2": "okay", "3": "good", "4": "great"},
    ),
    "mr": ("*cls**sent_0*_It_was*mask*.*sep+*", {"0": "terrible", "1": "great"}),
    "cr": ("*cls**sent_0*_It_was*mask*.*sep+*", {"0": "terrible", "1": "great"}),
    "mpqa": ("*cls**sent_0*_It_was*mask*.*sep+*", {"0": "terrible", "1": "great"}),
    "subj": ("*cls**sent_0*_This_is*mask*.*sep+*", {"0": "subjective", "1": "objective"}),
    "trec": (
        "*cls**mask*:*+sent_0**sep+*",
        {
            "0": "Description",
            "1": "Entity",
            "2": "Expression",
            "3": "Human",
            "4": "Location",
            "5": "Number",
        },
    ),  # fmt: skip
    "CoLA": ("*cls**sent_0*_This_is*mask*.*sep+*", {"0": "incorrect", "1": "correct"}),
    "MNLI": (
        "*cls**sent-_0*?*mask*,*+sentl_1**sep+*",
        {"contradiction": "No", "entailment": "Yes", "neutral": "Maybe"},
    ),
    "SNLI": (
        "*cls**sent-_0*?*mask*,*+sentl_1**sep+*",
        {"contradiction": "No", "entailment": "Yes", "neutral": "Maybe"},
    ),
    "QNLI": (
        "*cls**sent-_0*?*mask*,*+sentl_1**sep+*",
        {"not_entailment": "No", "entailment": "Yes"},
    ),
    "RTE": (
        "*cls**sent-_0*?*mask*,*+sentl_1**sep+*",
        {"not_entailment": "No", "entailment": "Yes"},
    ),
    "MRPC": ("*cls**sent_0**mask*,*+sentl_1**sep+*", {"0": "No", "1": "Yes"}),
    "QQP": ("*cls**sent_0**mask*,*+sentl_1**sep+*", {"0": "No", "1": "Yes"}),
    "STS-B": ("*cls**sent_0**mask*,*+sentl_1**sep+*", {"0": "No", "1": "Yes"}),
}


def _lm_bff_render(template: str, sentences: list[str], mask: str) -> str:
    """What LM-BFF's template language makes of the sentences (without cls / sep)."""
    out = ""
    for part in template.split("*"):
        if part in ("", "cls", "sep+"):
            continue
        if part == "mask":
            out += mask
            continue
        space, part = (" ", part[1:]) if part.startswith("+") else ("", part)
        if part.startswith("sent"):
            kind, index = part.split("_")
            text = sentences[int(index)]
            text = text[:-1] if kind == "sent-" else text
            text = text[:1].lower() + text[1:] if kind == "sentl" else text
            out += space + text
        else:
            out += space + part.replace("_", " ")
    return out


@pytest.mark.parametrize("name", sorted(LM_BFF))
def test_builtin_tasks_follow_lm_bff_table(name):
    template, mapping = LM_BFF[name]
    task = get_task(name.lower())
    assert task.name == name and task is get_task(name.upper())
    assert task.num_labels == len(mapping)
    for value, word in mapping.items():
        names = task.label_names
        label = names.index(value) if value in names else int(value)
        assert task.label_words[label] == word, (value, word)
    pair = template.count("sent") == 2
    assert task.text_fields == (("text_a", "text_b") if pair else ("text_a",))
    sentences = ["The Dogs bark loudly.", "Cats meow at night."]
    example = Example(sentences[0], 0, sentences[1] if pair else None)
    assert task.render(example, "<mask>")[0] == _lm_bff_render(template, sentences, "<mask>")
    assert task.label_context("mlm")[1] == " ", "LM-BFF scores each label word with a space"


def test_builtin_causal_prompts_and_descriptions():
    sst5 = get_task("SST-5")
    assert sst5.render(Example("Fine.", 0), "", kind="causal")[0] == "Fine. It was"
    assert sst5.descriptions() == tuple(f"It was {w}." for w in sst5.label_words)
    mnli = get_task("mnli")
    prompt = mnli.render(Example("A man sleeps.", 0, "He rests."), "", kind="causal")[0]
    assert prompt == 'Suppose A man sleeps. Can we infer that "He rests."? Yes, No, or Maybe?\n'
    assert mnli.words_for("causal") == ("No", "Yes", "Maybe")
    for name in list_tasks():
        task = get_task(name)
        assert len(task.descriptions()) == task.num_labels
        assert all("?" not in d and d.endswith(".") for d in task.descriptions()), name
        assert task.has_mask("causal") and task.template_for("causal").endswith("{mask}"), name
    assert get_task("demo").num_labels == 2
    assert set(list_tasks()) == {key.lower() for key in LM_BFF} | {"demo", "mnli-mm"}


@pytest.mark.parametrize("name", ["sst2", "SST2", "sst-2", "Sst_2", " SST-2 "])
def test_get_task_aliases(name):
    assert get_task(name) is get_task("SST-2")


@pytest.mark.parametrize(
    ("alias", "name"),
    [("sst5", "sst-5"), ("STS_B", "STS-B"), ("stsb", "STS-B"), ("mnli_mm", "MNLI-mm"),
     ("Cola", "CoLA"), ("TREC", "trec"), ("Subj", "subj")],
)  # fmt: skip
def test_get_task_aliases_of_the_suite(alias, name):
    assert get_task(alias).name == name


def test_get_task_errors():
    with pytest.raises(ValueError, match="unknown task 'wnli'.*sst-2"):
        get_task("wnli")
    with pytest.raises(TypeError):
        get_task(3)
    task = Task.custom("{text_a} {mask}", ["a", "b"])
    assert get_task(task) is task


def test_render_sst2_for_mlm_and_causal():
    task = get_task("sst-2")
    text, spans = task.render(Example("  a fine film ", 1), "<mask>")
    assert text == "a fine film It was<mask>."
    assert text[slice(*spans["text_a"])] == "a fine film"
    text, spans = task.render(Example("a fine film", 1), "<mask>", kind="causal")
    assert text == "a fine film It was"
    assert spans == {"text_a": (0, 11)}


def test_render_rte_modifiers_and_causal_template():
    task = get_task("rte")
    ex = Example("Dogs bark loudly.", 0, "Cats meow.")
    text, spans = task.render(ex, "[MASK]")
    assert text == "Dogs bark loudly?[MASK], cats meow."
    assert text[slice(*spans["text_b"])] == "cats meow."
    causal, _ = task.render(ex, "", kind="causal")
    assert causal == 'Dogs bark loudly.\nDoes this mean that "Cats meow." is true? Yes or No?\n'
    with pytest.raises(ValueError, match="no text_b"):
        task.render(Example("Dogs bark.", 0), "[MASK]")


def test_label_context():
    assert get_task("sst-2").label_context("mlm") == ("Text It was", " ")
    assert get_task("trec").label_context("mlm") == ("", " ")
    prefix, space = get_task("rte").label_context("causal")
    assert prefix.endswith("Yes or No?\n") and space == ""
    assert Task.custom("{text_a} It was{mask}", ["a", "b"]).label_context("mlm")[1] == ""


def test_custom_template_syntax():
    task = Task.custom(
        "{{note}} {text_a|strip_punct|upper_first} :: {text_b|lower_first} -> {mask}!",
        ["no", "yes"],
        name="pairs",
    )
    assert task.name == "pairs" and task.text_fields == ("text_a", "text_b")
    text, _ = task.render(Example("hello there!!", 0, "General Kenobi"), "<m>")
    assert text == "{note} Hello there :: general Kenobi -><m>!"
    assert task.descriptions() == ("{note} :: -> no!", "{note} :: -> yes!")
    assert task.has_mask() and task.has_mask("causal")


def test_descriptions_and_encoder_only_task():
    task = Task.custom("{text_a}", label_descriptions=["Bad.", "Good.", "Meh."])
    assert task.num_labels == 3 and not task.has_mask()
    assert task.descriptions() == ("Bad.", "Good.", "Meh.")
    with pytest.raises(ValueError, match="need one"):
        task.render(Example("x", 0), "<mask>")
    with pytest.raises(ValueError, match="only label_descriptions"):
        task.words_for("mlm")


def test_causal_template_is_used_for_causal_only():
    task = Task.custom(
        "{mask}: {text_a}",
        ["A", "B"],
        causal_template="{text_a} Type: {mask}",
        causal_label_words=["alpha", "beta"],
    )
    assert task.template_for("mlm") == "{mask}: {text_a}"
    assert task.words_for("causal") == ("alpha", "beta")
    assert task.words_for("mlm") == ("A", "B")
    assert task.render(Example("q", 0), "", kind="causal")[0] == "q Type:"


def test_causal_rejects_field_after_mask():
    task = Task.custom("{mask}: {text_a}", ["A", "B"])
    with pytest.raises(ValueError, match="text field after"):
        task.render(Example("q", 0), "", kind="causal")


@pytest.mark.parametrize(
    ("template", "words", "match"),
    [
        ("{text_a} {label}", ["a", "b"], "unknown placeholder"),
        ("{text_a|shout} {mask}", ["a", "b"], "unknown modifier"),
        ("{text_a} {mask} {mask}", ["a", "b"], "at most one"),
        ("It was {mask}", ["a", "b"], "must contain"),
        ("{text_a} {mask", ["a", "b"], "unbalanced"),
        ("{text_a} } {mask}", ["a", "b"], "unbalanced"),
        ("   ", ["a", "b"], "non-empty"),
        ("{text_a} {mask|lower_first}", ["a", "b"], "no modifiers"),
        ("{text_a} {mask}", ["a"], "at least two"),
        ("{text_a} {mask}", ["a", " "], "non-empty strings"),
    ],
)
def test_custom_template_errors(template, words, match):
    with pytest.raises(ValueError, match=match):
        Task.custom(template, words)


def test_task_label_count_errors():
    with pytest.raises(TypeError, match="single string"):
        Task.custom("{text_a} {mask}", "great")
    with pytest.raises(ValueError, match="one entry per class"):
        Task.custom("{text_a} {mask}", ["a", "b"], label_descriptions=["x", "y", "z"])
    with pytest.raises(ValueError, match="needs label_words or label_descriptions"):
        Task.custom("{text_a} {mask}")
    with pytest.raises(ValueError, match="needs a"):
        Task.custom("{text_a} {mask}", ["a", "b"], causal_template="{text_a}")
    with pytest.raises(ValueError, match="different text fields"):
        Task.custom("{text_a} {mask}", ["a", "b"], causal_template="{text_a} {text_b} {mask}")


def test_task_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_task("sst-2").template = "x"
