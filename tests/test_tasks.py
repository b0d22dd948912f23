import dataclasses

import pytest

from zofast.data import Example
from zofast.tasks import Task, get_task, list_tasks


def test_builtin_tasks_follow_lm_bff():
    sst2 = get_task("SST-2")
    assert sst2.label_words == ("terrible", "great")
    assert sst2.label_descriptions == ("It was terrible.", "It was great.")
    assert sst2.num_labels == 2 and sst2.text_fields == ("text_a",)
    rte = get_task("rte")
    assert rte.label_words == ("Yes", "No") and rte.text_fields == ("text_a", "text_b")
    trec = get_task("TREC")
    assert trec.label_words == (
        "Description",
        "Entity",
        "Expression",
        "Human",
        "Location",
        "Number",
    )
    assert trec.num_labels == 6
    assert get_task("demo").num_labels == 2
    assert list_tasks() == ["demo", "rte", "sst-2", "trec"]


@pytest.mark.parametrize("name", ["sst2", "SST2", "sst-2", "Sst_2", " SST-2 "])
def test_get_task_aliases(name):
    assert get_task(name) is get_task("SST-2")


def test_get_task_errors():
    with pytest.raises(ValueError, match="unknown task 'mnli'.*sst-2"):
        get_task("mnli")
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
