r"""Decoding with temperature, top-k, top-p and min-p, and a sampling loop with a KV cache.

A language model gives, at each step, logits $x \in \mathbb{R}^V$ over the vocabulary.
Sampling turns them into a next token in three moves, each a small pure function here:

1. **temperature** divides the logits, $x / T$. Since
   $\log p_i - \log p_j = (x_i - x_j) / T$, a small $T$ widens every gap between tokens
   (the output becomes more deterministic; $T \to 0$ is argmax) and a large $T$ narrows
   them (more diverse; $T \to \infty$ is uniform).
2. **filters** set the logits of unwanted tokens to $-\infty$:
   top-k keeps the $k$ largest, top-p (nucleus) keeps the smallest set of most probable
   tokens whose probabilities sum to at least $p$, and min-p keeps the tokens whose
   probability is at least $p_{\min} \cdot \max_j p_j$.
3. **softmax** over what is left (the kept probabilities renormalised) and one
   multinomial draw.

The filters return exactly the tensors (``torch.equal``) of the transformers library's
``TemperatureLogitsWarper``, ``TopKLogitsWarper``, ``TopPLogitsWarper`` and
``MinPLogitsWarper``, ties and ``min_tokens_to_keep`` included, and :func:`generate`
draws the same tokens as ``model.generate(do_sample=True, ...)`` under the same seed:
both apply temperature, top-k, top-p, min-p in that order, then ``torch.multinomial``
on the softmax.

Chapter 6 explains all of this on SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import copy
import math
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral

import numpy as np
import torch

from llmbook._checks import (
    check_bool,
    check_float_tensor,
    check_generator,
    check_int,
    check_int_tensor,
    check_real,
    check_tensor,
    check_token_ids,
    keep_logits,
)
from llmbook.data import chat_prompt
from llmbook.utils import eval_mode
from llmbook.utils import progress as show_progress

__all__ = [
    "Answers",
    "SharedPrefix",
    "answer_probability",
    "apply_temperature",
    "generate",
    "generate_answers",
    "left_pad",
    "min_p_filter",
    "position_ids",
    "prefix_cache",
    "sample_next_token",
    "newline_token_ids",
    "stop_token_ids",
    "top_k_filter",
    "top_p_filter",
]

FILTER_VALUE = -math.inf  # what a removed token's logit becomes


def _check_logits(logits) -> None:
    """Reject what would silently turn into NaN probabilities."""
    check_float_tensor(logits, "logits")
    if logits.ndim == 0 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty last (vocabulary) dimension, got shape {tuple(logits.shape)}")
    if torch.isnan(logits).any():
        raise ValueError("logits contain NaN; check the model's output before sampling")
    if torch.isposinf(logits).any():
        raise ValueError("logits contain +inf, which has no softmax; check the model's output before sampling")


def _check_temperature(temperature, *, allow_zero: bool) -> float:
    if allow_zero:
        return check_real(temperature, "temperature", low=0.0, hint="(0 means greedy)")
    return check_real(temperature, "temperature", low=0.0, low_open=True,
                      hint="(use sample_next_token's temperature=0 for greedy)")


def _check_top_p(top_p) -> float:
    return check_real(top_p, "top_p", low=0.0, high=1.0, low_open=True)


def _check_min_p(min_p) -> float:
    return check_real(min_p, "min_p", low=0.0, high=1.0)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    r"""Logits divided by the temperature, $x / T$.

    $\operatorname{softmax}(x / T)_i \propto e^{x_i / T}$: the log-probability gap of two tokens
    becomes $(x_i - x_j) / T$, wider for $T < 1$, narrower for $T > 1$.

    Args:
        logits: ``(..., V)`` floating-point logits.
        temperature: $T > 0$ (greedy decoding, the limit $T \to 0$, is
            ``sample_next_token(..., temperature=0)``).

    Returns:
        ``(..., V)`` the scaled logits (a new tensor).
    """
    _check_logits(logits)
    temperature = _check_temperature(temperature, allow_zero=False)
    return _divide(logits, temperature)


def _divide(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits / temperature``, refused where a finite logit overflows to infinity.

    A temperature so small that $x / T$ leaves the dtype's range (``1e-320`` in float32,
    say) gives infinite logits and NaN probabilities; the limit T -> 0 is greedy decoding.
    """
    scaled = logits / temperature
    if bool((~torch.isfinite(scaled) & torch.isfinite(logits)).any()):
        raise ValueError(
            f"temperature must be large enough that logits / temperature stays finite in {logits.dtype}, "
            f"got {temperature!r} (logits up to {float(logits[torch.isfinite(logits)].abs().max()):g}); "
            "for the limit temperature -> 0 use temperature=0 (greedy)"
        )
    return scaled


