"""Prompt templates of long-context tasks, shared by fine-tuning (``rat_plugin.data.sft``) and
scoring by generation: one table, one way to render a record, one way to cut a prompt.

A template is a ``str.format`` string over a record's fields (``{context}``, ``{input}``;
Python's field syntax reaches into nested records too, e.g. ``{question[text]}``; literal
braces are doubled). The answer is not part of the template: fine-tuning appends it after the
prompt, generation continues the prompt. The RAT paper's prompts (CLAIRE-Labo/RAT,
tokenize/sft_util.py) are built in by name, over LongBench's record fields.
"""

import string
from collections.abc import Mapping, Sequence

TEMPLATES = {
    # The paper's fine-tuning prompts, over LongBench's fields (input: the question).
    "narrativeqa": "Story: {context}\n\nQuestion: {input}\n\nAnswer:",
    "qmsum": "Transcript: {context}\n\nQuestion: {input}\n\nAnswer:",
    "wikisum": "Article: {context}\n\nQuestion: {input}\n\nAnswer:",
    # The generated long-context QA set (rat_plugin/data/longqa.py), in the paper's form.
    "rat_longqa": "Story: {context}\n\nQuestion: {input}\n\nAnswer:",
}


class TemplateError(ValueError):
    """A template or a record that cannot be rendered; the message is one line."""


def resolve(template: str) -> str:
    """The template string of a name in ``TEMPLATES``, or ``template`` itself when it is a
    template string (it names at least one field)."""
    if template in TEMPLATES:
        return TEMPLATES[template]
    if not fields(template):
        raise TemplateError(
            f"template {template!r} is neither a built-in name ({', '.join(TEMPLATES)}) nor a "
            "template string naming a field such as {context}"
        )
    return template


def fields(template: str) -> list[str]:
    """The fields a template string names, in order (a name in ``TEMPLATES``: its string's)."""
    text = TEMPLATES.get(template, template)
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as err:
        raise TemplateError(f"template {template!r} is not a format string ({err}): "
                            "double a literal brace as {{ or }}") from None
    names = [field for _, field, _, _ in parsed if field is not None]
    if any(name == "" or name[0].isdigit() for name in names):
        raise TemplateError(f"template {template!r} has a positional field ({{}} or {{0}}): "
                            "name the record's field, e.g. {context}")
    return names


def render(template: str, record: Mapping) -> str:
    """The prompt of ``record`` under ``template`` (a name in ``TEMPLATES`` or a template
    string); a field the record lacks, or holds as null, is one line naming it."""
    text = resolve(template)
    formatter = string.Formatter()
    for field in fields(text):
        try:
            value, _ = formatter.get_field(field, (), record)
        except (KeyError, IndexError, TypeError, AttributeError):
            has = ", ".join(map(str, record)) if isinstance(record, Mapping) else type(record)
            raise TemplateError(
                f"the record has no field {field!r}, which template {_name(template)} names "
                f"(the record has: {has}): use a template over the record's fields"
            ) from None
        if value is None:
            raise TemplateError(f"the record's field {field!r}, which template "
                                f"{_name(template)} names, is null (or missing in this record "
                                "of a table): give it a value or drop the record")
    try:
        return text.format_map(record)
    except (ValueError, TypeError) as err:  # a bad format spec or conversion
        raise TemplateError(f"template {_name(template)} cannot render this record ({err})") \
            from None


def middle_truncate(ids: Sequence, budget: int) -> list:
    """``ids`` cut to at most ``budget`` items by dropping the middle: the first ``budget // 2``
    and the last ``budget - budget // 2`` are kept (the paper's cut of a long prompt)."""
    if budget < 0:
        raise ValueError(f"budget={budget}: give a length >= 0")
    ids = list(ids)
    if len(ids) <= budget:
        return ids
    first = budget // 2
    return ids[:first] + ids[len(ids) - (budget - first):]


def _name(template: str) -> str:
    return repr(template) if template in TEMPLATES else repr(_short(template))


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
