r"""Does fine-tuning on new knowledge make a model hallucinate? The pieces of the experiment.

Gekhman et al. (2024, arXiv 2405.05904) sort closed-book questions by what the model
knows *before* fine-tuning, then fine-tune on mixtures with more or fewer questions
it does not know. This module holds the parts chapter 5 runs:

* **Answer matching.** :func:`normalize_answer` folds case, accents, punctuation and
  articles; :func:`is_correct` accepts a response that names the gold answer (or an
  alias) as whole words and not inside a longer name, so "The capital of France is
  Paris." counts as "Paris" and "New Mexico" does not count as "Mexico".
* **The probe.** :func:`probe` asks every question under several prompts (one per
  system message, which may hold worked examples: a few-shot prompt), greedily and
  ``num_samples`` times at a temperature under each
  (:func:`llmbook.sampling.generate_answers`, one shared prompt pass), and records the
  probability of the first prompt's greedy answer,
  $p(\hat y \mid x) = \prod_t p(\hat y_t \mid x, \hat y_{<t})$.
* **The categories** (:func:`knowledge_category`), as the paper's section 3 defines them
  from $P_\text{Correct}$, the share of right answers over its prompts (its $N_\text{ex} = 10$
  four-shot prompts; chapter 5 uses five four-shot prompts, ``data/knowledge_probe.jsonl``):

  ======================  ==============================================================
  ``HighlyKnown``          the greedy answer is right under every prompt
  ``MaybeKnown``           the greedy answer is right under some prompts, not all
  ``WeaklyKnown``          no greedy answer is right, some sampled answer is
  ``Unknown``              no answer is right, greedy or sampled
  ======================  ==============================================================

  *Known* means the first two.
* **The metrics**: :func:`accuracy`, and :func:`confident_wrong_rate`, the share of
  questions answered wrongly with $p(\hat y \mid x) \ge$ a threshold: a
  hallucination stated with confidence.
* **The comparison**: :func:`paired_bootstrap`, the mean difference between two
  conditions on the same questions and a bootstrap interval for it.

The training pieces live with their kind: the collator that masks the answer's stem
is :class:`llmbook.data.QACollator`, the teacher-forced verdicts
:func:`llmbook.losses.answer_scores`, the loss and shares fitted by group
:func:`llmbook.losses.sft_loss_by_group`. Chapter 5 explains and uses all of it.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

import numpy as np
import torch

from llmbook._checks import check_int, check_real
from llmbook.sampling import generate_answers
from llmbook.utils import paired_bootstrap  # noqa: F401  (chapter 5 reaches it here)
from llmbook.utils import progress as show_progress

__all__ = [
    "CATEGORIES",
    "KNOWN",
    "accuracy",
    "confident_wrong_rate",
    "is_correct",
    "knowledge_category",
    "normalize_answer",
    "paired_bootstrap",
    "probe",
    "probe_order",
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
    text = re.sub(r"[^0-9a-z]+", " ", _fold(text).lower().replace("'", ""))
    return " ".join(w for w in text.split() if w not in _ARTICLES)


def _fold(text: str) -> str:
    """``text`` without accents."""
    text = unicodedata.normalize("NFKD", text)
    return "".join(c for c in text if not unicodedata.combining(c))


def _words(text: str) -> list[tuple[str, bool, bool, bool]]:
    """``(word, capitalised, joined, upper)`` for each word of ``text`` but the articles.

    ``word`` is folded as :func:`normalize_answer` folds it; ``joined`` says that only spaces
    or hyphens separate the word from the one before (no punctuation, no article);
    ``upper`` that every letter of it is a capital (``US``, the ``U`` and ``S`` of ``U.S.``).
    """
    text = _fold(text)
    words, end, joinable = [], 0, False
    for m in re.finditer(r"[0-9A-Za-z']+", text):
        word = m.group().replace("'", "")
        if not word:  # a lone apostrophe
            continue
        joined = joinable and text[end:m.start()].strip(" -") == ""
        end = m.end()
        joinable = word.lower() not in _ARTICLES
        if joinable:
            words.append((word.lower(), word[0].isupper(), joined, word.isupper()))
    return words


def is_correct(response: str, answer: str, aliases: Sequence[str] = ()) -> bool:
    """Whether ``response`` names ``answer`` (or one of ``aliases``) as a name of its own.

    Both sides are folded as in :func:`normalize_answer`. The answer must appear as whole
    words, and not as part of a longer name: a capitalised word right before or after it
    (with no punctuation between) makes a different name. So ``"Kingstonia"`` does not
    name ``"Kingston"``, nor ``"New Mexico"`` or ``"Mexico City"`` the country
    ``"Mexico"``, nor ``"South America"`` the alias ``"America"``, while
    ``"Paris, France."`` names ``"Paris"``. A word the answer writes in capitals (an
    abbreviation: ``"US"``, ``"U.S."``) must be in capitals in the response too, so
    ``"let us"`` does not name the ``"US"``.
    """
    for name, value in (("response", response), ("answer", answer)):
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    if isinstance(aliases, (str, bytes)) or not isinstance(aliases, (list, tuple)) or not all(
            isinstance(a, str) for a in aliases):
        raise TypeError(f"aliases must be a list of str, got {aliases!r:.80}")
    if not normalize_answer(answer):
        raise ValueError(f"answer must contain a letter or digit, got {answer!r}")
    said = _words(response)
    for gold in (answer, *aliases):
        target = [(w, upper) for w, _, _, upper in _words(gold)]
        n = len(target)
        if not n:
            continue
        for i in range(len(said) - n + 1):
            if any(w != t or (upper and not said_upper)
                   for (t, upper), (w, _, _, said_upper) in zip(target, said[i:i + n])):
                continue
            before = said[i][2] and said[i - 1][1]  # a capitalised word joined before it
            after = i + n < len(said) and said[i + n][2] and said[i + n][1]
            if not (before or after):
                return True
    return False


def _verdicts(value, name: str) -> list[bool]:
    """``value`` as a list of verdicts: a non-empty list (or bool tensor/array) of True/False only."""
    if hasattr(value, "tolist") and not isinstance(value, (list, tuple)):
        value = value.tolist()  # a torch or numpy array of bools
    if isinstance(value, (bool, str, bytes)) or not isinstance(value, Sequence) or not len(value):
        raise ValueError(f"{name} must be a non-empty list of verdicts (True/False), got {value!r:.80}")
    wrong = [v for v in value if not isinstance(v, (bool, np.bool_))]
    if wrong:
        raise TypeError(f"{name} must hold verdicts True/False only, got {wrong[0]!r} ({type(wrong[0]).__name__}); "
                        "a number or a string there would count as True")
    return [bool(v) for v in value]


def knowledge_category(greedy_correct: Sequence[bool], samples_correct: Sequence[bool]) -> str:
    """The paper's category of one question (see the module docs).

    Args:
        greedy_correct: the verdict on the greedy answer under each prompt.
        samples_correct: the verdicts on the sampled answers (all prompts together).
    """
    greedy_correct = _verdicts(greedy_correct, "greedy_correct")
    samples_correct = _verdicts(samples_correct, "samples_correct")
    if all(greedy_correct):
        return "HighlyKnown"
    if any(greedy_correct):
        return "MaybeKnown"
    return "WeaklyKnown" if any(samples_correct) else "Unknown"


def probe_order(rows: Sequence[dict]) -> list[int]:
    """The order in which :func:`probe` asks ``rows``: by the length of question and stem.

    :func:`probe` batches the questions in this order (less padding), and its sampled
    answers depend on the batch they were drawn in. A probe of ``[rows[i] for i in
    probe_order(rows)[:batch_size]]`` draws the first batch again: the same answers.
    """
    if isinstance(rows, (str, dict)) or not isinstance(rows, Sequence) or not all(
            isinstance(r, dict) and isinstance(r.get("question"), str) for r in rows):
        raise ValueError(f"rows must be a list of dicts with a 'question' string, got {rows!r:.80}")
    stems = [r.get("stem", "") for r in rows] if all("stem" in r for r in rows) else [""] * len(rows)
    return sorted(range(len(rows)), key=lambda i: len(rows[i]["question"]) + len(stems[i]))


def probe(model, tokenizer, rows: Sequence[dict], *, systems: Sequence[str], num_samples: int = 2,
          temperature: float = 0.5, max_new_tokens: int = 8, batch_size: int = 64, seed: int = 0,
          stop_at_newline: bool = False, progress: bool = False) -> list[dict]:
    """Ask every question of ``rows`` under each prompt and sort it into a knowledge category.

    Each system message of ``systems`` makes one prompt (a few-shot prompt when the message
    holds worked examples), under which every question gets a greedy answer and
    ``num_samples`` sampled ones from the same prompt pass
    (:func:`llmbook.sampling.generate_answers`). Questions are batched in
    :func:`probe_order`; prompt ``k`` samples from a generator seeded with ``seed + k``, so
    the answers are reproducible batch by batch. The result keeps the order of ``rows``.

    Args:
        rows: dicts with ``question``, ``answer`` and optionally ``aliases`` and
            ``stem`` (used when every row has one).
        systems: the system messages, one per prompt (at least one).
        seed: the seed of the first prompt's sampling generator.
        progress: show a bar over the prompts (:func:`llmbook.utils.progress`).
        the rest: as in :func:`llmbook.sampling.generate_answers`.

    Returns:
        one dict per row: the row's fields plus ``greedy`` (one answer per prompt),
        ``greedy_correct`` (their verdicts), ``greedy_prob`` (the first prompt's greedy
        answer's probability), ``samples`` (``num_samples`` per prompt, prompt after
        prompt), ``p_greedy_correct`` and ``p_sample_correct`` (shares of right answers),
        ``category`` and ``known`` (``category`` in :data:`KNOWN`).
    """
    if isinstance(systems, str) or not isinstance(systems, Sequence) or not systems or not all(
            isinstance(x, str) for x in systems):
        raise ValueError(f"systems must be a non-empty list of system messages (str), got {systems!r:.80}")
    num_samples = check_int(num_samples, "num_samples", minimum=1, hint="(to tell WeaklyKnown from Unknown)")
    seed = check_int(seed, "seed", minimum=0)
    if isinstance(rows, (str, dict)) or not isinstance(rows, Sequence) or not rows:
        raise ValueError(f"rows must be a non-empty list of dicts with 'question' and 'answer', got {rows!r:.80}")
    for i, row in enumerate(rows):  # before any generation: a bad row would otherwise surface at the end
        if not isinstance(row, dict):
            raise TypeError(f"rows[{i}] must be a dict with 'question' and 'answer', got {type(row).__name__}")
        for key in ("question", "answer"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise ValueError(f"rows[{i}] needs a non-empty string {key!r}, got {row.get(key)!r}")
        aliases = row.get("aliases", [])
        if not isinstance(aliases, (list, tuple)) or not all(isinstance(a, str) for a in aliases):
            raise TypeError(f"rows[{i}]['aliases'] must be a list of strings, got {aliases!r:.60}")
        if not normalize_answer(row["answer"]):
            raise ValueError(f"rows[{i}]['answer'] must contain a letter or digit, got {row['answer']!r}")
    stems = [r["stem"] for r in rows] if all("stem" in r for r in rows) else None
    order = probe_order(rows)
    device = next(model.parameters()).device
    runs = [generate_answers(model, tokenizer, [rows[i]["question"] for i in order],
                             stems=[stems[i] for i in order] if stems else None, system=system,
                             num_samples=num_samples, temperature=temperature,
                             max_new_tokens=max_new_tokens, batch_size=batch_size,
                             stop_at_newline=stop_at_newline, generator=torch.Generator(device=device).manual_seed(seed + k))
            for k, system in enumerate(show_progress(systems, desc="probe", disable=not progress))]
    result = [None] * len(rows)
    for j, i in enumerate(order):
        row = rows[i]
        aliases = list(row.get("aliases", ()))
        greedy = [run.greedy[j] for run in runs]
        samples = [x for run in runs for x in run.samples[j]]
        g_ok = [is_correct(g, row["answer"], aliases) for g in greedy]
        s_ok = [is_correct(x, row["answer"], aliases) for x in samples]
        category = knowledge_category(g_ok, s_ok)
        result[i] = {**row, "greedy": greedy, "greedy_correct": g_ok, "greedy_prob": runs[0].greedy_prob[j],
                     "samples": samples, "p_greedy_correct": sum(g_ok) / len(g_ok),
                     "p_sample_correct": sum(s_ok) / len(s_ok), "category": category,
                     "known": category in KNOWN}
    return result


def accuracy(correct: Sequence[bool]) -> float:
    """The share of ``True`` in ``correct``."""
    correct = _verdicts(correct, "correct")
    return sum(correct) / len(correct)


def confident_wrong_rate(correct: Sequence[bool], confidence: Sequence[float], threshold: float = 0.5) -> float:
    r"""The share of answers that are wrong *and* have confidence $\ge$ ``threshold``.

    With ``confidence`` the probability of the greedy answer, this counts the answers
    the model states as if it knew them, but which are false.
    """
    correct = _verdicts(correct, "correct")
    if hasattr(confidence, "tolist") and not isinstance(confidence, (list, tuple)):
        confidence = confidence.tolist()
    if len(correct) != len(confidence):
        raise ValueError(f"correct ({len(correct)}) and confidence ({len(confidence)}) differ in length")
    confidence = [check_real(p, "confidence", low=0.0, high=1.0) for p in confidence]
    threshold = check_real(threshold, "threshold", low=0.0, high=1.0)
    return sum((not c) and p >= threshold for c, p in zip(correct, confidence)) / len(correct)