def top_k_filter(logits: torch.Tensor, top_k: int, min_tokens_to_keep: int = 1) -> torch.Tensor:
    r"""Keep the ``top_k`` largest logits of each row; the others become $-\infty$.

    A token is kept when its logit is at least the $k$-th largest, so tokens tied with the
    $k$-th are all kept (a row may keep more than $k$).

    Args:
        logits: ``(..., V)`` floating-point logits.
        top_k: $k \ge 1$; values above $V$ keep everything.
        min_tokens_to_keep: keep at least this many tokens ($k$ is raised to it).

    Returns:
        ``(..., V)`` the filtered logits.
    """
    _check_logits(logits)
    top_k = check_int(top_k, "top_k", minimum=1)
    min_tokens_to_keep = check_int(min_tokens_to_keep, "min_tokens_to_keep", minimum=1)
    k = min(max(top_k, min_tokens_to_keep), logits.shape[-1])
    kth_largest = torch.topk(logits, k, dim=-1).values[..., -1:]  # (..., 1)
    return logits.masked_fill(logits < kth_largest, FILTER_VALUE)


def _ascending_values(logits: torch.Tensor) -> torch.Tensor:
    """The logits of each row sorted from smallest to largest (values only, no indices).

    The sorted values are unique whatever the algorithm (tied tokens carry equal values),
    so numpy's vectorised sort, several times faster than ``torch.sort`` on a CPU, gives
    exactly the tensor ``torch.sort(logits).values`` would.
    """
    if logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.float64):
        return torch.from_numpy(np.sort(logits.detach().numpy(), axis=-1))
    return torch.sort(logits.detach(), dim=-1).values


def top_p_filter(logits: torch.Tensor, top_p: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    r"""Nucleus filtering: keep the most probable tokens until their probability first reaches ``top_p``.

    Sorted by probability, $p_{(1)} \ge p_{(2)} \ge \dots$, the kept set is the shortest
    prefix $\{(1), \dots, (m)\}$ with $\sum_{i \le m} p_{(i)} \ge p$: the token at which the
    sum first reaches $p$ is kept. Equivalently, a token is removed when the total
    probability of it and every less probable token is at most $1 - p$, which is how it
    is computed here (summing from the least probable token up, as the transformers
    library does, so the floating-point sums agree to the bit).

    Since the removed tokens are the least probable ones, the cut is a threshold on the
    logit: every token below the smallest kept logit goes. Only when tokens tied with
    that logit fall on both sides of the cut does it matter which of them the sort put
    first; then the sort's own order decides, as in the transformers library.

    Args:
        logits: ``(..., V)`` floating-point logits.
        top_p: $p \in (0, 1]$. At $p = 1$ only tokens of probability exactly 0 are removed.
        min_tokens_to_keep: never keep fewer than this many tokens.

    Returns:
        ``(..., V)`` the filtered logits; the softmax of the result is the kept tokens'
        probabilities renormalised to sum to 1.
    """
    _check_logits(logits)
    top_p = _check_top_p(top_p)
    min_tokens_to_keep = check_int(min_tokens_to_keep, "min_tokens_to_keep", minimum=1)
    V = logits.shape[-1]
    ascending = _ascending_values(logits).to(logits.device)  # (..., V) least probable first
    tail_mass = ascending.softmax(dim=-1).cumsum(dim=-1)  # (..., V) p of this token and of all below it
    # tail_mass never decreases, so the removed tokens are a prefix of the ascending order.
    n_removed = (tail_mass <= 1 - top_p).sum(dim=-1, keepdim=True)  # (..., 1)
    n_removed = n_removed.clamp(max=max(V - min_tokens_to_keep, 0))  # the most probable ones always stay
    smallest_kept = ascending.gather(-1, n_removed)  # (..., 1)
    largest_removed = ascending.gather(-1, (n_removed - 1).clamp(min=0))
    if ((n_removed > 0) & (largest_removed == smallest_kept)).any():
        return _top_p_filter_by_rank(logits, top_p, min_tokens_to_keep)  # a tie straddles the cut
    return logits.masked_fill(logits < smallest_kept, FILTER_VALUE)


def _top_p_filter_by_rank(logits: torch.Tensor, top_p: float, min_tokens_to_keep: int) -> torch.Tensor:
    """Top-p decided token by token in sorted order; settles ties across the cut by the sort's order."""
    ascending, order = torch.sort(logits, dim=-1, descending=False)
    remove_sorted = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
    remove_sorted[..., -min_tokens_to_keep:] = False
    remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)  # back to vocabulary order
    return logits.masked_fill(remove, FILTER_VALUE)


