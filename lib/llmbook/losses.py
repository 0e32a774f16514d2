r"""The supervised fine-tuning (SFT) loss, built on a numerically stable log-softmax.

Chapter 2 derives everything in this module. A causal language model's LM head maps
each position's hidden state $h_t \in \mathbb{R}^H$ to logits $x_t = W h_t \in \mathbb{R}^V$
over the vocabulary. The probability of the next token $y_{t+1}$ is a softmax, and its
logarithm (the *logprob*) is computed stably by subtracting the row's maximum
$m = \max_j x_j$ first (the log-sum-exp trick):

$$\log \operatorname{softmax}(x)_i = (x_i - m) - \log \sum_j e^{x_j - m} \in (-\infty, 0].$$

SFT averages the negative logprob of the response tokens only; the prompt's positions
carry the label ``-100`` and no loss. With $k$ response tokens,

$$\mathcal{L} = -\frac{1}{k} \sum_{t \in \text{response}} \log p_\theta(y_{t+1} \mid y_{\le t}).$$

Labels are *not* shifted by the caller: :func:`sft_loss` and :func:`chunked_sft_loss`
shift them inside (position $t$'s logits predict label $t+1$), as the transformers
library's models do, so that ``sft_loss(model(ids).logits, labels)`` equals
``model(ids, labels=labels).loss``.

Only the answer's positions need logits: :func:`logits_to_keep` says how many last
positions of a batch do, and :func:`answer_logps` runs a model with just those projected
to the vocabulary (the LM head is the largest matrix product of a step).
:func:`labelled_logits` projects only the labelled positions themselves; DPO's sequence
log-probabilities (:mod:`llmbook.dpo`) are built on it, and so is :func:`answer_scores`,
which reads from them greedy decoding's verdict on each answer; the per-group loss of
chapter 5 (:func:`sft_loss_by_group`) is built on that.

Half-precision inputs (``float16``, ``bfloat16``) are computed in ``float32``, as
torch's own kernels accumulate them; :func:`log_softmax` returns the input's dtype,
the losses return ``float32``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch

from llmbook._checks import (
    accepts_keyword,
    check_float_tensor,
    check_int,
    check_int_tensor,
    check_tensor,
    keep_logits,
)
from llmbook.data import IGNORE_INDEX  # the label of a position that carries no loss

__all__ = [
    "IGNORE_INDEX",
    "answer_logps",
    "answer_scores",
    "chunked_sft_loss",
    "labelled_logits",
    "log_softmax",
    "logits_to_keep",
    "per_token_logps",
    "response_loss",
    "selective_log_softmax",
    "sft_loss",
    "sft_loss_by_group",
    "shared_prefix",
]

# What answer_logps hands the model from a batch (the rest, labels included, stays out).
_MODEL_INPUTS = ("input_ids", "inputs_embeds", "attention_mask", "position_ids")

# Rows of a [rows x V] block that selective_log_softmax processes at once: about 64 MiB
# of float32 temporaries for V = 49152, whatever the batch.
_BLOCK_ELEMENTS = 1 << 24


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision inputs (their range and precision are too small to sum exps)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _check_token_range(ids: torch.Tensor, vocab_size: int, name: str) -> None:
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(
            f"{name} must hold token ids in [0, {vocab_size}) (or the ignore_index), "
            f"got values in [{int(ids.min())}, {int(ids.max())}]"
        )


def log_softmax(logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    r"""Log-probabilities along ``dim``, in the stable form $(x - m) - \log \sum e^{x - m}$.

    Subtracting the maximum $m$ leaves the result unchanged (numerator and denominator
    of the softmax are both multiplied by $e^{-m}$) but makes every exponent $\le 0$:
    no $e^{x}$ can overflow, and the largest term of the sum is exactly 1, so the
    logarithm never sees 0. The naive ``log(e^x / sum e^x)`` instead overflows (inf,
    then NaN) for large logits, which fp16 reaches on ordinary logits and every dtype on
    logits scaled by 10 (a temperature of 0.1); ``log(softmax(x))`` underflows
    (``log 0 = -inf``) for small probabilities (chapter 2 counts both). Half-precision
    inputs are computed in float32 and the result rounded to their dtype, as torch's
    kernel does, so the error is that rounding alone.

    Args:
        logits: floating tensor, any shape.
        dim: the dimension to normalise over (the vocabulary).

    Returns:
        a tensor of the same shape and dtype, every value in $(-\infty, 0]$.
    """
    check_float_tensor(logits, "logits")
    if logits.dim() == 0:
        raise ValueError("logits must have at least one dimension (the vocabulary), got a 0-d tensor")
    dim = check_int(dim, "dim", minimum=-logits.dim(), maximum=logits.dim() - 1,
                    hint=f"(a dimension of logits of shape {tuple(logits.shape)})")
    if logits.shape[dim] == 0:
        raise ValueError(f"logits must have a non-empty dimension dim={dim} (the vocabulary), "
                         f"got shape {tuple(logits.shape)}")
    x = logits.to(_compute_dtype(logits.dtype))
    # m only shifts; its gradient cancels exactly, so it is treated as a constant.
    m = x.detach().amax(dim=dim, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # a row of all -inf stays -inf, like torch
    shifted = x - m
    return (shifted - shifted.exp().sum(dim=dim, keepdim=True).log()).to(logits.dtype)


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    r"""The log-probability of token ``index`` under ``logits``: $x_{\text{index}} - \log \sum_j e^{x_j}$.

    Equal to ``log_softmax(logits).gather(-1, index)`` but without the full
    ``[..., V]`` log-softmax: rows are processed in blocks, so only one block of
    temporaries exists at a time when no gradient is recorded.

    Args:
        logits: floating tensor, shape ``(..., V)``.
        index: integer token ids, shape ``(...)`` (one per row) or ``(..., K)`` (``K`` per row),
            each in ``[0, V)``.

    Returns:
        log-probabilities of the shape of ``index``, ``float32`` for half-precision logits.
    """
    check_float_tensor(logits, "logits")
    check_int_tensor(index, "index")
    if logits.dim() == 0:
        raise ValueError("logits must have at least one dimension (the vocabulary), got a 0-d tensor")
    if logits.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty last (vocabulary) dimension, got shape {tuple(logits.shape)}")
    lead = logits.shape[:-1]
    squeeze = index.shape == lead
    if not squeeze and not (index.dim() == logits.dim() and index.shape[:-1] == lead):
        raise ValueError(
            f"index must have shape {tuple(lead)} or {tuple(lead)} + (K,) to match logits {tuple(logits.shape)}, "
            f"got {tuple(index.shape)}"
        )
    vocab = logits.shape[-1]
    _check_token_range(index, vocab, "index")
    x = logits.reshape(-1, vocab)                                   # (N, V)
    idx = index.reshape(x.shape[0], 1 if squeeze else index.shape[-1])  # (N, K)
    rows = max(1, _BLOCK_ELEMENTS // max(vocab, 1))
    out = []
    for start in range(0, x.shape[0], rows):
        block = x[start : start + rows].to(_compute_dtype(x.dtype))  # (rows, V)
        m = block.detach().amax(dim=-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        lse = m + (block - m).exp().sum(dim=-1, keepdim=True).log()  # (rows, 1) log sum exp
        out.append(block.gather(-1, idx[start : start + rows]) - lse)
    result = torch.cat(out) if out else x.new_empty((0, idx.shape[1]), dtype=_compute_dtype(x.dtype))
    return result.reshape(index.shape)


def _shift(labels: torch.Tensor, ignore_index: int):
    """Labels of positions 1..T-1 (what positions 0..T-2 predict) and their loss mask."""
    shifted = labels[..., 1:]
    return shifted, shifted != ignore_index


def _check_labels(labels, lead_shape, lead_name: str, ignore_index: int, vocab_size: int):
    check_int_tensor(labels, "labels")
    ignore_index = check_int(ignore_index, "ignore_index")
    if labels.shape != lead_shape:
        raise ValueError(
            f"labels must have shape {tuple(lead_shape)} to match {lead_name}, got {tuple(labels.shape)}"
        )
    if labels.dim() < 1 or labels.shape[-1] < 2:
        raise ValueError(f"labels need at least 2 positions along the sequence (T >= 2), got shape {tuple(labels.shape)}")
    target, mask = _shift(labels, ignore_index)
    if not bool(mask.any()):
        raise ValueError(
            f"labels have no response token: after the shift every label equals ignore_index ({ignore_index}), "
            "so the loss would be 0/0. Check the prompt masking and truncation (max_length)."
        )
    _check_token_range(target[mask], vocab_size, "labels")
    return target, mask


def per_token_logps(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX):
    r"""Per-position $\log p(y_{t+1} \mid y_{\le t})$ and the mask of positions that carry loss.

    Args:
        logits: shape ``(..., T, V)``.
        labels: token ids, shape ``(..., T)``, not shifted; ``ignore_index`` marks no loss.
        ignore_index: the label of positions without loss.

    Returns:
        ``(logps, mask)``, both of shape ``(..., T - 1)``: position ``t`` holds the logprob of
        label ``t + 1`` (0 where masked) and ``mask`` is True where that label counts.
    """
    check_float_tensor(logits, "logits")
    if logits.dim() < 2:
        raise ValueError(f"logits must have shape (..., T, V), got {tuple(logits.shape)}")
    target, mask = _check_labels(labels, logits.shape[:-1], f"logits {tuple(logits.shape)}", ignore_index,
                                 logits.shape[-1])
    logps = selective_log_softmax(logits[..., :-1, :], target.masked_fill(~mask, 0))
    return logps.masked_fill(~mask, 0.0), mask


def logits_to_keep(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> int:
    """How many last positions of ``(B, T)`` labels need logits: from just before the earliest answer token on.

    Position ``t`` predicts token ``t + 1``, so the earliest labelled token ``f`` (over
    the whole batch) needs the logits of position ``f - 1`` and of everything after it:
    ``T - (f - 1)`` positions (all ``T`` when ``f = 0``).
    """
    check_int_tensor(labels, "labels")
    ignore_index = check_int(ignore_index, "ignore_index")
    if labels.dim() != 2 or labels.shape[0] == 0:
        raise ValueError(f"labels must have shape (B, T) with B >= 1, got {tuple(labels.shape)}")
    has_label = labels != ignore_index
    if not has_label.any():
        raise ValueError(f"labels has no response token at all (every label is ignore_index = {ignore_index})")
    first = int(has_label.any(dim=0).long().argmax())  # the earliest column with a label in any row
    return labels.shape[1] - max(first - 1, 0)


def answer_logps(model: torch.nn.Module, batch: Mapping[str, torch.Tensor],
                 ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    r"""$\log p_\theta(y_{t+1} \mid y_{\le t})$ at the answer positions of ``batch``, and their mask.

    The model runs on the batch's inputs (``input_ids`` or ``inputs_embeds``,
    ``attention_mask``) and projects only the last :func:`logits_to_keep` positions to the
    vocabulary; :func:`per_token_logps` then scores them against the labels.

    Args:
        model: a causal LM returning ``.logits`` (transformers, with or without adapters).
        batch: model inputs plus ``labels`` ``(B, T)``, not shifted, ``ignore_index`` where
            no loss is taken, and optionally ``shared_prefix`` (:func:`shared_prefix`);
            other entries are ignored.
        ignore_index: the label of positions without loss.

    Returns:
        ``(logps, mask)``, both ``(B, K - 1)`` for the ``K`` kept positions: as
        :func:`per_token_logps` returns them for the labels' last ``K`` columns.
    """
    if not isinstance(batch, Mapping) or "labels" not in batch:
        raise TypeError("batch must be a dict with 'labels' and the model's inputs (input_ids, attention_mask)")
    labels = check_tensor(batch["labels"], "labels")
    _check_model_batch(model, batch, ignore_index)
    T = labels.shape[-1]
    keep = logits_to_keep(labels, ignore_index)
    head = _output_head(model)
    if head is not None and batch.get("shared_prefix") is not None:  # run the shared positions once
        kept = _last_hidden(model, batch)[:, T - keep:].contiguous()  # one product, not one per row (keep_logits)
        return per_token_logps(head(kept), labels[:, T - keep:], ignore_index)
    inputs = {name: batch[name] for name in _MODEL_INPUTS if name in batch}
    if keep < T and accepts_keyword(model, "logits_to_keep"):
        inputs |= keep_logits(model, torch.arange(T - keep, T, device=labels.device))
    else:
        keep = T
    logits = model(**inputs, use_cache=False).logits  # (B, keep, V)
    return per_token_logps(logits, labels[:, T - keep:], ignore_index)


def response_loss(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    r"""The SFT loss of ``batch`` with the LM head applied only where an answer token is scored.

    The model's own loss for these labels, $-\frac{1}{k}\sum \log p(y_{t+1} \mid y_{\le t})$
    over the $k$ answer tokens. When the model exposes its output layer
    (``get_output_embeddings()``, no bias) the loss is :func:`chunked_sft_loss` of the last
    hidden state (after the final norm, as transformers returns it): the head projects only
    the labelled positions, a chunk at a time. Otherwise it comes from :func:`answer_logps`.
    Works with LoRA or a prefix too; a ``loss_fn`` for :func:`llmbook.train.train`.
    """
    if not isinstance(batch, Mapping) or "labels" not in batch:
        raise TypeError("batch must be a dict with 'labels' and the model's inputs (input_ids, attention_mask)")
    labels = check_int_tensor(batch["labels"], "labels")
    _check_model_batch(model, batch)
    head = _output_head(model)
    if head is None or getattr(head, "bias", None) is not None:
        logps, mask = answer_logps(model, batch)  # (B, K - 1) each, logps 0 where mask is False
        return -logps.sum() / mask.sum()
    return chunked_sft_loss(_last_hidden(model, batch), head.weight, labels)


def _check_model_batch(model, batch: Mapping, ignore_index: int = IGNORE_INDEX) -> None:
    """The inputs and labels of ``batch`` agree in shape and hold token ids of ``model``'s vocabulary.

    A label or mask of another shape would otherwise be broadcast or cut, and return numbers."""
    ids = batch.get("input_ids")
    embeds = batch.get("inputs_embeds")
    if ids is None and embeds is None:
        raise TypeError("batch must hold input_ids (or inputs_embeds) as well as labels")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if ids is not None:
        check_int_tensor(ids, "input_ids")
        if ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (B, T), got {tuple(ids.shape)}")
        if vocab is not None:
            _check_token_range(ids, vocab, "input_ids")
    shape = tuple((ids if ids is not None else embeds).shape[:2])
    if shape[1] == 0:
        raise ValueError(f"the batch's sequences are empty (shape {shape}): give each row at least one token")
    labels = check_int_tensor(batch["labels"], "labels")
    if tuple(labels.shape) != shape:
        raise ValueError(f"labels must have the inputs' shape {shape} (not shifted), got {tuple(labels.shape)}")
    if vocab is not None:
        _check_token_range(labels[labels != ignore_index], vocab, "labels")
    mask = batch.get("attention_mask")
    if mask is not None:
        check_tensor(mask, "attention_mask")
        if tuple(mask.shape) != shape:
            raise ValueError(f"attention_mask must have the inputs' shape {shape}, got {tuple(mask.shape)}")


def _output_head(model: torch.nn.Module):
    """The model's output layer if it can be applied to the last hidden state by hand, else ``None``."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return head if head is not None and accepts_keyword(model, "output_hidden_states") else None


