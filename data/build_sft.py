"""Generate ``data/sft.jsonl``: short instructions with answers in one fixed style.

Every example is built from a template and word lists written here, and every answer
is computed by this script, so each one is correct by construction. All answers share
one terse style, ``Answer: <x>.``, which SmolLM2-135M-Instruct does not use on its
own (it answers in full sentences): a short fine-tuning run learns the style, and the
loss on the response tokens visibly falls. Chapter 2 trains on it.

Each line is ``{"id", "task", "prompt", "response", "split"}``; a few examples of
every task are held out (``split == "test"``) to look at the model's answers on
prompts it never trained on.

Run from the repository root: ``python data/build_sft.py`` (deterministic: the same
file every time).
"""

from __future__ import annotations

import random

OUTPUT = "sft.jsonl"
SEED = 2
PER_TASK = 40      # examples of each task
TEST_PER_TASK = 4  # of which held out

WORDS = """
apple river garden window candle forest pencil rabbit bottle castle dragon mirror
orange planet silver basket button carpet doctor engine farmer finger flower guitar
hammer island jacket kitten ladder lemon market monkey needle ocean pillow pocket
rocket saddle school shadow spider summer ticket tomato tunnel turtle valley violin
wallet winter yellow anchor bridge cherry cloud desert field honey horse house lamp
mountain music paper queen sugar table tiger train water zebra
""".split()

OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("early", "late"),
    ("light", "dark"), ("open", "closed"), ("full", "empty"), ("high", "low"), ("old", "young"),
    ("strong", "weak"), ("wet", "dry"), ("hard", "soft"), ("long", "short"), ("rich", "poor"),
    ("loud", "quiet"), ("thick", "thin"), ("clean", "dirty"), ("push", "pull"), ("up", "down"),
]

TEMPLATES = {
    "add": ["What is {a} plus {b}?", "Add {a} and {b}.", "Compute {a} + {b}."],
    "letters": ["How many letters are in the word '{w}'?", "Count the letters in '{w}'."],
    "upper": ["Write the word '{w}' in capital letters.", "Convert '{w}' to uppercase."],
    "first": ["What is the first letter of the word '{w}'?", "Which letter does '{w}' start with?"],
    "last": ["What is the last letter of the word '{w}'?", "Which letter does '{w}' end with?"],
    "larger": ["Which number is larger, {a} or {b}?", "Which is bigger: {a} or {b}?"],
    "alphabet": ["Which word comes first in the alphabet, '{u}' or '{v}'?",
                 "In alphabetical order, which is first: '{u}' or '{v}'?"],
    "opposite": ["What is the opposite of '{w}'?", "Give the opposite of the word '{w}'."],
}


def _example(task: str, rng: random.Random) -> tuple[str, str]:
    """One (prompt, answer) of ``task``; the answer is computed, never typed."""
    template = rng.choice(TEMPLATES[task])
    w = rng.choice(WORDS)
    if task == "add":
        a, b = rng.randint(1, 30), rng.randint(1, 30)
        return template.format(a=a, b=b), str(a + b)
    if task == "letters":
        return template.format(w=w), str(len(w))
    if task == "upper":
        return template.format(w=w), w.upper()
    if task == "first":
        return template.format(w=w), w[0]
    if task == "last":
        return template.format(w=w), w[-1]
    if task == "larger":
        a, b = rng.sample(range(1, 100), 2)
        return template.format(a=a, b=b), str(max(a, b))
    if task == "alphabet":
        u, v = rng.sample(WORDS, 2)
        return template.format(u=u, v=v), min(u, v)
    if task == "opposite":
        pair = rng.choice(OPPOSITES)
        word, other = pair if rng.random() < 0.5 else pair[::-1]
        return template.format(w=word), other
    raise ValueError(f"unknown task {task!r}")


def build(seed: int = SEED) -> list[dict]:
    """All examples, each prompt unique, in an order that interleaves the tasks."""
    rng = random.Random(seed)
    by_task = {}
    for task in TEMPLATES:
        seen, rows = set(), []
        while len(rows) < PER_TASK:
            prompt, answer = _example(task, rng)
            if prompt in seen:
                continue
            seen.add(prompt)
            rows.append({"task": task, "prompt": prompt, "response": f"Answer: {answer}."})
        for i, row in enumerate(rows):
            row["split"] = "test" if i >= PER_TASK - TEST_PER_TASK else "train"
        by_task[task] = rows
    examples = [row for group in zip(*by_task.values()) for row in group]
    return [{"id": i, **row} for i, row in enumerate(examples)]


if __name__ == "__main__":  # data/build.py writes the file
    from build import main

    main([__file__])
