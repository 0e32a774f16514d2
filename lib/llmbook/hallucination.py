r"""Does fine-tuning on new knowledge make a model hallucinate? The pieces of the experiment.

Gekhman et al. (2024, arXiv 2405.05904) sort closed-book questions by what the model
knows *before* fine-tuning, then fine-tune on mixtures with more or fewer questions
it does not know. This module holds the parts chapter 5 runs:

* **Answer matching.** :func:`normalize_answer` folds case, accents, punctuation and
  articles; :func:`is_correct` accepts a response that contains the gold answer (or an
  alias) as whole words, so "The capital of France is Paris." counts as "Paris".
* **The probe.** :func:`generate_answers` asks every question once greedily and
  ``num_samples`` times at a temperature, in batches with one shared prompt pass (the
  KV cache is copied for the samples). It also returns the probability of each greedy
  answer, :math:`p(\hat y \mid x) = \prod_t p(\hat y_t \mid x, \hat y_{<t})`.
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
  questions answered wrongly with :math:`p(\hat y \mid x) \ge` a threshold: a
  hallucination stated with confidence.
* **The training loss by group**: :func:`sft_loss_by_group` is the SFT loss (mean
  over response tokens) plus the same mean over the Known and the Unknown examples of
  the batch, so one run shows how fast each group is fitted.

Chapter 5 explains and uses all of it.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ._checks import check_generator, check_int, check_real
from .data import IGNORE_INDEX, SFTCollator, _check_examples, chat_prompt
from .sampling import apply_temperature

__all__ = [
    "CATEGORIES",
    "KNOWN",
    "Answers",
    "QACollator",
    "accuracy",
    "confident_wrong_rate",
    "generate_answers",
    "is_correct",
    "knowledge_category",
    "normalize_answer",
    "probe",
    "sft_loss_by_group",
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


@dataclass
class Answers:
    """What :func:`generate_answers` returns, one entry per question."""

    greedy: list[str]  # the greedy answer's text
    greedy_prob: list[float]  # p(greedy answer | prompt), end-of-turn token included
    first_prob: list[float]  # p(first token of the greedy answer | prompt)
    samples: list[list[str]] = field(default_factory=list)  # num_samples sampled answers each


def _stop_ids(model, tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(configured) if isinstance(configured, (list, tuple)) else {configured}
    return {i for i in ids if i is not None}


@torch.no_grad()
def generate_answers(
    model,
    tokenizer,
    questions: Sequence[str],
    *,
    stems: Sequence[str] | None = None,
    system: str | None = None,
    num_samples: int = 0,
    temperature: float = 1.0,
    max_new_tokens: int = 8,
    batch_size: int = 64,
    generator: torch.Generator | None = None,
) -> Answers:
    r"""Greedy and sampled answers to ``questions``, in batches that share one prompt pass.

    Each question is formatted with the chat template (and ``system``), left-padded in
    its batch and run through the model once; the KV cache is then repeated
    ``1 + num_samples`` times so the greedy row and the sampled rows continue from the
    same prompt pass. Positions follow the attention mask, so a padded question gets
    exactly the tokens it would get alone.

    Args:
        questions: the user messages.
        stems: optional starts of the answers (``"The capital of France is"``): each is
            appended after the chat prompt and the model continues it.
        system: the system message (``None``: the template's default).
        num_samples: sampled answers per question (0 for greedy only).
        temperature: of the samples, > 0.
        max_new_tokens: answer length limit; generation stops earlier at end of turn.
        batch_size: questions per prompt pass.
        generator: a seeded ``torch.Generator`` (on the model's device) makes the
            samples reproducible.

    Returns:
        :class:`Answers`: texts without special tokens, and :math:`p(\hat y \mid x)` of
        each greedy answer under the model (temperature 1).
    """
    if isinstance(questions, str) or not questions:
        raise ValueError("questions must be a non-empty sequence of strings")
    if stems is not None and (isinstance(stems, str) or len(stems) != len(questions)):
        raise ValueError(f"stems must be a sequence of {len(questions)} strings, one per question")
    num_samples = check_int(num_samples, "num_samples", minimum=0)
    temperature = check_real(temperature, "temperature", low=0.0, low_open=True)
    max_new_tokens = check_int(max_new_tokens, "max_new_tokens", minimum=1)
    batch_size = check_int(batch_size, "batch_size", minimum=1)
    check_generator(generator)
    device = next(model.parameters()).device
    stop = torch.tensor(sorted(_stop_ids(model, tokenizer)), device=device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else int(stop[0])
    copies = 1 + num_samples
    was_training = model.training
    model.eval()
    greedy, greedy_prob, first_prob, samples = [], [], [], []
    try:
        for start in range(0, len(questions), batch_size):
            texts = [chat_prompt(tokenizer, q, system) + (stems[start + i] if stems is not None else "")
                     for i, q in enumerate(questions[start : start + batch_size])]
            encoded = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
            P = max(len(e) for e in encoded)
            ids = torch.tensor([[pad_id] * (P - len(e)) + e for e in encoded], device=device)  # (B, P)
            mask = torch.tensor([[0] * (P - len(e)) + [1] * len(e) for e in encoded], device=device)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
            cache = out.cache
            if copies > 1:  # rows become q0, q0 sample 1, ..., q1, ...: one prompt pass for all
                cache.batch_repeat_interleave(copies)
            logits = out.logits[:, -1].float().repeat_interleave(copies, dim=0)  # (N, V), N = B * copies
            mask = mask.repeat_interleave(copies, dim=0)
            pos = pos[:, -1:].repeat_interleave(copies, dim=0)  # (N, 1)
            N = logits.shape[0]
            is_greedy = torch.arange(N, device=device) % copies == 0
            tokens = torch.full((N, max_new_tokens), pad_id, device=device)
            logp_sum = torch.zeros(N, device=device)
            done = torch.zeros(N, dtype=torch.bool, device=device)
            for t in range(max_new_tokens):
                logp = torch.log_softmax(logits, dim=-1)
                nxt = logp.argmax(-1)
                if copies > 1:
                    probs = torch.softmax(apply_temperature(logits, temperature), dim=-1)  # refuses overflow
                    drawn = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
                    nxt = torch.where(is_greedy, nxt, drawn)
                step_logp = logp.gather(-1, nxt[:, None]).squeeze(-1)
                if t == 0:
                    first_logp = step_logp
                logp_sum += torch.where(done, 0.0, step_logp)
                nxt = torch.where(done, pad_id, nxt)
                tokens[:, t] = nxt
                done |= torch.isin(nxt, stop)
                if done.all() or t == max_new_tokens - 1:
                    break
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                pos = pos + 1
                out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, cache=cache,
                            use_cache=True)
                cache, logits = out.cache, out.logits[:, -1].float()
            texts = tokenizer.batch_decode(tokens, skip_special_tokens=True)
            for b in range(0, N, copies):
                greedy.append(texts[b].strip())
                greedy_prob.append(float(logp_sum[b].exp()))
                first_prob.append(float(first_logp[b].exp()))
                samples.append([s.strip() for s in texts[b + 1 : b + copies]])
    finally:
        model.train(was_training)
    return Answers(greedy=greedy, greedy_prob=greedy_prob, first_prob=first_prob,
                   samples=samples if num_samples else [])


def probe(model, tokenizer, rows: Sequence[dict], *, system: str | None = None, num_samples: int = 4,
          temperature: float = 0.7, max_new_tokens: int = 8, batch_size: int = 64,
          generator: torch.Generator | None = None) -> list[dict]:
    """Ask every question of ``rows`` and sort it into a knowledge category.

    Args:
        rows: dicts with ``question``, ``answer`` and optionally ``aliases`` and
            ``stem`` (used when every row has one).
        the rest: as in :func:`generate_answers`.

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
    r"""The share of answers that are wrong *and* have confidence :math:`\ge` ``threshold``.

    With ``confidence`` the probability of the greedy answer, this counts the answers
    the model states as if it knew them, but which are false.
    """
    if len(correct) != len(confidence):
        raise ValueError(f"correct ({len(correct)}) and confidence ({len(confidence)}) differ in length")
    if len(correct) == 0:
        raise ValueError("correct is empty")
    threshold = check_real(threshold, "threshold", low=0.0, high=1.0)
    return sum((not c) and p >= threshold for c, p in zip(correct, confidence)) / len(correct)


class QACollator:
    """Turn question rows into an SFT batch whose loss covers only the answer.

    Each row's ``question`` is the user message and its ``response`` (``"The capital of
    France is Paris."``) the assistant's; :class:`~llmbook.data.SFTCollator` masks the
    prompt, and this collator also masks the response's ``stem`` (``"The capital of
    France is"``), which the probe hands the model anyway. What is left to learn is the
    answer and the end of the turn. The batch also carries ``unknown``, a bool tensor of
    shape ``(B,)`` from each row's ``unknown`` field, for :func:`sft_loss_by_group`.
    """

    def __init__(self, tokenizer, *, system: str | None = None):
        self.sft = SFTCollator(tokenizer, system=system)
        self.tokenizer, self.system = tokenizer, system

    def __call__(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        _check_examples(rows, ("question", "response"), name="rows")
        batch = self.sft([{"prompt": r["question"], "response": r["response"]} for r in rows])
        for i, r in enumerate(rows):
            if not r["response"].startswith(r.get("stem", "")):
                raise ValueError(f"the response {r['response']!r} does not start with its stem {r['stem']!r}")
            prompt = chat_prompt(self.tokenizer, r["question"], self.system)
            n = len(self.tokenizer(prompt + r.get("stem", ""), add_special_tokens=False).input_ids)
            batch["labels"][i, :n] = IGNORE_INDEX
        if (batch["labels"] == IGNORE_INDEX).all(dim=1).any():
            raise ValueError("an example has no answer token left to train on")
        batch["unknown"] = torch.tensor([bool(r.get("unknown", False)) for r in rows])
        return batch


def sft_loss_by_group(model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
    """The SFT loss of ``batch`` and its means over the Known and the Unknown examples.

    ``batch`` is an :class:`~llmbook.data.SFTCollator` batch plus ``unknown``, a bool
    tensor of shape ``(B,)``. The loss is the mean cross-entropy over every response
    token (the model's own loss for these labels); ``loss/known`` and ``loss/unknown``
    average the same token losses within each group and are left out when the batch
    has no example of that group. Use it as the ``loss_fn`` of :func:`llmbook.train.train`.
    """
    if "unknown" not in batch:
        raise ValueError("batch needs an 'unknown' entry: a bool tensor of shape (B,)")
    labels = batch["labels"]  # (B, T)
    if not torch.is_tensor(batch["unknown"]) or tuple(batch["unknown"].shape) != tuple(labels.shape[:1]):
        got = tuple(batch["unknown"].shape) if torch.is_tensor(batch["unknown"]) else type(batch["unknown"]).__name__
        raise ValueError(f"unknown must have shape ({labels.shape[0]},), one flag per example, got {got}")
    has_label = (labels != IGNORE_INDEX).any(0).nonzero()
    if len(has_label) == 0:
        raise ValueError("the batch has no response token to train on")
    first = int(has_label[0])  # first position that has a label in any row
    # Only positions first-1 .. T-2 predict a labelled token: skip the LM head elsewhere.
    keep = labels.shape[1] - first + 1
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   logits_to_keep=keep).logits  # (B, keep, V)
    targets = labels[:, first:]  # position t predicts token t + 1
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                          reduction="none").view_as(targets)  # (B, T - first)
    counted = (targets != IGNORE_INDEX).float()
    loss = (nll * counted).sum() / counted.sum()
    metrics = {}
    unknown = batch["unknown"].to(torch.bool)
    for name, rows in (("known", ~unknown), ("unknown", unknown)):
        n = counted[rows].sum()
        if n > 0:
            metrics[f"loss/{name}"] = float((nll[rows] * counted[rows]).sum().detach() / n)
    return loss, metrics
