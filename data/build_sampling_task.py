"""Write data/sampling_task.jsonl: one-digit sums and products, each with a checkable answer (chapter 6).

Each row is one question in a few-shot format the model continues, e.g.

    2 + 3 = 5
    4 + 8 = 12
    7 + 1 = 8
    6 + 9 =

with its answer (`15`). Half the rows are additions of two digits from 1 to 9, half are
products of two digits from 2 to 9 (with worked examples of products instead). Chapter 6
samples the model's continuation at several temperatures and compares its first line
with the answer: accuracy against temperature. The operands are drawn with a fixed
seed, without repeats and without the worked examples.

Run from the repository root: ``python data/build_sampling_task.py``.
"""

import random

OUTPUT = "sampling_task.jsonl"
SEED = 0
PER_OPERATION = 24
OPERATIONS = {  # symbol: (function, smallest operand, worked examples shown before each question)
    "+": (lambda a, b: a + b, 1, [(2, 3), (4, 8), (7, 1)]),
    "*": (lambda a, b: a * b, 2, [(2, 4), (3, 5), (6, 7)]),
}


def line(a: int, op: str, b: int) -> str:
    return f"{a} {op} {b} = {OPERATIONS[op][0](a, b)}\n"


def build(per_operation: int = PER_OPERATION, seed: int = SEED) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for op, (fn, low, shots) in OPERATIONS.items():
        prefix = "".join(line(a, op, b) for a, b in shots)
        pairs = [(a, b) for a in range(low, 10) for b in range(low, 10) if (a, b) not in shots]
        for a, b in rng.sample(pairs, per_operation):
            rows.append({"id": len(rows), "operation": op, "a": a, "b": b,
                         "prompt": f"{prefix}{a} {op} {b} =", "answer": str(fn(a, b))})
    return rows


if __name__ == "__main__":  # data/build.py writes the file
    from build import main

    main([__file__])
