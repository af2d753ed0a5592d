"""The prompt templates shared by fine-tuning and scoring (rat_plugin/data/templates.py)."""

import pytest

from rat_plugin.data.templates import TEMPLATES, TemplateError, middle_truncate, render

RECORD = {"context": "Anna went to the park.", "input": "Where did Anna go?", "answers": ["park"],
          "question": {"text": "Who?"}}


def test_the_papers_templates_render_as_its_prompts():
    # CLAIRE-Labo/RAT tokenize/sft_util.py, PROMPT_DICT
    assert render("narrativeqa", RECORD) == (
        "Story: Anna went to the park.\n\nQuestion: Where did Anna go?\n\nAnswer:")
    assert render("qmsum", RECORD).startswith("Transcript: Anna went")
    assert render("wikisum", RECORD).startswith("Article: Anna went")
    assert set(TEMPLATES) >= {"narrativeqa", "qmsum", "wikisum", "rat_longqa"}


def test_a_user_template_string_reaches_nested_fields():
    assert render("Q: {question[text]} ({answers[0]}) {{x}}", RECORD) == "Q: Who? (park) {x}"


@pytest.mark.parametrize("template, record, message", [
    ("narrativeqa", {"context": "c"}, "the record has no field 'input', which template "
     "'narrativeqa' names (the record has: context)"),
    ("Doc: {document}", RECORD, "the record has no field 'document', which template "
     "'Doc: {document}' names"),
    ("{answers[2]}", RECORD, "the record has no field 'answers[2]'"),
    ("narrativeqa", {"context": None, "input": "q"}, "the record's field 'context', which "
     "template 'narrativeqa' names, is null (or missing in this record of a table): give it"),
    ("storyqa", RECORD, "template 'storyqa' is neither a built-in name (narrativeqa, "),
    ("Story: {context", RECORD, "is not a format string"),
    ("Story: {}", RECORD, "has a positional field"),
])
def test_bad_templates_and_records_are_one_line(template, record, message):
    with pytest.raises(TemplateError) as err:
        render(template, record)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_middle_truncate_keeps_the_first_and_last_halves():
    ids = list(range(10))
    assert middle_truncate(ids, 10) == ids and middle_truncate(ids, 12) == ids
    assert middle_truncate(ids, 5) == [0, 1, 7, 8, 9]  # the odd one goes to the end
    assert middle_truncate(ids, 4) == [0, 1, 8, 9]
    assert middle_truncate(ids, 1) == [9]
    assert middle_truncate(ids, 0) == []
    with pytest.raises(ValueError, match="budget=-1"):
        middle_truncate(ids, -1)