def min_p_filter(logits: torch.Tensor, min_p: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    r"""Min-p filtering: keep the tokens with $p_i \ge p_{\min} \cdot \max_j p_j$.

    The cut scales with the model's confidence: a peaked distribution keeps few tokens,
    a flat one keeps many (top-p behaves alike; top-k does not).

    Args:
        logits: ``(..., V)`` floating-point logits.
        min_p: $p_{\min} \in [0, 1]$; 0 keeps everything, 1 keeps only the most probable token(s).
        min_tokens_to_keep: never keep fewer than this many tokens.

    Returns:
        ``(..., V)`` the filtered logits.
    """
    _check_logits(logits)
    min_p = _check_min_p(min_p)
    min_tokens_to_keep = check_int(min_tokens_to_keep, "min_tokens_to_keep", minimum=1)
    probs = logits.softmax(dim=-1)
    threshold = min_p * probs.amax(dim=-1, keepdim=True)  # (..., 1)
    remove = probs < threshold
    most_probable = torch.topk(probs, min(min_tokens_to_keep, probs.shape[-1]), dim=-1).indices
    remove.scatter_(-1, most_probable, False)
    return logits.masked_fill(remove, FILTER_VALUE)


def _warp(logits: torch.Tensor, temperature: float, top_k, top_p: float, min_p) -> torch.Tensor:
    """Temperature, then top-k, top-p, min-p, each only when it changes something (as transformers does)."""
    if temperature != 1.0:
        logits = _divide(logits, temperature)
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    if min_p is not None:
        logits = min_p_filter(logits, min_p)
    return logits


def sample_next_token(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    *,
    min_p: float | None = None,
) -> torch.Tensor:
    r"""Draw one token per row from ``softmax(filter(logits / T))``; ``temperature=0`` is greedy.

    Order as in the transformers library: temperature, top-k, top-p, min-p, softmax, then
    ``torch.multinomial``. With ``generator=None`` the draw uses torch's global generator,
    so ``torch.manual_seed(s)`` before sampling reproduces it.

    Args:
        logits: ``(B, V)`` or ``(V,)`` next-token logits.
        temperature: $T \ge 0$; 0 takes the argmax and ignores the filters.
        top_p: nucleus mass in (0, 1]; 1 turns top-p off.
        top_k: keep the $k \ge 1$ largest logits; ``None`` turns top-k off.
        generator: a ``torch.Generator`` for the draw, or ``None`` for the global one.
        min_p: the min-p threshold in [0, 1], or ``None`` (off).

    Returns:
        ``(B,)`` (or a 0-d tensor for 1-D logits) token ids, ``torch.long``.
    """
    _check_logits(logits)
    temperature = _check_temperature(temperature, allow_zero=True)
    top_p = _check_top_p(top_p)
    if top_k is not None:
        top_k = check_int(top_k, "top_k", minimum=1)
    if min_p is not None:
        min_p = _check_min_p(min_p)
    check_generator(generator)
    if logits.ndim not in (1, 2):
        raise ValueError(f"logits must have shape (V,) or (B, V), got {tuple(logits.shape)}")
    if not torch.isfinite(logits).any(dim=-1).all():
        raise ValueError("a row of logits is entirely -inf: no token can be drawn")
    return _sample(logits, temperature, top_k, top_p, min_p, generator)


def _sample(logits, temperature, top_k, top_p, min_p, generator) -> torch.Tensor:
    """The checked core of :func:`sample_next_token` (``generate`` validates once, not every step)."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = _warp(logits, temperature, top_k, top_p, min_p).softmax(dim=-1)
    if logits.ndim == 1:
        return torch.multinomial(probs, 1, generator=generator)[0]
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)


def _token_ids(value, name: str, maximum: int | None = None, hint: str = "") -> list[int]:
    """One token id or several, as a list of ints in ``[0, maximum]`` (``None`` is the empty list)."""
    if value is None:
        return []
    if isinstance(value, Integral) or (isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim == 0):
        value = [value]
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple, torch.Tensor, np.ndarray)):
        raise TypeError(f"{name} must be an int, a list of ints or None, got {value!r}")
    return [check_int(v, name, minimum=0, maximum=maximum, hint=hint) for v in value]


def _end_ids(model, eos_token_id) -> list[int]:
    """The end tokens ``generate`` stops at: ``eos_token_id``, else the model's generation config's."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    config = getattr(model, "generation_config", None)
    return _token_ids(eos_token_id if eos_token_id is not None else getattr(config, "eos_token_id", None),
                      "eos_token_id", maximum=None if vocab is None else vocab - 1,
                      hint="" if vocab is None else f"(a token of the model's vocabulary of {vocab})")


def _through_first_end(tokens: torch.Tensor, end_ids: list[int]) -> torch.Tensor:
    """1 at each row's tokens up to and including its first end token, 0 after it, shape of ``tokens``."""
    ended = torch.isin(tokens, torch.tensor(end_ids, dtype=torch.long, device=tokens.device)).long()
    return ((ended.cumsum(1) - ended) == 0).long()  # no end token before this position


def _check_attention_mask(mask, shape: torch.Size) -> None:
    """A left-padded 0/1 mask of ``input_ids``' shape, with a token in every row."""
    check_tensor(mask, "attention_mask")
    if mask.shape != shape:
        raise ValueError(f"attention_mask must have the shape of input_ids {tuple(shape)}, got {tuple(mask.shape)}")
    if mask.is_floating_point() or mask.is_complex():
        raise TypeError(f"attention_mask must be an integer or bool tensor of 0s and 1s, got {mask.dtype}")
    mask = mask.long()
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"attention_mask must hold only 0 (padding) and 1 (token), got values {mask.unique().tolist()}")
    empty = (mask.sum(dim=1) == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"attention_mask rows {empty} are all 0: every prompt needs at least one token")
    right = (mask[:, 1:] < mask[:, :-1]).any(dim=1).nonzero().flatten().tolist()  # a 0 after a 1
    if right:
        raise ValueError(
            f"attention_mask rows {right} have padding after their tokens: generate continues every row on "
            "the right, so pad prompts on the left (tokenizer.padding_side = 'left')"
        )


