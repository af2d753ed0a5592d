"""RULER's needle-in-a-haystack samples (NVIDIA/RULER, as lm_eval 0.4.13's ``niah_*`` tasks
build them) from a local haystack text and the model's tokenizer, plain Python.

lm_eval's own generator needs wonderwords, nltk's punkt data and Paul Graham's essays from the
hub; this one takes the essay haystack from a local text (split into sentences at . ! ?), keys
from a built-in adjective-noun list, and sizes each prompt with the tokenizer it is given. The
rest is RULER's: the needle sentence, the question template and answer prefix, the 40 insertion
depths, the eight configurations (``TASKS``), and the fit: a prompt's tokens plus
``tokens_to_generate`` stay within the length asked for.
"""

import random
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

TEMPLATE = ("Some special magic {type_needle_v} are hidden within the following text. Make sure "
            "to memorize it. I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
            "What are all the special magic {type_needle_v} for {query} mentioned in the "
            "provided text?")
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
REPEAT = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
DEPTHS = [round(100 * i / 39) for i in range(40)]  # RULER's np.linspace(0, 100, 40), rounded
TOKENS_TO_GENERATE = 128  # RULER's answer room (lm_eval's max_gen_toks for niah)


@dataclass(frozen=True)
class Needles:
    haystack: str  # "essay" (the local text), "repeat" (REPEAT), "needle" (distractor needles)
    key: str  # "words", "numbers", "uuids"
    value: str
    num_k: int = 1  # keys hidden
    num_v: int = 1  # values per key
    num_q: int = 1  # keys asked for


TASKS = {
    "niah_single_1": Needles("repeat", "words", "numbers"),
    "niah_single_2": Needles("essay", "words", "numbers"),
    "niah_single_3": Needles("essay", "words", "uuids"),
    "niah_multikey_1": Needles("essay", "words", "numbers", num_k=4),
    "niah_multikey_2": Needles("needle", "words", "numbers"),
    "niah_multikey_3": Needles("needle", "uuids", "uuids"),
    "niah_multivalue": Needles("essay", "words", "numbers", num_v=4),
    "niah_multiquery": Needles("essay", "words", "numbers", num_q=4),
}

ADJECTIVES = ("amber", "brave", "calm", "damp", "eager", "fancy", "gentle", "hollow", "icy",
              "jolly", "keen", "lucky", "mellow", "narrow", "odd", "proud", "quiet", "rapid",
              "shiny", "tidy", "upbeat", "vivid", "wary", "young", "zesty", "bold", "crisp",
              "dusty", "fuzzy", "grand")
NOUNS = ("anchor", "basket", "candle", "dolphin", "engine", "falcon", "garden", "harbor",
         "island", "jacket", "kettle", "ladder", "meadow", "needle", "orchard", "pepper",
         "quartz", "river", "saddle", "tunnel", "umbrella", "valley", "walnut", "yacht",
         "zipper", "bridge", "canyon", "desert", "forest", "glacier")


def sentences(text: str) -> list[str]:
    """The sentences of a text: split after . ! ? followed by white space."""
    return [s for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())) if s]


def _random(kind: str, rng: random.Random) -> str:
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))  # RULER's 7 digits
    if kind == "words":
        return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


class Generator:
    """Samples of one configuration: ``encode(text)`` is the prompt's token ids as the model
    sees them (BOS included when it has one); ``words`` the haystack text's words (essay
    configurations only)."""

    def __init__(self, needles: Needles, encode: Callable[[str], list[int]],
                 words: Sequence[str] = (), tokens_to_generate: int = TOKENS_TO_GENERATE):
        if needles.haystack == "essay" and not words:
            raise ValueError("the haystack text is empty: give a text with some sentences")
        self.needles, self.encode, self.words = needles, encode, list(words)
        self.tokens_to_generate = tokens_to_generate

    def sample(self, units: int, rng: random.Random) -> dict:
        """A prompt over ``units`` haystack units (essay: words; otherwise sentences)."""
        n = self.needles
        keys = [_random(n.key, rng) for _ in range(max(n.num_k, n.num_q))]
        values = [[_random(n.value, rng) for _ in range(n.num_v)] for _ in keys]
        needles = [NEEDLE.format(type_needle_v=n.value, key=k, value=v)
                   for k, vs in zip(keys, values) for v in vs]
        rng.shuffle(needles)
        if n.haystack == "essay":
            text = sentences(" ".join(self.words[i % len(self.words)] for i in range(units)))
            cuts = [0, *sorted(int(len(text) * d / 100) for d in rng.sample(DEPTHS, len(needles))),
                    len(text)]
            parts = []
            for i, needle in enumerate(needles):
                parts += [" ".join(text[cuts[i]:cuts[i + 1]]), needle]
            context = " ".join(p for p in [*parts, " ".join(text[cuts[-2]:])] if p)
        else:
            filler = [REPEAT if n.haystack == "repeat" else NEEDLE.format(
                type_needle_v=n.value, key=_random(n.key, rng), value=_random(n.value, rng))
                for _ in range(units)]
            for index, needle in zip(sorted(rng.sample(range(units + 1), len(needles)),
                                            reverse=True), needles):
                filler.insert(index, needle)
            context = "\n".join(filler)
        asked = rng.sample(range(len(keys)), n.num_q)
        query = ", ".join(keys[i] for i in asked[:-1]) + ", and " + keys[asked[-1]] \
            if n.num_q > 1 else keys[asked[0]]
        template, kind = TEMPLATE, n.value
        if n.num_q * n.num_v == 1:  # RULER's singular wording
            template = template.replace("Some", "A").replace("are all", "is") \
                .replace("are", "is").replace("answers", "answer")
            kind = kind[:-1]
        prefix = (f"The special magic {kind} for {query} mentioned in the provided text "
                  f"{'is' if n.num_q * n.num_v == 1 else 'are'}")
        return {"input": template.format(type_needle_v=kind, context=context, query=query),
                "outputs": [v for i in asked for v in values[i]], "gen_prefix": prefix}

    def tokens(self, sample: dict) -> int:
        """The prompt's tokens as lm_eval assembles it (input, a space, the answer prefix)."""
        return len(self.encode(sample["input"] + " " + sample["gen_prefix"]))

    def samples(self, length: int, count: int, seed: int = 42) -> list[dict]:
        """``count`` samples of at most ``length`` tokens with the answer's room, each with as
        much haystack as fits (``units`` found by bisection on the first, shrunk per sample)."""
        budget = length - self.tokens_to_generate

        def fits(units: int, index: int) -> bool:
            return self.tokens(self.sample(units, random.Random(seed + index))) <= budget

        if not fits(1, 0):
            raise ValueError(
                f"length {length} holds no prompt of this task with {self.tokens_to_generate} "
                f"tokens to generate: ask for longer lengths")
        low, high = 1, 2
        while fits(high, 0):
            low, high = high, 2 * high
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if fits(middle, 0) else (low, middle)
        result = []
        for index in range(count):
            units = low
            while units > 1 and not fits(units, index):
                units -= max(1, units // 50)
            sample = self.sample(units, random.Random(seed + index))
            tokens = self.tokens(sample)
            if tokens > budget:
                continue  # RULER skips a sample that does not fit
            result.append({"index": index, **sample, "length": tokens + self.tokens_to_generate,
                           "max_length": length})
        return result
