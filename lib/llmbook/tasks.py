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
compared on the same footing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import torch

from llmbook._checks import check_int
from llmbook.data import chat_prompt, read_jsonl

TASK_FILE = "lora_task.jsonl"
SPLITS = ("train", "test")
FIELDS = ("animal", "colour", "place")

__all__ = ["FIELDS", "SPLITS", "TASK_FILE", "accuracy", "generate_answers", "load_task", "parse_answer", "score"]


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


def _device(model) -> torch.device:
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else next(model.parameters()).device


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 32,
                     batch_size: int = 16) -> list[str]:
    """Greedy answers to user messages, in batches (left padding), chat template applied.

    Args:
        model: a causal LM with ``generate`` (a transformers model, LoRA-wrapped or not).
        tokenizer: its tokenizer (needs a pad token).
        prompts: user messages.
        max_new_tokens: the longest answer; the task's answers need about 25 tokens.
        batch_size: prompts per ``generate`` call.

    Returns:
        the decoded answers (special tokens removed, spaces stripped), in order.
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a sequence of strings, not one string")
    max_new_tokens = check_int(max_new_tokens, "max_new_tokens", minimum=1)
    batch_size = check_int(batch_size, "batch_size", minimum=1)
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token = tokenizer.eos_token")
    device = _device(model)
    was_training = model.training
    model.eval()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # generation continues on the right
    answers = []
    try:
        for start in range(0, len(prompts), batch_size):
            texts = [chat_prompt(tokenizer, p) for p in prompts[start:start + batch_size]]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            answers += [a.strip() for a in tokenizer.batch_decode(out[:, enc.input_ids.shape[1]:],
                                                                  skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return answers


def accuracy(model, tokenizer, examples: Sequence[dict], *, max_new_tokens: int = 32,
             batch_size: int = 16) -> float:
    """Fraction of ``examples`` whose greedy answer passes :func:`score`."""
    if isinstance(examples, (str, dict)) or not isinstance(examples, Sequence):
        raise TypeError(f"examples must be a list of dicts with 'prompt' and 'response', got {type(examples).__name__}")
    if not examples:
        raise ValueError("examples is empty")
    bad = [i for i, e in enumerate(examples) if not isinstance(e, dict) or not {"prompt", "response"} <= set(e)]
    if bad:
        raise ValueError(f"examples[{bad[0]}] must be a dict with 'prompt' and 'response' ({len(bad)} such in all)")
    answers = generate_answers(model, tokenizer, [e["prompt"] for e in examples],
                               max_new_tokens=max_new_tokens, batch_size=batch_size)
    return sum(score(a, e) for a, e in zip(answers, examples)) / len(examples)
