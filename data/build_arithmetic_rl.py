"""Write data/arithmetic_rl.jsonl: the one-digit sums and products of chapter 8's reinforcement learning.

The same few-shot format as ``sampling_task.jsonl`` (chapter 6), which this file splits
in two: split "test" holds exactly its 48 questions (chapter 8's held-out prompts, on which
chapter 6 measured the model's accuracy), split "train" every other pair of operands of
the same ranges, the worked examples left out: 54 sums and 37 products. The policy
trains on the train prompts only, with a reward the script can check (the answer).

Run from the repository root: ``python data/build_arithmetic_rl.py``.
"""

import importlib.util
from pathlib import Path

OUTPUT = "arithmetic_rl.jsonl"


def _sampling_task():
    """data/build_sampling_task.py, loaded by path (data/ is not a package)."""
    path = Path(__file__).with_name("build_sampling_task.py")
    spec = importlib.util.spec_from_file_location("build_sampling_task", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build() -> list[dict]:
    task = _sampling_task()
    held_out = task.build()
    taken = {(r["operation"], r["a"], r["b"]) for r in held_out}
    rows = [{**{k: r[k] for k in ("operation", "a", "b", "prompt", "answer")}, "split": "test"} for r in held_out]
    for op, (fn, low, shots) in task.OPERATIONS.items():
        prefix = "".join(task.line(a, op, b) for a, b in shots)
        for a in range(low, 10):
            for b in range(low, 10):
                if (a, b) in shots or (op, a, b) in taken:
                    continue
                rows.append({"operation": op, "a": a, "b": b, "prompt": f"{prefix}{a} {op} {b} =",
                             "answer": str(fn(a, b)), "split": "train"})
    return [{"id": i, **row} for i, row in enumerate(rows)]


if __name__ == "__main__":  # data/build.py writes the file
    from build import main

    main([__file__])