def left_pad(sequences: Sequence[Sequence[int]], pad_token_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token-id lists into ``(input_ids, attention_mask)``, both ``(B, P)``.

    Generation continues every row on the right, so the prompts end in the same column;
    the mask is 0 on the padding. :func:`position_ids` numbers the real tokens from 0.
    """
    if isinstance(sequences, (str, bytes)) or not isinstance(sequences, Sequence) or not sequences:
        raise TypeError(f"sequences must be a non-empty list of token-id lists, got {sequences!r:.80}")
    if any(len(s) == 0 for s in sequences):
        raise ValueError("sequences must each hold at least one token")
    pad_token_id = check_int(pad_token_id, "pad_token_id", minimum=0)
    P = max(len(s) for s in sequences)
    ids = torch.tensor([[pad_token_id] * (P - len(s)) + list(s) for s in sequences], device=device)
    mask = torch.tensor([[0] * (P - len(s)) + [1] * len(s) for s in sequences], device=device)
    return ids, mask


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count real tokens only, ``(B, T)``: a left-padded row's first token is at 0.

    Padding gets position 0 (it is masked, so its position never matters).
    """
    check_tensor(attention_mask, "attention_mask")
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

@dataclass(frozen=True)
class SharedPrefix:
    """Tokens that every prompt of a :func:`generate` call starts with, and their KV cache.

    Made by :func:`prefix_cache`; pass it as ``generate(..., prefix=...)`` (or to several
    calls) and each call continues from copies of this one cache instead of encoding the
    tokens again for every row. It holds the keys and values of the weights it was made
    with: make it again after training.
    """

    ids: torch.Tensor  # (c,) the prefix's token ids
    cache: object  # the model's cache of those c tokens, batch 1
    model_id: int  # id() of the model that encoded them


@torch.no_grad()
def prefix_cache(model, prefix_ids) -> SharedPrefix:
    """Encode ``prefix_ids`` (a list or 1-D tensor of token ids) once, for :func:`generate`'s ``prefix``."""
    if torch.is_tensor(prefix_ids):
        check_int_tensor(prefix_ids, "prefix_ids")
        if prefix_ids.ndim != 1:
            raise ValueError(f"prefix_ids must be 1-D (one prefix for every row), got shape {tuple(prefix_ids.shape)}")
        prefix_ids = prefix_ids.tolist()
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    ids = _token_ids(prefix_ids, "prefix_ids", maximum=None if vocab is None else vocab - 1,
                     hint="" if vocab is None else f"(tokens of the model's vocabulary of {vocab})")
    if not ids:
        raise ValueError("prefix_ids must hold at least one token id")
    ids = torch.tensor(ids, device=model.device)
    with eval_mode(model):
        cache = model(ids[None], use_cache=True, **_last_only(model, ids)).cache
    return SharedPrefix(ids=ids, cache=cache, model_id=id(model))


def _last_only(model, input_ids: torch.Tensor) -> dict:
    """The keyword that makes a forward on ``input_ids`` project only the last position to the vocabulary."""
    return keep_logits(model, torch.tensor([-1], device=input_ids.device))


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int | None = None,
    min_p: float | None = None,
    attention_mask: torch.Tensor | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    num_return_sequences: int = 1,
    greedy_first: bool = False,
    suppress_tokens: list[int] | None = None,
    output_logps: bool = False,
    prefix: SharedPrefix | None = None,
    progress: bool = False,
):
    r"""Sample (or, with ``temperature=0``, greedily decode) a continuation with a KV cache.

    One forward over the prompt fills the cache (and projects only its last position to
    the vocabulary); each later step feeds only the newest token. Rows that produced an
    end-of-sequence token are padded with ``pad_token_id`` from then on, and generation
    stops early once every row has ended, as in the transformers library. With
    ``generator=None`` and the same global seed the tokens equal
    ``model.generate(do_sample=True, temperature=..., top_p=..., top_k=...)`` (pass
    ``top_k=0`` there for our ``top_k=None``: its default is 50).

    Args:
        model: a causal LM of the transformers library (forward takes ``cache=``).
        input_ids: ``(B, P)`` prompt token ids; left-padded when rows differ in length.
        max_new_tokens: how many tokens to add at most ($\ge 1$).
        temperature, top_p, top_k, min_p: as in :func:`sample_next_token`.
        attention_mask: ``(B, P)``, 0 on (left) padding; ``None`` means no padding.
        eos_token_id: id(s) that end a row; ``None`` takes the model's generation config,
            ``[]`` never ends a row early.
        pad_token_id: fills ended rows; ``None`` takes the generation config's, else the first eos.
        generator: a ``torch.Generator`` for the draws, or ``None`` for the global one.
        num_return_sequences: continuations per prompt. The prompt pass runs once and its
            cache is copied, so the ``B * num_return_sequences`` rows (prompt 0's first,
            then prompt 1's, ...) share it.
        greedy_first: decode the first row of each prompt greedily and sample the others
            (one prompt pass gives the greedy answer and the samples). Every row is drawn
            from the generator all the same, so the generator advances as it would without
            greedy rows (on the CPU the samples are then the same, a test checks).
        suppress_tokens: ids that are never produced (their logits set to $-\infty$ first).
        output_logps: also return each new token's log-probability under the model's own
            distribution (temperature 1, no filter, no suppression).
        prefix: tokens that come before every row of ``input_ids``, already encoded by
            :func:`prefix_cache` (a system prompt, few-shot examples). Every row continues
            from a copy of its cache, laid out as ``[prefix][padding][row]`` with the
            positions of ``[prefix][row]``: the tokens and log-probabilities are those of
            the prompts ``prefix + row`` (equal up to float rounding; a test checks). The
            returned sequences start with ``input_ids``, without the prefix.
        progress: show a bar over the decoding steps (:func:`llmbook.utils.progress`).

    Returns:
        ``(B * num_return_sequences, P + n)``: each prompt followed by its $n \le$
        ``max_new_tokens`` new tokens; with ``output_logps`` a pair ``(sequences, logps)``,
        ``logps`` of shape ``(B * num_return_sequences, n)``, float32, 0 after a row ended.
    """
    check_int_tensor(input_ids, "input_ids")
    if input_ids.ndim != 2 or input_ids.dtype != torch.long:
        raise ValueError(f"input_ids must be a (B, P) torch.long tensor, got shape {tuple(input_ids.shape)}, "
                         f"{input_ids.dtype}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must hold at least one prompt of at least one token, got shape "
                         f"{tuple(input_ids.shape)}")
    check_token_ids(input_ids, "input_ids", model)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    max_new_tokens = check_int(max_new_tokens, "max_new_tokens", minimum=1)
    temperature = _check_temperature(temperature, allow_zero=True)
    top_p = _check_top_p(top_p)
    top_k = None if top_k is None else check_int(top_k, "top_k", minimum=1)
    min_p = None if min_p is None else _check_min_p(min_p)
    check_generator(generator)
    copies = check_int(num_return_sequences, "num_return_sequences", minimum=1)
    greedy_first = check_bool(greedy_first, "greedy_first")
    output_logps = check_bool(output_logps, "output_logps")
    if attention_mask is not None:
        _check_attention_mask(attention_mask, input_ids.shape)
    config = getattr(model, "generation_config", None)
    top_id = None if vocab is None else vocab - 1
    in_vocab = "" if vocab is None else f"(a token of the model's vocabulary of {vocab})"
    eos = _end_ids(model, eos_token_id)
    suppress = _token_ids(suppress_tokens, "suppress_tokens", maximum=top_id, hint=in_vocab)
    if pad_token_id is None:
        pad_token_id = getattr(config, "pad_token_id", None)
        pad_token_id = pad_token_id if pad_token_id is not None else (eos[0] if eos else None)
    if pad_token_id is not None:  # it fills ended rows and is fed to the model like any token
        pad_token_id = check_int(pad_token_id, "pad_token_id", minimum=0, maximum=top_id, hint=in_vocab)
    if eos and pad_token_id is None:
        raise ValueError("pad_token_id is needed to fill rows that ended; pass one")
    if prefix is not None:
        if not isinstance(prefix, SharedPrefix):
            raise TypeError(f"prefix must be a SharedPrefix made by prefix_cache(model, ids), got "
                            f"{type(prefix).__name__}")
        if prefix.model_id != id(model):
            raise ValueError("prefix was encoded by another model: make it with prefix_cache(model, ids) "
                             "for the model that generates")
    shared = 0 if prefix is None else len(prefix.ids)
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(context, int) and shared + input_ids.shape[1] + max_new_tokens > context:
        warnings.warn(
            f"input_ids ({shared + input_ids.shape[1]} tokens) plus max_new_tokens ({max_new_tokens}) exceed the model's "
            f"context of {context} positions (config.max_position_embeddings): the tokens past it come from "
            "positions the model never saw in training. Shorten the prompt or lower max_new_tokens.",
            stacklevel=3,
        )
    if greedy_first and copies == 1:
        temperature = 0.0  # every row is a greedy row: no draw at all

    device = model.device
    input_ids = input_ids.to(device)
    B = input_ids.shape[0]
    positions, cache = None, {}
    if prefix is not None:  # [prefix][padding][row]: the prefix's cache, once per row
        cache = {"cache": copy.deepcopy(prefix.cache)}
        cache["cache"].batch_repeat_interleave(B)
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask.new_ones(B, shared), attention_mask.to(device)], dim=1)
    if attention_mask is not None:
        attention_mask = attention_mask.to(device=device, dtype=torch.long)
        if bool(attention_mask.all()):
            attention_mask = None  # no padding: the causal mask alone is exact (and faster)
        else:  # a left-padded row starts at position 0, a row after a prefix at its length
            positions = position_ids(attention_mask)[:, shared:]
    eos_ids = torch.tensor(eos, device=device) if eos else None
    suppress_ids = torch.tensor(suppress, device=device) if suppress else None
    N = B * copies
    unfinished = torch.ones(N, dtype=torch.bool, device=device)
    is_greedy = torch.arange(N, device=device) % copies == 0 if greedy_first else None

    out = model(input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True,
                **cache, **_last_only(model, input_ids))
    cache, logits = out.cache, out.logits[:, -1].float()  # (B, V) the next-token logits, in fp32 like transformers
    if copies > 1:  # rows become prompt 0 copy 1, ..., prompt 0 copy n, prompt 1 copy 1, ...
        cache.batch_repeat_interleave(copies)
        logits = logits.repeat_interleave(copies, dim=0)
        input_ids = input_ids.repeat_interleave(copies, dim=0)
        if attention_mask is not None:
            attention_mask = attention_mask.repeat_interleave(copies, dim=0)
            positions = positions.repeat_interleave(copies, dim=0)
    new_tokens, new_logps = [], []
    steps = show_progress(range(max_new_tokens), desc="generate", disable=not progress)
    for step in steps:
        if torch.isnan(logits).any():
            raise ValueError(f"the model produced NaN logits at step {step}")
        scores = logits if suppress_ids is None else logits.index_fill(-1, suppress_ids, FILTER_VALUE)
        token = _sample(scores, temperature, top_k, top_p, min_p, generator)  # (N,)
        if is_greedy is not None:
            token = torch.where(is_greedy, scores.argmax(dim=-1), token)
        if eos_ids is not None:
            token = torch.where(unfinished, token, pad_token_id)
        if output_logps:
            logp = torch.log_softmax(logits, dim=-1).gather(-1, token[:, None]).squeeze(-1)
            new_logps.append(torch.where(unfinished, logp, 0.0))
        if eos_ids is not None:
            unfinished &= ~torch.isin(token, eos_ids)
        new_tokens.append(token)
        if step == max_new_tokens - 1 or (eos_ids is not None and not unfinished.any()):
            break
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(N, 1)], dim=1)
            positions = positions[:, -1:] + 1
        out = model(token[:, None], attention_mask=attention_mask, position_ids=positions, cache=cache,
                    use_cache=True)
        cache, logits = out.cache, out.logits[:, -1].float()
    steps.close()  # the bar ends where decoding stopped, also when every row ended early
    sequences = torch.cat([input_ids, torch.stack(new_tokens, dim=1)], dim=1)
    return (sequences, torch.stack(new_logps, dim=1)) if output_logps else sequences


