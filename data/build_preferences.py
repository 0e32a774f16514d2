"""Build ``data/preferences.jsonl``: preference pairs that teach one checkable style rule.

The rule: **answer in one sentence, then stop.** Every pair has a short factual
question (an opposite, a capital, a plural, ...). Both answers start with the same
correct sentence; the *chosen* answer ends there, the *rejected* one rambles on with a
generic filler sentence ("This is a very common question, ...") before it stops. Both
are correct, so the only thing the pair teaches is the style, and the style is easy to
check in generated text: does the answer end after its first sentence?

SmolLM2-135M-Instruct, asked such questions, usually keeps talking after the answer,
so the rule is something DPO has to teach it. Facts and fillers are written here by
hand; a fixed seed picks the fillers and the held-out items, so the file is the same
on every run. Columns: ``prompt``, ``chosen``, ``rejected``, ``answer`` (the
key word a correct answer contains, in its accepted spellings), ``topic``, ``split``
(``train`` or ``test``: test questions never appear in train).

Run ``python data/build_preferences.py`` to rewrite the file.
"""

from __future__ import annotations

import random
from pathlib import Path

SEED = 7
TEST_PER_TOPIC = 3  # the last items of each topic (after shuffling) are held out

# topic -> (question template, answer template, items); {0}, {1}, ... fill from each item,
# whose last element is the key word a correct answer must contain.
TOPICS = {
    "opposite": (
        "What is the opposite of {0}?",
        "The opposite of {0} is {1}.",
        [("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("happy", "sad"),
         ("wet", "dry"), ("full", "empty"), ("early", "late"), ("hard", "soft"), ("loud", "quiet"),
         ("strong", "weak"), ("thick", "thin"), ("near", "far"), ("heavy", "light"), ("clean", "dirty"),
         ("open", "closed")],
    ),
    "capital": (
        "What is the capital of {0}?",
        "The capital of {0} is {1}.",
        [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Germany", "Berlin"),
         ("Spain", "Madrid"), ("Egypt", "Cairo"), ("Russia", "Moscow"), ("China", "Beijing"),
         ("England", "London"), ("Greece", "Athens"), ("Portugal", "Lisbon"), ("Austria", "Vienna"),
         ("Norway", "Oslo"), ("Ireland", "Dublin")],
    ),
    "plural": (
        "What is the plural of {0}?",
        "The plural of {0} is {1}.",
        [("mouse", "mice"), ("child", "children"), ("foot", "feet"), ("tooth", "teeth"), ("man", "men"),
         ("woman", "women"), ("goose", "geese"), ("person", "people"), ("leaf", "leaves"), ("knife", "knives"),
         ("box", "boxes"), ("city", "cities"), ("wolf", "wolves"), ("ox", "oxen")],
    ),
    "past": (
        "What is the past tense of {0}?",
        "The past tense of {0} is {1}.",
        [("go", "went"), ("eat", "ate"), ("run", "ran"), ("see", "saw"), ("write", "wrote"), ("take", "took"),
         ("sing", "sang"), ("swim", "swam"), ("drink", "drank"), ("fly", "flew"), ("speak", "spoke"),
         ("buy", "bought"), ("think", "thought"), ("teach", "taught"), ("catch", "caught"), ("sleep", "slept")],
    ),
    "sides": (
        "How many sides does a {0} have?",
        "A {0} has {1} sides.",
        [("triangle", "three"), ("square", "four"), ("pentagon", "five"), ("hexagon", "six"),
         ("heptagon", "seven"), ("octagon", "eight"), ("decagon", "ten"), ("rectangle", "four"),
         ("nonagon", "nine"), ("dodecagon", "twelve")],
    ),
    "baby": (
        "What is a baby {0} called?",
        "A baby {0} is called a {1}.",
        [("dog", "puppy"), ("cat", "kitten"), ("cow", "calf"), ("sheep", "lamb"), ("horse", "foal"),
         ("frog", "tadpole"), ("kangaroo", "joey"), ("bear", "cub"), ("duck", "duckling"), ("goose", "gosling"),
         ("pig", "piglet"), ("deer", "fawn"), ("owl", "owlet"), ("swan", "cygnet")],
    ),
    "units": (
        "How many {0} are there in {1}?",
        "There are {2} {0} in {1}.",
        [("days", "a week", "seven"), ("months", "a year", "twelve"), ("hours", "a day", "24"),
         ("minutes", "an hour", "60"), ("seconds", "a minute", "60"), ("years", "a decade", "ten"),
         ("years", "a century", "100"), ("centimetres", "a metre", "100"), ("grams", "a kilogram", "1000"),
         ("days", "a fortnight", "14"), ("metres", "a kilometre", "1000"), ("years", "a millennium", "1000")],
    ),
    "colour": (
        "What colour is {0}?",
        "{1} is {2}.",
        [("grass", "Grass", "green"), ("snow", "Snow", "white"), ("a banana", "A banana", "yellow"),
         ("coal", "Coal", "black"), ("a carrot", "A carrot", "orange"), ("a clear sky", "A clear sky", "blue"),
         ("a ripe tomato", "A ripe tomato", "red"), ("milk", "Milk", "white"), ("a lemon", "A lemon", "yellow"),
         ("a fire truck", "A fire truck", "red"), ("chocolate", "Chocolate", "brown"), ("a lime", "A lime", "green")],
    ),
}

# Generic sentences a verbose assistant adds after its answer: true, polite, and empty.
FILLERS = [
    "This is a very common question, and many people ask it.",
    "It is one of those facts that is useful to remember in everyday life.",
    "There is a lot more that could be said about this topic.",
    "Many students learn this at school when they are young.",
    "Knowing this can help you in many different situations.",
    "It is always good to learn new things like this.",
    "I hope this answer helps you understand the topic better.",
    "Let me know if you have any other questions about it.",
    "People often find this topic interesting to think about.",
    "This kind of question often comes up in quizzes and games.",
    "Understanding this is an important part of general knowledge.",
    "It is a simple idea, but it is worth explaining clearly.",
]


OTHER_SPELLINGS = {"three": "3", "four": "4", "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9",
                   "ten": "10", "twelve": "12", "1000": "1,000"}


def accepted(word: str) -> list[str]:
    """The spellings of a key word that count as correct (a number may be written in digits)."""
    return [word, OTHER_SPELLINGS[word]] if word in OTHER_SPELLINGS else [word]


def build(seed: int = SEED) -> list[dict]:
    """All pairs, train first then test, in a fixed order."""
    rng = random.Random(seed)
    rows = {"train": [], "test": []}
    for topic, (question, answer, items) in TOPICS.items():
        items = list(items)
        rng.shuffle(items)
        for i, item in enumerate(items):
            split = "test" if i >= len(items) - TEST_PER_TOPIC else "train"
            sentence = answer.format(*item)
            rows[split].append({
                "prompt": question.format(*item),
                "chosen": sentence,
                "rejected": f"{sentence} {rng.choice(FILLERS)}",
                "answer": accepted(item[-1]),
                "topic": topic,
                "split": split,
            })
    for split in rows.values():
        rng.shuffle(split)  # mix topics so every batch sees several
    return rows["train"] + rows["test"]


def main() -> None:
    from llmbook.data import write_jsonl

    rows = build()
    path = write_jsonl(Path(__file__).resolve().parent / "preferences.jsonl", rows)
    counts = {s: sum(r["split"] == s for r in rows) for s in ("train", "test")}
    print(f"wrote {path} ({counts['train']} train and {counts['test']} test pairs)")


if __name__ == "__main__":
    main()
