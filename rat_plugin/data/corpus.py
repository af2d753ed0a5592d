"""A small English-like corpus from a seeded grammar (the debug configs' training data).

Every sentence is produced by the templates below from a fixed seed, so the corpus is the
project's own text under the project's licence (BSD-3-Clause): no third-party data, no network.
It has enough structure (agreement, recurring characters, short stories) for a tiny model to
show a clearly falling loss within a few dozen steps.
"""

import random

NAMES = [
    "Anna", "Ben", "Clara", "David", "Emma", "Felix", "Grace", "Hugo", "Iris", "Jack",
    "Lena", "Max", "Nora", "Oscar", "Paula", "Sam", "Tara", "Victor", "Wendy", "Zoe",
]
ANIMALS = ["cat", "dog", "bird", "fox", "horse", "rabbit", "mouse", "duck", "bear", "frog"]
THINGS = [
    "ball", "book", "box", "cup", "kite", "hat", "lamp", "key", "boat", "drum",
    "apple", "letter", "map", "coin", "shell", "stone", "clock", "bell", "rope", "basket",
]
PLACES = [
    "garden", "forest", "kitchen", "river", "market", "school", "park", "library", "village",
    "beach", "hill", "farm", "station", "bridge", "harbour",
]
ADJECTIVES = [
    "little", "big", "red", "blue", "green", "old", "new", "small", "bright", "quiet",
    "happy", "tired", "curious", "brave", "warm", "cold", "heavy", "shiny", "yellow", "soft",
]
FEELINGS = ["happy", "sad", "surprised", "proud", "sleepy", "worried", "calm", "excited"]
VERBS_PAST = [
    "found", "lost", "carried", "painted", "opened", "dropped", "cleaned", "hid", "bought",
    "gave away", "picked up", "looked at",
]
MOVES = ["walked", "ran", "went", "hurried", "wandered", "drove", "sailed", "climbed"]
TIMES = ["In the morning", "After lunch", "In the evening", "One day", "Later", "At noon"]
WEATHER = ["sunny", "rainy", "windy", "cloudy", "snowy", "foggy"]
NUMBERS = ["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _story(rng: random.Random) -> str:
    """One short document: a character, a thing, a place and a few linked sentences."""
    name, friend = rng.sample(NAMES, 2)
    animal, thing, place = rng.choice(ANIMALS), rng.choice(THINGS), rng.choice(PLACES)
    adj, adj2 = rng.sample(ADJECTIVES, 2)
    sentences = [
        f"{rng.choice(TIMES)}, {name} {rng.choice(MOVES)} to the {place}.",
        f"The weather was {rng.choice(WEATHER)}.",
        f"There {name} saw {_a(adj)} {animal} near {_a(adj2)} {thing}.",
    ]
    for _ in range(rng.randint(2, 6)):
        kind = rng.randrange(6)
        if kind == 0:
            sentences.append(f"{name} {rng.choice(VERBS_PAST)} the {thing}.")
        elif kind == 1:
            sentences.append(f"The {animal} was {rng.choice(FEELINGS)}.")
        elif kind == 2:
            sentences.append(
                f"{name} and {friend} counted {rng.choice(NUMBERS)} {rng.choice(THINGS)}s."
            )
        elif kind == 3:
            sentences.append(f'"Look at the {adj} {animal}!" said {friend}.')
        elif kind == 4:
            sentences.append(
                f"Then {friend} {rng.choice(MOVES)} to the {rng.choice(PLACES)} "
                f"with the {thing}."
            )
        else:
            sentences.append(f"{name} felt {rng.choice(FEELINGS)} because of the {animal}.")
    sentences.append(f"At the end of the day, {name} went home and the {animal} slept.")
    return " ".join(sentences)


def generate_splits(
    train_docs: int, validation_docs: int, seed: int
) -> tuple[list[str], list[str]]:
    """(train, validation) stories from one seeded stream, identical for identical arguments.

    The validation split continues the training split's stream (the same grammar and
    distribution), skipping any story the training split already holds: the two are disjoint.
    """
    rng = random.Random(seed)
    train = [_story(rng) for _ in range(train_docs)]
    seen, validation = set(train), []
    while len(validation) < validation_docs:
        story = _story(rng)
        if story not in seen:
            seen.add(story)
            validation.append(story)
    return train, validation