def answer_probability(model, batch, *, temperature: float | Sequence[float] = 1.0, top_p: float = 1.0,
                       top_k: int | None = None, min_p: float | None = None) -> torch.Tensor:
    r"""The exact probability that sampling writes each row's labelled answer, from one forward pass.

    Sampling the answer $y = (y_1, \dots, y_n)$ token by token from the filtered, tempered
    distribution $q_{T,p}$ of :func:`sample_next_token` writes exactly $y$ with probability

    $$P(y \mid x) = \prod_{t=1}^{n} q_{T,p}(y_t \mid x, y_{<t}),$$

    and every factor is read off one teacher-forced pass: each step of sampling $y$ would
    feed the model the same prefix that teacher forcing feeds. So the expected value of
    "the sample is this answer" (a reward, an accuracy) needs no sampling and has no
    sampling noise. Only the labelled positions are projected to the vocabulary
    (:func:`llmbook.losses.labelled_logits`). $T = 0$ is greedy decoding: 1 where every
    label is the argmax, else 0.

    Args:
        model: a causal LM (transformers; a :func:`llmbook.models.top_layers` copy fed
            ``inputs_embeds`` too).
        batch: model inputs plus ``labels`` ``(B, L)``, not shifted, ``-100`` outside the
            answer (:class:`llmbook.data.CompletionCollator` or ``QACollator`` build them);
            include the end token among the labels to require that the answer stops there.
        temperature: $T \ge 0$, or a list of them: one forward pass serves them all.
        top_p, top_k, min_p: the filters, as in :func:`sample_next_token`.

    Returns:
        ``(B,)`` float32 probabilities, or ``(len(temperature), B)`` for a list.
    """
    from llmbook.losses import labelled_logits  # losses imports data, as this module does

    several = isinstance(temperature, Sequence) and not isinstance(temperature, str)
    temperatures = [_check_temperature(t, allow_zero=True) for t in (temperature if several else [temperature])]
    if not temperatures:
        raise ValueError("temperature must be a number or a non-empty list of numbers")
    top_p = _check_top_p(top_p)
    top_k = None if top_k is None else check_int(top_k, "top_k", minimum=1)
    min_p = None if min_p is None else _check_min_p(min_p)
    if not hasattr(batch, "get") or "labels" not in batch:
        raise TypeError("batch must be a dict with 'labels' and the model's inputs (input_ids, attention_mask)")
    labels = check_int_tensor(batch["labels"], "labels")
    if labels.ndim != 2 or not (labels[:, 1:] != -100).any(dim=1).all():
        raise ValueError("every row of labels needs a labelled position (a label other than -100 after the "
                         "first): a row without an answer has no probability to give")
    with torch.no_grad():
        logits, scored = labelled_logits(model, batch)  # (N, V): the positions that predict a label
    logits = logits.float()
    target = labels[:, 1:][scored]  # (N,)
    row = scored.nonzero()[:, 0]  # (N,) the row of each scored position
    probs = []
    for T in temperatures:
        if T == 0.0:
            logp = torch.where(logits.argmax(-1) == target, 0.0, -math.inf)
        else:
            logp = torch.log_softmax(_warp(logits, T, top_k, top_p, min_p), dim=-1).gather(1, target[:, None])[:, 0]
        total = torch.zeros(scored.shape[0], device=logits.device).index_add_(0, row, logp)  # (B,)
        probs.append(total.exp())
    return torch.stack(probs) if several else probs[0]


