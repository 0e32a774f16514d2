"""Generate ``data/lora_task.jsonl``: extract an animal, a colour and a place as JSON.

Each example is a short sentence made from a template and three word lists, followed by
one fixed instruction; the response is a one-line JSON object with the three words:

    prompt:   "Near the bakery, a golden rabbit was looking for food.\\n"
              "Extract the animal, the colour and the place as JSON."
    response: '{"animal": "rabbit", "colour": "golden", "place": "bakery"}'

SmolLM2-135M-Instruct does not answer in this format by default (chapter 3 measures it),
and a short LoRA run teaches it. The held-out ("test") examples use sentence templates
and words that never occur in training, so a model that passes them has learnt the
format and the extraction, not memorised answers.

Run from the repository root: ``python data/build_lora_task.py`` (deterministic).
Chapters 3 (LoRA) and 4 (prefix tuning) train on this task via ``llmbook.extraction``.
"""

from __future__ import annotations

import itertools
import json
import random

OUTPUT = "lora_task.jsonl"
SEED = 0
N_TRAIN, N_TEST = 320, 48
INSTRUCTION = "Extract the animal, the colour and the place as JSON."

TEMPLATES = {
    "train": [
        "The {colour} {animal} slept near the {place}.",
        "Near the {place}, a {colour} {animal} was looking for food.",
        "I saw a {colour} {animal} at the {place} yesterday.",
        "A {colour} {animal} lives behind the {place}.",
        "My sister found a {colour} {animal} in the {place}.",
        "Every morning a {colour} {animal} walks past the {place}.",
    ],
    "test": [
        "Yesterday a {colour} {animal} ran across the {place}.",
        "At the {place} there was a {colour} {animal}.",
        "Someone painted a {colour} {animal} on the wall of the {place}.",
    ],
}
WORDS = {
    "train": {
        "animal": ["fox", "rabbit", "horse", "cat", "dog", "duck", "bear", "mouse", "sheep", "lion",
                   "tiger", "frog", "wolf", "deer", "goose", "turtle", "snake", "donkey", "parrot", "squirrel"],
        "colour": ["red", "blue", "green", "yellow", "black", "white", "brown", "orange", "grey"],
        "place": ["bridge", "bakery", "river", "school", "church", "garden", "station", "market",
                  "farm", "beach", "castle", "forest", "hospital", "museum", "stadium"],
    },
    "test": {
        "animal": ["owl", "camel", "goat", "zebra", "penguin", "monkey", "hedgehog", "badger"],
        "colour": ["purple", "pink", "golden", "silver"],
        "place": ["harbour", "library", "airport", "bakehouse", "lighthouse", "cinema", "zoo"],
    },
}


def response(animal: str, colour: str, place: str) -> str:
    """The target answer: one line of JSON, keys in a fixed order."""
    return json.dumps({"animal": animal, "colour": colour, "place": place})


def make_split(split: str, n: int, rng: random.Random) -> list[dict]:
    words = WORDS[split]
    combos = list(itertools.product(TEMPLATES[split], words["animal"], words["colour"], words["place"]))
    rows = []
    for template, animal, colour, place in rng.sample(combos, n):
        sentence = template.format(animal=animal, colour=colour, place=place)
        rows.append({"prompt": f"{sentence}\n{INSTRUCTION}", "response": response(animal, colour, place),
                     "split": split})
    return rows


def build(seed: int = SEED) -> list[dict]:
    """The data set: train rows, then test rows."""
    for field in ("animal", "colour", "place"):  # held-out words must be new
        overlap = set(WORDS["train"][field]) & set(WORDS["test"][field])
        assert not overlap, f"{field} words in both splits: {overlap}"
    rng = random.Random(seed)
    return make_split("train", N_TRAIN, rng) + make_split("test", N_TEST, rng)


if __name__ == "__main__":  # data/build.py writes the file
    from build import main

    main([__file__])
