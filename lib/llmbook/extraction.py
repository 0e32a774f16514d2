"""The book's small fine-tuning task: extract an animal, a colour and a place as JSON.

Each example is a short sentence and one fixed instruction; the answer must be exactly
one JSON object with three keys::

    prompt:   Near the bakery, a golden rabbit was looking for food.
              Extract the animal, the colour and the place as JSON.
    response: {"animal": "rabbit", "colour": "golden", "place": "bakery"}

SmolLM2-135M-Instruct, asked this, answers with JSON of its own invention (other keys,
nesting, made-up values) or with prose, so its held-out accuracy starts low; a minute
of LoRA training fixes it. The held-out split uses sentence templates and words that
never occur in training. ``data/build_lora_task.py`` generates the file.

Chapter 3 trains LoRA on it and chapter 4 prefix tuning, so the two methods can be
compared on the same footing; both ask for the answers with
:func:`llmbook.sampling.generate_answers` and grade them with :func:`score`.
"""

from __future__ import annotations

import json

from llmbook.data import read_jsonl

TASK_FILE = "lora_task.jsonl"
SPLITS = ("train", "test")
FIELDS = ("animal", "colour", "place")

__all__ = ["FIELDS", "SPLITS", "TASK_FILE", "load_task", "parse_answer", "score"]


def load_task(split: str) -> list[dict]:
    """The examples of one split, as ``{"prompt", "response"}`` dicts, in file order.

    Args:
        split: ``"train"`` or ``"test"`` (the held-out examples).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rows = [row for row in read_jsonl(TASK_FILE) if row.get("split") == split]
    if not rows:
        raise ValueError(f"{TASK_FILE} has no {split!r} rows; run data/build_lora_task.py")
    for row in rows:
        missing = [key for key in ("prompt", "response") if not isinstance(row.get(key), str)]
        if missing:
            raise ValueError(f"{TASK_FILE}: the {split!r} row {row.get('id', rows.index(row))!r} has no string "
                             f"{missing}; run data/build_lora_task.py")
    return [{"prompt": row["prompt"], "response": row["response"]} for row in rows]


def parse_answer(answer: str) -> dict | None:
    """The answer as a dict if it is exactly one JSON object (surrounding spaces allowed), else ``None``."""
    if not isinstance(answer, str):
        raise TypeError(f"answer must be a str, got {type(answer).__name__}")
    try:
        value = json.loads(answer.strip())
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def score(answer: str, example: dict) -> bool:
    """True when ``answer`` is one JSON object with exactly the example's keys and values.

    Values are compared after stripping spaces and ignoring case ("Fox" counts as "fox");
    anything else (extra keys, extra text, a code fence, a wrong word) is wrong.
    """
    if not isinstance(example, dict) or "response" not in example:
        raise ValueError("example must be a dict with a 'response' (the reference answer)")
    reference = example["response"]
    if not isinstance(reference, str):
        raise TypeError(f"example['response'] must be a str holding a JSON object, got {type(reference).__name__}")
    want = parse_answer(reference)
    if want is None:
        raise ValueError(f"example['response'] must be one JSON object (the reference answer), got {reference!r:.80}")
    got = parse_answer(answer)
    if got is None or set(got) != set(want):
        return False
    return all(isinstance(got[k], str) and got[k].strip().lower() == str(want[k]).lower() for k in want)