@dataclass
class Answers:
    """What :func:`generate_answers` returns, one entry per prompt."""

    greedy: list[str]  # the greedy answer ([] when greedy=False)
    greedy_logps: list[list[float]]  # log p of each greedy token under the model, end-of-turn token included
    stopped: list[bool]  # whether the greedy answer ended (end-of-turn) within max_new_tokens
    samples: list[list[str]]  # num_samples sampled answers per prompt ([] when num_samples=0)
    samples_stopped: list[list[bool]]  # whether each sampled answer ended within max_new_tokens

    @property
    def greedy_prob(self) -> list[float]:
        r"""$p(\hat y \mid x) = \prod_t p(\hat y_t \mid x, \hat y_{<t})$ of each greedy answer."""
        return [math.exp(sum(logps)) for logps in self.greedy_logps]

    @property
    def first_prob(self) -> list[float]:
        """The probability of the greedy answer's first token."""
        return [math.exp(logps[0]) for logps in self.greedy_logps]


def stop_token_ids(model, tokenizer) -> list[int]:
    """The ids that end an answer: the tokenizer's end token and the model's generation config's."""
    if not hasattr(tokenizer, "eos_token_id"):
        raise TypeError(f"tokenizer must be a tokenizer (with an eos_token_id), got {type(tokenizer).__name__}")
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(configured) if isinstance(configured, (list, tuple)) else {configured}
    return sorted(i for i in ids if i is not None)


