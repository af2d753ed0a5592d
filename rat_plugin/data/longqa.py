"""``rat_longqa``: a generated long-context question-answering set for fine-tuning and scoring.

Each record is one or more stories of the debug corpus's grammar (``corpus.py``) with a fact
spliced in at a sentence boundary, anywhere: "The red ball belongs to Rosa." or "Ben keeps a
lantern in the park.". The question names the fact's key ("Who does the red ball belong to?",
"What does Ben keep in the park?") and the answer is the name or thing the fact states: a word
from ``ANSWER_NAMES`` / ``ANSWER_THINGS``, which the stories never use, so the context holds it
exactly once (RULER's single needle, in words). The stories' own names and things are the
distractors. With ``facts`` > 1 more facts are spliced in, of alternating kinds with distinct
keys and answers; the question asks about the first, so its words pick the fact. Records are
in LongBench's format::

    {"input": question, "context": stories, "answers": [answer], "length": words in context,
     "dataset": "rat_longqa", "language": "en", "all_classes": null, "_id": "rat_longqa-test-7"}

Deterministic for a seed, the project's own text (BSD-3-Clause), generated in about a second.
"""

import random
import re

from rat_plugin.data.corpus import ADJECTIVES, NAMES, PLACES, THINGS, _a, _story

DATASET = "rat_longqa"
# Answers: names and things the stories never use, so each is stated once, by its fact.
ANSWER_NAMES = [
    "Quentin", "Rosa", "Ulla", "Yusuf", "Ingrid", "Kofi", "Mira", "Pablo", "Sven", "Tomas",
    "Elif", "Hana", "Ravi", "Lucia", "Boris", "Dara", "Gwen", "Joel", "Kira", "Omar",
]
ANSWER_THINGS = [
    "lantern", "violin", "compass", "ladder", "mirror", "pillow", "ribbon", "saddle", "teapot",
    "trumpet", "wagon", "whistle", "feather", "kettle", "candle", "pencil", "glove", "scarf",
    "helmet", "anchor",
]


def _sentences(text: str) -> list[str]:
    return re.findall(r'[^.!?"]*(?:"[^"]*"[^.!?"]*)*[.!?]', text)


def _facts(rng: random.Random, count: int) -> list[tuple[str, str, str]]:
    """``count`` facts (sentence, question, answer) with distinct keys and answers; the kinds
    alternate from a random first one."""
    facts, keys, answers = [], set(), set()
    first = rng.randrange(2)
    while len(facts) < count:
        if (first + len(facts)) % 2 == 0:  # a name, keyed by a described thing
            answer = rng.choice(ANSWER_NAMES)
            adj, thing = rng.choice(ADJECTIVES), rng.choice(THINGS)
            key = (adj, thing)
            fact = f"The {adj} {thing} belongs to {answer}."
            question = f"Who does the {adj} {thing} belong to?"
        else:  # a thing, keyed by its keeper and place
            answer = rng.choice(ANSWER_THINGS)
            keeper, place = rng.choice(NAMES), rng.choice(PLACES)
            key = (keeper, place)
            fact = f"{keeper} keeps {_a(answer)} in the {place}."
            question = f"What does {keeper} keep in the {place}?"
        if key in keys or answer in answers:
            continue
        keys.add(key)
        answers.add(answer)
        facts.append((fact, question, answer))
    return facts


def make_record(rng: random.Random, stories: int, facts: int) -> dict:
    """One record: ``stories`` stories and ``facts`` facts (the first is asked about), each at
    a random sentence boundary."""
    sentences = [s.strip() for _ in range(stories) for s in _sentences(_story(rng))]
    chosen = _facts(rng, facts)
    for fact, _, _ in chosen:
        sentences.insert(rng.randint(0, len(sentences)), fact)
    context = " ".join(sentences)
    _, question, answer = chosen[0]
    assert re.findall(rf"\b{answer}\b", context) == [answer], (answer, context)
    return {"input": question, "context": context, "answers": [answer],
            "length": len(context.split()), "dataset": DATASET, "language": "en",
            "all_classes": None}


def generate_longqa(
    sizes: dict[str, int], seed: int, stories: tuple[int, int] = (1, 1), facts: int = 1
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
