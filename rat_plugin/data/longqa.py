"""``rat_longqa``: a generated long-context question-answering set for fine-tuning and scoring.

Each record is a few stories of the debug corpus's grammar (``corpus.py``) with facts spliced in
at sentence boundaries; the question names one fact's key and the answer is the name or object
that fact states, a word the context holds exactly once (facts only use names and objects that
appear nowhere else in the context). Two kinds of facts alternate, each with its marker phrase
("The red ball belongs to Nora." / "Ben keeps a kite in the park."), and the question repeats
its fact's marker and key ("Who does the red ball belong to?"): the other facts are distractors,
so the answer must be found by what the question says, not by position. Records are in
LongBench's format::

    {"input": question, "context": stories, "answers": [answer], "length": words in context,
     "dataset": "rat_longqa", "language": "en", "all_classes": null, "_id": "rat_longqa-test-7"}

Deterministic for a seed, the project's own text (BSD-3-Clause), generated in about a second.
"""

import random
import re

from rat_plugin.data.corpus import ADJECTIVES, NAMES, PLACES, THINGS, _a, _story

DATASET = "rat_longqa"


def _sentences(text: str) -> list[str]:
    return re.findall(r'[^.!?"]*(?:"[^"]*"[^.!?"]*)*[.!?]', text)


def _words(text: str) -> set[str]:
    """The words of ``text``, and the singular of a plural ("keys": "key" too)."""
    words = set(re.findall(r"[A-Za-z]+", text))
    return words | {w[:-1] for w in words if w.endswith("s")}


def _facts(rng: random.Random, used: set[str], count: int) -> list[tuple[str, str, str]]:
    """``count`` facts (sentence, question, answer) with distinct keys, whose answers are names
    or things not in ``used`` (which grows with every word the facts add) and which no other
    fact's key repeats; the kinds alternate from a random first one (two facts: one of each,
    so the question's words say which fact answers it)."""
    facts, keys, answers = [], set(), set()
    first = rng.randrange(2)
    while len(facts) < count:
        if (first + len(facts)) % 2 == 0:  # a name, keyed by a described thing
            answer = rng.choice([n for n in NAMES if n not in used])
            adj, thing = rng.choice(ADJECTIVES), rng.choice(THINGS)
            key = (adj, thing)
            fact = f"The {adj} {thing} belongs to {answer}."
            question = f"Who does the {adj} {thing} belong to?"
        else:  # a thing, keyed by its keeper and place
            answer = rng.choice([t for t in THINGS if t not in used])
            keeper, place = rng.choice(NAMES), rng.choice(PLACES)
            key = (keeper, place)
            fact = f"{keeper} keeps {_a(answer)} in the {place}."
            question = f"What does {keeper} keep in the {place}?"
        if key in keys or answer in used or answers & set(key):
            continue
        keys.add(key)
        answers.add(answer)
        used |= _words(fact)
        facts.append((fact, question, answer))
    return facts


def make_record(rng: random.Random, stories: int, facts: int) -> dict:
    """One record: ``stories`` stories and ``facts`` facts (the first is asked about)."""
    sentences = [s.strip() for _ in range(stories) for s in _sentences(_story(rng))]
    chosen = _facts(rng, _words(" ".join(sentences)), facts)
    for fact, _, _ in chosen:
        sentences.insert(rng.randint(0, len(sentences)), fact)
    context = " ".join(sentences)
    _, question, answer = chosen[0]
    assert re.findall(rf"\b{answer}\b", context) == [answer], (answer, context)
    return {"input": question, "context": context, "answers": [answer],
            "length": len(context.split()), "dataset": DATASET, "language": "en",
            "all_classes": None}


def generate_longqa(
    sizes: dict[str, int], seed: int, stories: tuple[int, int] = (2, 4), facts: int = 3
) -> dict[str, list[dict]]:
    """split -> records for ``sizes`` (e.g. {"train": 4000, "validation": 200, "test": 200}),
    each from its own seeded stream; ``stories`` is the (min, max) stories per context."""
    splits = {}
    for offset, (split, size) in enumerate(sizes.items()):
        rng = random.Random(f"{seed}-{offset}-{split}")
        records = [make_record(rng, rng.randint(*stories), facts) for _ in range(size)]
        for i, record in enumerate(records):
            record["_id"] = f"{DATASET}-{split}-{i}"
        splits[split] = records
    return splits
