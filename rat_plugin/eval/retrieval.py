"""Passkey / needle-in-a-haystack retrieval: prompts of a given token length with the needle at a
given depth, and their scoring (tools/retrieval.py runs them).

A prompt is [BOS] + instruction + haystack with the needle "The pass key is 71432. Remember it.
71432 is the pass key." between two of its sentences at relative depth d (0: first, 1: last) +
"What is the pass key? The pass key is". The haystack is the passkey test's filler sentences
(Mohtashami & Jaggi 2023), or the sentences of a text (needle in a haystack); whole sentences
are added while they fit the length. The answer is right when the first number the model
generates is the pass key.
"""

import itertools
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
               "memorize it. I will quiz you about the important information there.")
FILLER = ["The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
          "There and back again."]
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
KEY_DIGITS = 5


@dataclass
class Prompt:
    tokens: list[int]
    key: str
    length: int  # the length asked for; len(tokens) is at most this
    depth: float
    needle_at: int  # index in ``tokens`` of the needle's first token
    haystack: tuple[int, int]  # [start, end) of the haystack in ``tokens``, needle included


def sentences(text: str) -> list[str]:
    """The sentences of a text (split after . ! ? followed by white space)."""
    return [s for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())) if s]


class PromptBuilder:
    """Prompts from one tokenizer and haystack: ``encode(text) -> ids`` without special tokens;
    ``haystack`` is a list of sentences (FILLER when None), repeated as often as needed."""

    def __init__(self, encode: Callable[[str], list[int]], bos: int | None,
                 haystack: Sequence[str] | None = None):
        self.encode = encode
        self.head = ([bos] if bos is not None else []) + encode(INSTRUCTION)
        self.question = encode(" " + QUESTION)
        self.units = [encode(" " + s) for s in (FILLER if haystack is None else haystack)]
        if not self.units:
            raise ValueError("the haystack text has no sentence: give a text file with some")

    def minimum_length(self) -> int:
        needle = self.encode(" " + NEEDLE.format(key="0" * KEY_DIGITS))
        return len(self.head) + len(needle) + len(self.question) + len(self.units[0])

    def build(self, length: int, depth: float, key: str) -> Prompt:
        needle = self.encode(" " + NEEDLE.format(key=key))
        budget = length - len(self.head) - len(needle) - len(self.question)
        units: list[list[int]] = []
        used = 0
        for unit in itertools.cycle(self.units):
            if used + len(unit) > budget:
                break
            units.append(unit)
            used += len(unit)
        if not units:
            raise ValueError(
                f"length {length} leaves no room for a haystack sentence: use lengths of at "
                f"least {self.minimum_length()} tokens"
            )
        # The sentence boundary nearest to depth * haystack tokens.
        bounds = [sum(map(len, units[:i])) for i in range(len(units) + 1)]
        split = min(range(len(bounds)), key=lambda i: abs(bounds[i] - depth * used))
        before = [t for unit in units[:split] for t in unit]
        after = [t for unit in units[split:] for t in unit]
        tokens = self.head + before + needle + after + self.question
        start = len(self.head)
        return Prompt(tokens, key, length, depth, start + len(before),
                      (start, start + used + len(needle)))


def first_number(text: str) -> str | None:
    match = re.search(r"\d+", text)
    return match.group() if match else None


def is_correct(answer: str, key: str) -> bool:
    """The first number in the generated text is the key."""
    return first_number(answer) == key


@dataclass
class Cell:
    length: int
    depth: float
    prompt_tokens: int  # the longest prompt of the cell
    correct: int
    trials: int
    keys: list[str]  # per trial: the pass key hidden
    answers: list[str]  # per trial: the text generated (a wrong digit is not a blank)

    @property
    def accuracy(self) -> float:
        return self.correct / self.trials


def run(builder: PromptBuilder, answer: Callable[[list[list[int]]], list[str]],
        lengths: Sequence[int], depths: Sequence[float], trials: int, seed: int = 0,
        batch_size: int = 8) -> list[Cell]:
    """Accuracy per (length, depth) over ``trials`` random keys each; ``answer(prompts)`` gives
    the generated text of each token prompt (a batch of at most ``batch_size``)."""
    rng = random.Random(seed)
    low, high = 10 ** (KEY_DIGITS - 1), 10**KEY_DIGITS - 1
    cells = []
    for length in lengths:
        prompts = [builder.build(length, depth, str(rng.randint(low, high)))
                   for depth in depths for _ in range(trials)]
        answers = []
        for start in range(0, len(prompts), batch_size):
            answers += answer([p.tokens for p in prompts[start: start + batch_size]])
        results = list(zip(prompts, answers))
        for i, depth in enumerate(depths):
            cell = results[i * trials: (i + 1) * trials]
            cells.append(Cell(length, depth, max(len(p.tokens) for p, _ in cell),
                              sum(is_correct(a, p.key) for p, a in cell), trials,
                              [p.key for p, _ in cell], [a for _, a in cell]))
    return cells