_NEWLINE_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def newline_token_ids(tokenizer) -> list[int]:
    """The ids of every token whose text holds a line break (``"\\n"``, ``".\\n\\n"``, ...)."""
    if not callable(getattr(tokenizer, "decode", None)):
        raise TypeError(f"tokenizer must be a tokenizer (with decode), got {type(tokenizer).__name__}")
    if tokenizer not in _NEWLINE_IDS:
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        _NEWLINE_IDS[tokenizer] = [i for i, t in enumerate(texts) if "\n" in t]
    return list(_NEWLINE_IDS[tokenizer])


def _common_length(rows: list[list[int]]) -> int:
    """How many first tokens every row shares, leaving each row at least one token of its own."""
    shortest = min(len(row) for row in rows) - 1
    n = 0
    while n < shortest and all(row[n] == rows[0][n] for row in rows):
        n += 1
    return n


def generate_answers(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    system: str | None = None,
    stems: Sequence[str] | None = None,
    max_new_tokens: int = 32,
    greedy: bool = True,
    num_samples: int = 0,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int | None = None,
    suppress_tokens: list[int] | None = None,
    strip: bool = True,
    batch_size: int = 16,
    generator: torch.Generator | None = None,
    share_prefix: bool = True,
    stop_at_newline: bool = False,
    progress: bool = False,
) -> Answers:
    r"""The model's answers to user messages: greedy, sampled, or both from one prompt pass.

    Each prompt is formatted with the chat template (and ``system``), its ``stem`` appended,
    left-padded in its batch and run through :func:`generate` once; the greedy row and the
    ``num_samples`` sampled rows continue from copies of that one prompt pass. The tokens
    that every prompt starts with (the template's header, the system message) are encoded
    once for the whole call (:func:`prefix_cache`) and every row continues from them. Answers are
    decoded without special tokens and stripped of surrounding white space.

    Args:
        prompts: the user messages.
        system: the system message (``None``: the template's default).
        stems: optional starts of the answers (``"The capital of France is"``), one per
            prompt: appended after the chat prompt, and the model continues them.
        max_new_tokens: answer length limit; an answer stops earlier at end of turn.
        greedy: also decode the greedy answer.
        num_samples: sampled answers per prompt, at ``temperature``, ``top_p``, ``top_k``.
        suppress_tokens: ids never produced (``tokenizer.all_special_ids`` forbids ending).
        strip: strip each answer; ``False`` keeps a continuation's leading space or newline,
            to append it to its stem.
        batch_size: prompts per prompt pass.
        progress: show a bar over each batch's decoding steps.
        generator: a seeded ``torch.Generator`` (on the model's device) makes the samples
            reproducible.
        share_prefix: encode the prompts' common first tokens once; ``False`` encodes
            every prompt whole (the same answers, up to float rounding).
        stop_at_newline: also end an answer at its first token that holds a line break
            (:func:`newline_token_ids`): after a few-shot prompt, whose worked examples
            take a line each, the answer is the first line.

    Returns:
        :class:`Answers`.
    """
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r:.80}")
    if stems is not None and (isinstance(stems, str) or len(stems) != len(prompts)):
        raise ValueError(f"stems must be a list of {len(prompts)} strings, one per prompt")
    greedy = check_bool(greedy, "greedy")
    strip = check_bool(strip, "strip")
    num_samples = check_int(num_samples, "num_samples", minimum=0 if greedy else 1,
                            hint="" if greedy else "(with greedy=False there must be samples)")
    batch_size = check_int(batch_size, "batch_size", minimum=1)
    share_prefix = check_bool(share_prefix, "share_prefix")
    stop_at_newline = check_bool(stop_at_newline, "stop_at_newline")
    if not hasattr(tokenizer, "pad_token_id") or not callable(tokenizer):
        raise TypeError(f"tokenizer must be the model's tokenizer (load_model returns both), got "
                        f"{type(tokenizer).__name__}")
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token = tokenizer.eos_token")
    stop = stop_token_ids(model, tokenizer)
    if stop_at_newline:
        stop = sorted(set(stop) | set(newline_token_ids(tokenizer)))
    copies = int(greedy) + num_samples
    answers = Answers(greedy=[], greedy_logps=[], stopped=[], samples=[], samples_stopped=[])
    texts = [chat_prompt(tokenizer, p, system) + (stems[i] if stems is not None else "")
             for i, p in enumerate(prompts)]
    encoded = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    shared = _common_length(encoded) if share_prefix and len(encoded) > 1 else 0  # one prompt: nothing to share
    with eval_mode(model):
        prefix = prefix_cache(model, encoded[0][:shared]) if shared else None
        for start in range(0, len(prompts), batch_size):
            ids, mask = left_pad([row[shared:] for row in encoded[start:start + batch_size]],
                                 tokenizer.pad_token_id, device=model.device)
            out, logps = generate(model, ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                  temperature=temperature if num_samples else 0.0, top_p=top_p, top_k=top_k,
                                  eos_token_id=stop, pad_token_id=tokenizer.pad_token_id, generator=generator,
                                  num_return_sequences=copies, greedy_first=greedy, suppress_tokens=suppress_tokens,
                                  output_logps=True, prefix=prefix, progress=progress)
            new = out[:, ids.shape[1]:]  # (rows, n)
            ended = torch.isin(new, torch.tensor(stop, device=new.device))  # (rows, n)
            # an answer's tokens run up to and including its first end token
            lengths = _through_first_end(new, stop).sum(1).tolist()
            decoded = tokenizer.batch_decode(new, skip_special_tokens=True)
            decoded = [t.strip() for t in decoded] if strip else decoded
            for row in range(0, new.shape[0], copies):
                if greedy:
                    answers.greedy.append(decoded[row])
                    answers.stopped.append(bool(ended[row].any()))
                    answers.greedy_logps.append(logps[row, : lengths[row]].tolist())
                if num_samples:
                    answers.samples.append(decoded[row + int(greedy): row + copies])
                    answers.samples_stopped.append([bool(ended[r].any()) for r in range(row + int(greedy), row + copies)])
    return answers


