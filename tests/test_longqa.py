"""The generated long-context QA set (rat_plugin/data/longqa.py): LongBench's record format, the
answer (a word of the answer lists, of the kind the question asks for) stated once, right after
the marker phrase the question repeats; with more facts, the question picks its own."""

import json
import re

from rat_plugin.data.longqa import ANSWER_NAMES, ANSWER_THINGS, generate_longqa
from rat_plugin.data.prepare import LONGQA

KEYS = {"input", "context", "answers", "length", "dataset", "language", "all_classes", "_id"}


def read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def fact_for(question: str) -> str:
    """The sentence that answers ``question``, as a regex with the answer as group 1."""
    who = re.fullmatch(r"Who does the (\w+ \w+) belong to\?", question)
    if who:
        return rf"The {who[1]} belongs to (\w+)\."
    what = re.fullmatch(r"What does (\w+) keep in the (\w+)\?", question)
    assert what, question
    return rf"{what[1]} keeps an? (\w+) in the {what[2]}\."


def test_prepare_writes_the_seeded_set(debug_assets):
    folder = debug_assets / "data" / "rat_longqa"
    splits = {s: read(folder / f"{s}.jsonl") for s in ("train", "validation", "test")}
    assert {s: len(r) for s, r in splits.items()} == {
        s: LONGQA[s] for s in ("train", "validation", "test")}
    again = generate_longqa({s: LONGQA[s] for s in splits}, LONGQA["seed"],
                            tuple(LONGQA["stories"]), LONGQA["facts"])
    assert again == splits  # deterministic
    contexts = [{r["context"] for r in records} for records in splits.values()]
    assert not (contexts[0] & contexts[1] or contexts[0] & contexts[2] or contexts[1] & contexts[2])


def test_each_answer_is_stated_once_after_its_marker(debug_assets):
    records = read(debug_assets / "data" / "rat_longqa" / "test.jsonl")
    kinds = set()
    for i, r in enumerate(records):
        assert set(r) == KEYS and r["_id"] == f"rat_longqa-test-{i}"
        assert (r["dataset"], r["language"], r["all_classes"]) == ("rat_longqa", "en", None)
        assert r["length"] == len(r["context"].split())
        (answer,) = r["answers"]
        assert re.findall(fact_for(r["input"]), r["context"]) == [answer]
        assert len(re.findall(rf"\b{answer}\b", r["context"])) == 1, r
        kind = r["input"].split()[0]
        kinds.add(kind)
        assert answer in (ANSWER_NAMES if kind == "Who" else ANSWER_THINGS)
        assert len(re.findall(r"belongs to|keeps an? ", r["context"])) == LONGQA["facts"]
    assert kinds == {"Who", "What"}


def test_with_more_facts_the_question_picks_its_own():
    records = generate_longqa({"test": 50}, seed=7, stories=(2, 2), facts=3)["test"]
    for r in records:
        (answer,) = r["answers"]
        assert re.findall(fact_for(r["input"]), r["context"]) == [answer]
        assert len(re.findall(r"belongs to|keeps an? ", r["context"])) == 3
        others = set(re.findall(r"belongs to (\w+)|keeps an? (\w+)", r["context"])) - {
            (answer, ""), ("", answer)}
        assert len(others) == 2  # two distractor facts with other answers
