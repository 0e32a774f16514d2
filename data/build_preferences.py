"""Build ``data/preferences.jsonl``: preference pairs that teach one checkable style rule.

The rule: **answer in one sentence, then stop.** Every pair has a short factual question
(an opposite, a capital, a plural, ...). The *chosen* answer is one correct sentence
written here ("The capital of Russia is Moscow."). The *rejected* answer is the same
sentence followed by what SmolLM2-135M-Instruct itself goes on to say after it: the
model is given the chosen sentence as the start of its answer and continues greedily,
with its end-of-turn token (every special token) forbidden, for up to ``CONTINUATION_TOKENS`` tokens (cut back
to its last full sentence when it has one). So the rejected answers are the model's own
way of rambling on, and both answers start with the same true sentence: the only thing a
pair teaches is to stop there. That is easy to check in generated text.

Facts and chosen sentences are written by hand; a fixed seed picks the held-out items and
the order. Columns: ``prompt``, ``chosen``, ``rejected``, ``answer`` (the key word in its
accepted spellings, to check that a generated answer is right), ``topic``, ``split``
(``train`` or ``test``: test questions never appear in train).

Run ``python data/build_preferences.py`` to rewrite the file (about a minute on a CPU;
it needs the book's model, see ``llmbook.models.load_model``).
"""

from __future__ import annotations

import random
import re

OUTPUT = "preferences.jsonl"
SEED = 7
CONTINUATION_TOKENS = 12  # how much of the model's own continuation a rejected answer keeps
TEST_PER_TOPIC = 3  # the last items of each topic (after shuffling) are held out

# topic -> (question template, answer template, items); {0}, {1}, ... fill from each item,
# whose last element is the key word a correct answer must contain; {a0} is item 0 with its
# article ("an octagon"), {A0} the same capitalised.
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
        "How many sides does {a0} have?",
        "{A0} has {1} sides.",
        [("triangle", "three"), ("square", "four"), ("pentagon", "five"), ("hexagon", "six"),
         ("heptagon", "seven"), ("octagon", "eight"), ("decagon", "ten"), ("rectangle", "four"),
         ("nonagon", "nine"), ("dodecagon", "twelve")],
    ),
    "baby": (
        "What is a baby {0} called?",
        "A baby {0} is called {a1}.",
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

OTHER_SPELLINGS = {"three": "3", "four": "4", "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9",
                   "ten": "10", "twelve": "12", "1000": "1,000"}


def accepted(word: str) -> list[str]:
    """The spellings of a key word that count as correct (a number may be written in digits)."""
    return [word, OTHER_SPELLINGS[word]] if word in OTHER_SPELLINGS else [word]


def with_article(word: str) -> str:
    """``word`` after "a" or "an", by its first letter (enough for the words here)."""
    return ("an " if word[0].lower() in "aeiou" else "a ") + word


def fill(template: str, item: tuple) -> str:
    """``template`` with the item's words: ``{0}``, ``{a0}`` (with its article), ``{A0}`` (capitalised)."""
    named = {f"a{i}": with_article(word) for i, word in enumerate(item)}
    named |= {f"A{i}": phrase[0].upper() + phrase[1:] for i, phrase in enumerate(named.values())}
    return template.format(*item, **named)


def questions(seed: int = SEED) -> list[dict]:
    """Every question with its chosen sentence and key word, train first then test, in a fixed order."""
    rng = random.Random(seed)
    rows = {"train": [], "test": []}
    for topic, (question, answer, items) in TOPICS.items():
        items = list(items)
        rng.shuffle(items)
        for i, item in enumerate(items):
            split = "test" if i >= len(items) - TEST_PER_TOPIC else "train"
            rows[split].append({
                "prompt": fill(question, item),
                "chosen": fill(answer, item),
                "answer": accepted(item[-1]),
                "topic": topic,
                "split": split,
            })
    for split in rows.values():
        rng.shuffle(split)  # mix topics so every batch sees several
    return rows["train"] + rows["test"]


def continue_answers(model, tokenizer, rows: list[dict], max_new_tokens: int = CONTINUATION_TOKENS) -> list[str]:
    """The model's greedy continuation of each chosen sentence, with the end of turn (every special token) forbidden."""
    from llmbook.sampling import generate_answers

    answers = generate_answers(model, tokenizer, [r["prompt"] for r in rows], stems=[r["chosen"] for r in rows],
                               max_new_tokens=max_new_tokens, suppress_tokens=tokenizer.all_special_ids,
                               strip=False, batch_size=len(rows))  # no end of turn, no markup
    continuations = []
    for text in answers.greedy:
        text = text.rstrip()
        ends = [m.end() for m in re.finditer(r"[.!?](?=\s|$)", text)]
        continuations.append(text[: ends[-1]] if ends else text)  # keep whole sentences where possible
    return continuations


def build(model=None, tokenizer=None, seed: int = SEED) -> list[dict]:
    """All pairs: the hand-written questions, and rejected answers continued by the model."""
    if model is None:
        from llmbook.models import load_model

        model, tokenizer = load_model(device="cpu", dtype="float32")
    rows = questions(seed)
    for row, more in zip(rows, continue_answers(model, tokenizer, rows)):
        if not more.strip():
            raise ValueError(f"the model added nothing after {row['chosen']!r}")
        row["rejected"] = row["chosen"] + more
    return [{k: r[k] for k in ("prompt", "chosen", "rejected", "answer", "topic", "split")} for r in rows]


if __name__ == "__main__":  # data/build.py writes the file
    from build import main

    main([__file__])
