r"""Does fine-tuning on new knowledge make a model hallucinate? The pieces of the experiment.

Gekhman et al. (2024, arXiv 2405.05904) sort closed-book questions by what the model
knows *before* fine-tuning, then fine-tune on mixtures with more or fewer questions
it does not know. This module holds the parts chapter 5 runs:

* **Answer matching.** :func:`normalize_answer` folds case, accents, punctuation and
  articles; :func:`is_correct` accepts a response that contains the gold answer (or an
  alias) as whole words, so "The capital of France is Paris." counts as "Paris".
* **The probe.** :func:`probe` asks every question once greedily and ``num_samples``
  times at a temperature (:func:`llmbook.sampling.generate_answers`, one shared prompt
  pass), and records the probability of each greedy answer,
  $p(\hat y \mid x) = \prod_t p(\hat y_t \mid x, \hat y_{<t})$.
* **The categories** (:func:`knowledge_category`), after the paper's section 3, with
  one prompt in place of its four few-shot prompts:

  ======================  ==============================================================
  ``HighlyKnown``          the greedy answer and every sampled answer are right
  ``MaybeKnown``           the greedy answer is right, some sampled answer is wrong
  ``WeaklyKnown``          the greedy answer is wrong, some sampled answer is right
  ``Unknown``              no answer is right
  ======================  ==============================================================

  *Known* means the first two.
* **The metrics**: :func:`accuracy`, and :func:`confident_wrong_rate`, the share of
  questions answered wrongly with $p(\hat y \mid x) \ge$ a threshold: a
  hallucination stated with confidence.

The training pieces live with their kind: the collator that masks the answer's stem
is :class:`llmbook.data.QACollator`, the loss by group :func:`llmbook.losses.sft_loss_by_group`.
Chapter 5 explains and uses all of it.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

import torch

from llmbook._checks import check_int, check_real
from llmbook.sampling import generate_answers

__all__ = [
    "CATEGORIES",
    "KNOWN",
    "accuracy",
    "confident_wrong_rate",
    "is_correct",
    "knowledge_category",
    "normalize_answer",
    "probe",
]

CATEGORIES = ("HighlyKnown", "MaybeKnown", "WeaklyKnown", "Unknown")
KNOWN = ("HighlyKnown", "MaybeKnown")
_ARTICLES = {"a", "an", "the"}


def normalize_answer(text: str) -> str:
    """Lower-case ``text``, strip accents and punctuation, drop articles, squeeze spaces.

    ``"The Bogotá!"`` and ``"bogota"`` both become ``"bogota"``.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).lower()
    text = re.sub(r"[^0-9a-z]+", " ", text.replace("'", ""))
    return " ".join(w for w in text.split() if w not in _ARTICLES)


def is_correct(response: str, answer: str, aliases: Sequence[str] = ()) -> bool:
    """Whether ``response`` states ``answer`` (or one of ``aliases``) as whole words.

    Both sides are normalised with :func:`normalize_answer`; ``"Kingston Town"`` then
    contains ``"Kingston"`` but ``"Kingstonia"`` does not.
    """
    for name, value in (("response", response), ("answer", answer)):
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    if isinstance(aliases, str) or not all(isinstance(a, str) for a in aliases):
        raise TypeError(f"aliases must be a list of str, got {aliases!r:.80}")
    said = f" {normalize_answer(response)} "
    golds = [normalize_answer(g) for g in (answer, *aliases)]
    if not golds[0]:
        raise ValueError(f"answer must contain a letter or digit, got {answer!r}")
    return any(g and f" {g} " in said for g in golds)


def knowledge_category(greedy_correct: bool, samples_correct: Sequence[bool]) -> str:
    """The paper's category of one question from the probe's verdicts (see the module docs)."""
    samples_correct = list(samples_correct)
    if not samples_correct:
        raise ValueError("samples_correct is empty: the categories need the verdicts of at least one sampled answer")
    if greedy_correct:
        return "HighlyKnown" if all(samples_correct) else "MaybeKnown"
    return "WeaklyKnown" if any(samples_correct) else "Unknown"


def probe(model, tokenizer, rows: Sequence[dict], *, system: str | None = None, num_samples: int = 4,
          temperature: float = 0.7, max_new_tokens: int = 8, batch_size: int = 64,
          generator: torch.Generator | None = None) -> list[dict]:
    """Ask every question of ``rows`` and sort it into a knowledge category.

    Args:
        rows: dicts with ``question``, ``answer`` and optionally ``aliases`` and
            ``stem`` (used when every row has one).
        the rest: as in :func:`llmbook.sampling.generate_answers` (the greedy answer and
            ``num_samples`` samples at ``temperature`` come from one prompt pass).

    Returns:
        one dict per row: the row's fields plus ``greedy``, ``greedy_prob``,
        ``greedy_correct``, ``samples``, ``p_sample_correct`` (share of right samples),
        ``category`` and ``known`` (``category`` in :data:`KNOWN`).
    """
    num_samples = check_int(num_samples, "num_samples", minimum=1, hint="(to tell the categories apart)")
    stems = [r["stem"] for r in rows] if all("stem" in r for r in rows) else None
    answers = generate_answers(model, tokenizer, [r["question"] for r in rows], stems=stems, system=system,
                               num_samples=num_samples, temperature=temperature,
                               max_new_tokens=max_new_tokens, batch_size=batch_size, generator=generator)
    result = []
    for row, g, p, s in zip(rows, answers.greedy, answers.greedy_prob, answers.samples):
        aliases = row.get("aliases", ())
        g_ok = is_correct(g, row["answer"], aliases)
        s_ok = [is_correct(x, row["answer"], aliases) for x in s]
        category = knowledge_category(g_ok, s_ok)
        result.append({**row, "greedy": g, "greedy_prob": p, "greedy_correct": g_ok, "samples": s,
                       "p_sample_correct": sum(s_ok) / len(s_ok), "category": category,
                       "known": category in KNOWN})
    return result


def accuracy(correct: Sequence[bool]) -> float:
    """The share of ``True`` in ``correct``."""
    if len(correct) == 0:
        raise ValueError("correct is empty")
    return sum(bool(c) for c in correct) / len(correct)


def confident_wrong_rate(correct: Sequence[bool], confidence: Sequence[float], threshold: float = 0.5) -> float:
    r"""The share of answers that are wrong *and* have confidence $\ge$ ``threshold``.

    With ``confidence`` the probability of the greedy answer, this counts the answers
    the model states as if it knew them, but which are false.
    """
    if len(correct) != len(confidence):
        raise ValueError(f"correct ({len(correct)}) and confidence ({len(confidence)}) differ in length")
    if len(correct) == 0:
        raise ValueError("correct is empty")
    threshold = check_real(threshold, "threshold", low=0.0, high=1.0)
    return sum((not c) and p >= threshold for c, p in zip(correct, confidence)) / len(correct)