def _last_hidden(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The last hidden state (after the final norm) for ``batch``'s inputs; the model's own head
    projects one position only, since the caller applies the head where it needs it.

    With ``batch["shared_prefix"] = (s, g)`` (see :func:`shared_prefix`) the first ``s``
    positions go through the model once per group of ``g`` rows, and the rest of each row
    continues from copies of their keys and values."""
    inputs = {name: batch[name] for name in _MODEL_INPUTS if name in batch}
    shared = _checked_shared_prefix(batch, inputs)
    if shared is None:
        return model(**inputs, **_no_logits(model, inputs), output_hidden_states=True,
                     use_cache=False).hidden_states[-1]
    s, g = shared
    mask = inputs.pop("attention_mask", None)
    head = {name: value[::g, :s] for name, value in inputs.items()}  # one row per group
    if mask is not None:
        head["attention_mask"] = mask[::g, :s]
    with _cache_slots_from_zero(model):
        out = model(**head, **_no_logits(model, head), output_hidden_states=True, use_cache=True)
        cache = out.cache
        cache.batch_repeat_interleave(g)
        tail = {name: value[:, s:] for name, value in inputs.items()}
        rest = model(**tail, attention_mask=mask, cache=cache, **_no_logits(model, tail), output_hidden_states=True,
                     use_cache=True)
    return torch.cat([out.hidden_states[-1].repeat_interleave(g, dim=0), rest.hidden_states[-1]], dim=1)


def _no_logits(model: torch.nn.Module, inputs: Mapping[str, torch.Tensor]) -> dict:
    """The keyword that makes a forward on ``inputs`` project no position to the vocabulary."""
    first = next(iter(inputs.values()))
    return keep_logits(model, torch.zeros(first.shape[:2], dtype=torch.bool, device=first.device))


def shared_prefix(batch: Mapping[str, torch.Tensor], group_size: int | None = None) -> int:
    """How many first positions every row of ``batch`` shares with the other rows of its group.

    Groups are ``group_size`` consecutive rows (``None``: the whole batch). The count covers
    the model's inputs and the attention mask, and stops one position before the last.
    ``batch | {"shared_prefix": (s, group_size)}`` then makes every function of this module
    (and of :mod:`llmbook.grpo`, :mod:`llmbook.sampling` that scores a batch) run those
    positions once per group: the same values up to float rounding, for less work when
    rows repeat a system prompt or, in GRPO, the prompt of a group of completions.
    """
    inputs = {name: batch[name] for name in _MODEL_INPUTS if name in batch}
    if not inputs:
        raise TypeError("batch must hold the model's inputs (input_ids or inputs_embeds, attention_mask)")
    for name, value in inputs.items():
        check_tensor(value, name)
        if value.dim() < 2:
            raise ValueError(f"{name} must have shape (B, T), got {tuple(value.shape)}")
    rows, length = next(iter(inputs.values())).shape[:2]
    for name, value in inputs.items():
        if tuple(value.shape[:2]) != (rows, length):
            raise ValueError(f"{name} must have the inputs' shape ({rows}, {length}), got {tuple(value.shape[:2])}")
    g = rows if group_size is None else check_int(group_size, "group_size", minimum=1, maximum=rows)
    if rows % g:
        raise ValueError(f"group_size ({g}) must divide the batch's {rows} rows")
    same = torch.ones(length, dtype=torch.bool, device=next(iter(inputs.values())).device)
    for value in inputs.values():
        grouped = value.reshape(rows // g, g, length, -1)
        same &= (grouped == grouped[:, :1]).flatten(3).all(-1).all(1).all(0)
    differ = (~same[: length - 1]).nonzero()
    return int(differ[0]) if len(differ) else length - 1


def _checked_shared_prefix(batch, inputs) -> tuple[int, int] | None:
    """``batch["shared_prefix"]`` as ``(s, g)``, checked against the batch, or None."""
    claim = batch.get("shared_prefix") if hasattr(batch, "get") else None
    if claim is None:
        return None
    if not isinstance(claim, (tuple, list)) or len(claim) != 2:
        raise TypeError(f"shared_prefix must be a pair (positions, group_size), got {claim!r}")
    s, g = claim
    rows, length = next(iter(inputs.values())).shape[:2]
    s = check_int(s, "shared_prefix's positions", minimum=0, maximum=length - 1)
    g = check_int(g, "shared_prefix's group_size", minimum=1, maximum=rows)
    if s == 0 or g == 1:
        return None  # nothing to share
    if shared_prefix(inputs, g) < s:  # the inputs, attention mask included
        raise ValueError(f"shared_prefix says the rows of each group of {g} share their first {s} positions, "
                         "but they differ there: recount it with losses.shared_prefix(batch, group_size)")
    return s, g


@contextlib.contextmanager
def _cache_slots_from_zero(model):
    """Number the decoder layers' cache slots 0, 1, ... while a forward fills a cache of its own.

    A :func:`llmbook.models.top_layers` copy made with ``share=True`` runs the model's own top
    layers, which keep their slots in the full model's cache (28 and 29 of 30, say)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    attns = [getattr(layer, "self_attn", None) for layer in layers] if layers is not None else []
    slots = [getattr(a, "layer_idx", None) for a in attns]
    try:
        for i, a in enumerate(attns):
            if a is not None and slots[i] is not None:
                a.layer_idx = i
        yield
    finally:
        for a, slot in zip(attns, slots):
            if a is not None and slot is not None:
                a.layer_idx = slot


def labelled_logits(model: torch.nn.Module, batch: Mapping[str, torch.Tensor],
                    ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The logits at the labelled positions only, row by row: ``(N, V)``, and where they are.

    Position $t$ of row $b$ is one of the $N$ when label $t + 1$ is not ``ignore_index``;
    its logits score that label. When the model exposes its output layer the head projects
    only these $N$ hidden states (the prompt's and the padding's are never projected to the
    vocabulary); otherwise the model's full logits are indexed.

    Args:
        model: a causal LM (transformers; a :func:`llmbook.models.top_layers` copy fed
            ``inputs_embeds`` too).
        batch: model inputs plus ``labels`` ``(B, T)``, not shifted.
        ignore_index: the label of positions without loss.

    Returns:
        ``(logits, scored)``: ``(N, V)`` logits (differentiable) and the ``(B, T - 1)`` bool
        mask of the positions they belong to (``scored.nonzero()`` lists them in order);
        ``labels[:, 1:][scored]`` are their targets.
    """
    if not isinstance(batch, Mapping) or "labels" not in batch:
        raise TypeError("batch must be a dict with 'labels' and the model's inputs (input_ids, attention_mask)")
    labels = check_int_tensor(batch["labels"], "labels")
    ignore_index = check_int(ignore_index, "ignore_index")
    if labels.dim() != 2:
        raise ValueError(f"labels must have shape (B, T), got {tuple(labels.shape)}")
    _check_model_batch(model, batch, ignore_index)
    scored = labels[:, 1:] != ignore_index
    head = _output_head(model)
    if head is not None:
        return head(_last_hidden(model, batch)[:, :-1][scored]), scored
    inputs = {name: batch[name] for name in _MODEL_INPUTS if name in batch}
    return model(**inputs, use_cache=False).logits[:, :-1][scored], scored


def answer_scores(model: torch.nn.Module, batch: Mapping[str, torch.Tensor],
                  ignore_index: int = IGNORE_INDEX) -> dict[str, torch.Tensor]:
    r"""Teacher-forced scores of each example's answer, with the LM head only where a label is.

    One forward pass on the batch's inputs gives, at every labelled position $t$, the
    distribution $p_\theta(\cdot \mid y_{\le t})$. Greedy decoding from the prompt writes the
    labelled answer exactly when the label is the argmax at each of its positions (each
    step then feeds the same token teacher forcing feeds), so ``correct`` is greedy
    decoding's verdict without decoding.

    Args:
        model: a causal LM (transformers; a :func:`llmbook.models.top_layers` copy fed
            ``inputs_embeds`` too).
        batch: model inputs plus ``labels`` ``(B, T)`` (not shifted), and optionally
            ``answer_mask`` ``(B, T)``, the labelled positions that ``correct`` checks
            (:class:`llmbook.data.QACollator` leaves out the end of turn); default: all.

    Returns:
        ``token_logps`` ``(N,)``, $\log p_\theta(y_{t+1} \mid y_{\le t})$ at the $N$ labelled
        positions, row by row (differentiable); ``example`` ``(N,)``, the row of each;
        ``correct`` ``(B,)`` bool; ``first_prob`` ``(B,)``, the probability of the greedy
        token at each row's first labelled position (the first answer token's, as
        :attr:`llmbook.sampling.Answers.first_prob` gives it).
    """
    if not isinstance(batch, Mapping) or "labels" not in batch:
        raise TypeError("batch must be a dict with 'labels' and the model's inputs (input_ids, attention_mask)")
    labels = check_int_tensor(batch["labels"], "labels")
    ignore_index = check_int(ignore_index, "ignore_index")
    if labels.dim() != 2:
        raise ValueError(f"labels must have shape (B, T), got {tuple(labels.shape)}")
    target = labels[:, 1:]
    scored = target != ignore_index  # (B, T - 1): position t predicts label t + 1
    if not scored.any(dim=1).all():
        raise ValueError("every row of labels needs a labelled position (a label other than ignore_index)")
    checked = scored
    if "answer_mask" in batch:
        mask = check_tensor(batch["answer_mask"], "answer_mask")
        if mask.shape != labels.shape or mask.dtype != torch.bool:
            raise ValueError(f"answer_mask must be a bool tensor of the labels' shape {tuple(labels.shape)}, "
                             f"got {mask.dtype} {tuple(mask.shape)}")
        checked = mask[:, 1:] & scored
    logits, _ = labelled_logits(model, batch, ignore_index)  # (N, V)
    logps = log_softmax(logits.float())
    token_logps = logps.gather(1, target[scored].unsqueeze(1)).squeeze(1)
    hit = torch.ones_like(target, dtype=torch.bool)
    hit[scored] = logits.detach().argmax(-1) == target[scored]
    counts = scored.sum(dim=1)
    first = torch.cumsum(counts, 0) - counts  # where each row's labelled positions start among the N
    first_prob = logps.detach()[first].max(dim=-1).values.exp()
    return {"token_logps": token_logps, "example": scored.nonzero()[:, 0],
            "correct": (hit | ~checked).all(dim=1), "first_prob": first_prob}


def sft_loss_by_group(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    r"""The SFT loss of ``batch``, and per group (Known, Unknown) its mean and the share fitted.

    $\mathcal{L} = -\frac{1}{k}\sum \log p(y_{t+1} \mid y_{\le t})$ over all $k$ answer tokens
    (the model's own loss for these labels). ``loss/known`` and ``loss/unknown`` average
    the same token losses within each group; ``fitted/known`` and ``fitted/unknown`` are the
    shares of the group's examples that greedy decoding answers exactly
    (:func:`answer_scores`' ``correct``, measured before this step's update). A group's
    metrics are left out when the batch has no example of it. ``batch`` is a
    :class:`llmbook.data.QACollator` batch: model inputs, ``labels``, ``answer_mask`` and
    ``unknown``, a bool tensor ``(B,)``. Chapter 5 passes it to :func:`llmbook.train.train`
    as the ``loss_fn``, so one run shows how fast each group is fitted.
    """
    if not isinstance(batch, Mapping) or "unknown" not in batch:
        raise ValueError("batch needs an 'unknown' entry: a bool tensor of shape (B,) (llmbook.data.QACollator)")
    if "labels" not in batch:
        raise TypeError("batch must be a dict with 'labels' and the model's inputs (llmbook.data.QACollator)")
    unknown = batch["unknown"]
    B = batch["labels"].shape[0]
    if not torch.is_tensor(unknown) or tuple(unknown.shape) != (B,):
        got = tuple(unknown.shape) if torch.is_tensor(unknown) else type(unknown).__name__
        raise ValueError(f"unknown must have shape ({B},), one flag per example, got {got}")
    if unknown.dtype != torch.bool:
        raise TypeError(f"unknown must be a bool tensor (True: the example is Unknown), got {unknown.dtype}")
    scores = answer_scores(model, batch)
    logps = scores["token_logps"]
    loss = -logps.mean()  # the value response_loss gives
    metrics = {}
    unknown = unknown.to(torch.bool)
    token_unknown = unknown[scores["example"]]
    for name, rows, tokens in (("known", ~unknown, ~token_unknown), ("unknown", unknown, token_unknown)):
        if rows.any():
            metrics[f"loss/{name}"] = float(-logps.detach()[tokens].mean())
            metrics[f"fitted/{name}"] = float(scores["correct"][rows].float().mean())
    return loss, metrics


def sft_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    r"""The SFT loss $-\frac{1}{k}\sum \log p(y_{t+1} \mid y_{\le t})$ over the $k$ response tokens.

    The labels are shifted inside: position $t$'s logits are scored against label
    $t + 1$. Positions labelled ``ignore_index`` (the prompt, the padding) carry no loss.
    The value equals the transformers models' loss ``model(ids, labels=labels).loss``.

    Args:
        logits: shape ``(B, T, V)`` (any leading dimensions), floating.
        labels: token ids, shape ``(B, T)``, integer, not shifted.
        ignore_index: the label of positions without loss.

    Returns:
        a ``float32`` scalar (``float64`` for ``float64`` logits).

    Raises:
        TypeError: non-floating logits or non-integer labels.
        ValueError: mismatched shapes, fewer than 2 positions, labels outside ``[0, V)``,
            or no response token at all.
    """
    check_float_tensor(logits, "logits")
    if logits.dim() < 2:
        raise ValueError(f"logits must have shape (..., T, V), got {tuple(logits.shape)}")
    if logits.numel() == 0:
        raise ValueError(f"logits are empty (shape {tuple(logits.shape)}): the batch holds no sequence to score")
    target, mask = _check_labels(labels, logits.shape[:-1], f"logits {tuple(logits.shape)}", ignore_index,
                                 logits.shape[-1])
    # Only the k response positions are scored: (k, V) logits against (k,) labels.
    return -selective_log_softmax(logits[..., :-1, :][mask], target[mask]).mean()


class _LinearCrossEntropy(torch.autograd.Function):
    r"""Mean cross-entropy of ``h @ weight.T`` against ``target``, one chunk of rows at a time.

    The gradient of the mean cross-entropy with respect to a row's logits has a closed
    form, $(\operatorname{softmax}(x) - \operatorname{onehot}(y)) / n$, so each chunk's
    gradients with respect to ``h`` and ``weight`` are computed right after its loss,
    while its logits exist; the chunk's logits are then dropped. Peak memory holds one
    chunk of logits instead of all ``n``, and no logits are recomputed in backward.
    """

    @staticmethod
    def forward(ctx, h, weight, target, chunk_size, need_h, need_w):
        n = h.shape[0]
        acc = _compute_dtype(h.dtype)  # float32, or float64 for float64 inputs
        total = torch.zeros((), dtype=torch.float64, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None                                  # (n, H)
        grad_w = torch.zeros(weight.shape, dtype=acc, device=h.device) if need_w else None  # (V, H)
        for start in range(0, n, chunk_size):
            h_c, y_c = h[start : start + chunk_size], target[start : start + chunk_size]  # (C, H), (C,)
            z = (h_c @ weight.T).to(acc)                   # (C, V): the only logits alive
            z_y = z.gather(1, y_c[:, None])                # (C, 1) the label's logit
            m = z.amax(dim=1, keepdim=True)
            z.sub_(m).exp_()                               # e^(x - m), in place
            s = z.sum(dim=1, keepdim=True)
            total += (m + s.log() - z_y).sum(dtype=torch.float64)  # sum of log sum exp(x) - x_y
            if need_h or need_w:
                z.div_(s)                                  # softmax
                z[torch.arange(len(y_c), device=z.device), y_c] -= 1.0
                z.mul_(1.0 / n)                            # dL/dx for the mean over n tokens
                g = z.to(weight.dtype)
                if need_h:
                    grad_h[start : start + chunk_size] = g @ weight
                if need_w:
                    grad_w.addmm_(z.T, h_c.to(acc))
                del g
            del z  # free this chunk's logits before the next chunk allocates its own
        ctx.grads = (grad_h, None if grad_w is None else grad_w.to(weight.dtype))
        return (total / n).to(acc)

    @staticmethod
    def backward(ctx, grad_loss):
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError(
                "chunked_sft_loss computes its gradients during the forward pass and hands them out once: "
                "call backward through it only once (retain_graph=True is not supported)"
            )
        grad_h, grad_w = grads
        grad_h = None if grad_h is None else grad_h.mul_(grad_loss.to(grad_h.dtype))
        grad_w = None if grad_w is None else grad_w.mul_(grad_loss.to(grad_w.dtype))
        return grad_h, grad_w, None, None, None, None


def chunked_sft_loss(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = 256,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    r""":func:`sft_loss` of ``hidden @ lm_head_weight.T``, without the full ``[tokens x V]`` logits.

    Only the response positions are scored, ``chunk_size`` rows at a time: each chunk's
    logits, loss and gradients are computed and the logits dropped before the next
    chunk. The value and the gradients (with respect to ``hidden`` and
    ``lm_head_weight``) equal those of ``sft_loss(hidden @ lm_head_weight.T, labels)``,
    while the extra memory is one ``[chunk_size x V]`` block plus one gradient of the
    weight, instead of several ``[tokens x V]`` tensors (logits, log-softmax, their
    gradient). Backward may run once through the result (no ``retain_graph``).

    Args:
        hidden: the final hidden states (after the last norm), shape ``(B, T, H)``, floating.
        lm_head_weight: the LM head's weight, shape ``(V, H)`` (tied to the input
            embedding in many models), same dtype as ``hidden``.
        labels: token ids, shape ``(B, T)``, not shifted; ``ignore_index`` marks no loss.
        chunk_size: rows of logits computed at once (larger is faster, up to a point,
            and uses more memory).
        ignore_index: the label of positions without loss.

    Returns:
        a ``float32`` scalar (``float64`` for ``float64`` inputs).
    """
    check_float_tensor(hidden, "hidden")
    check_float_tensor(lm_head_weight, "lm_head_weight")
    chunk_size = check_int(chunk_size, "chunk_size", minimum=1)
    if lm_head_weight.dim() != 2:
        raise ValueError(f"lm_head_weight must have shape (V, H), got {tuple(lm_head_weight.shape)}")
    if hidden.dim() < 2 or hidden.shape[-1] != lm_head_weight.shape[1]:
        raise ValueError(
            f"hidden must have shape (..., T, H) with H = {lm_head_weight.shape[1]} (lm_head_weight's columns), "
            f"got {tuple(hidden.shape)}"
        )
    if hidden.dtype != lm_head_weight.dtype:
        raise TypeError(f"hidden ({hidden.dtype}) and lm_head_weight ({lm_head_weight.dtype}) must share one dtype")
    if hidden.device != lm_head_weight.device:
        raise ValueError(f"hidden ({hidden.device}) and lm_head_weight ({lm_head_weight.device}) must share one device")
    target, mask = _check_labels(labels, hidden.shape[:-1], f"hidden {tuple(hidden.shape)}", ignore_index,
                                 lm_head_weight.shape[0])
    h = hidden[..., :-1, :][mask]                                  # (k, H) response positions only
    grad = torch.is_grad_enabled()
    return _LinearCrossEntropy.apply(h, lm_head_weight, target[mask], chunk_size,
                                     grad and h.requires_grad, grad and lm_head_weight.requires_grad)
