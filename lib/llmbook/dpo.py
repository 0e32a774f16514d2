r"""DPO: direct preference optimisation (Rafailov et al., 2023, arXiv 2305.18290).

Given a prompt :math:`x`, a preferred answer :math:`y_w` and a dispreferred one
:math:`y_l`, DPO trains the policy :math:`\pi_\theta` directly on the pair, with no
reward model and no sampling:

.. math::
    r_\theta(x, y) = \beta \log \frac{\pi_\theta(y \mid x)}{\pi_{\mathrm{ref}}(y \mid x)},
    \qquad
    \mathcal{L}_{\mathrm{DPO}} = -\log \sigma\big(r_\theta(x, y_w) - r_\theta(x, y_l)\big)

:math:`r_\theta` is the *implicit reward*: how much more likely the policy makes an
answer than the frozen reference :math:`\pi_{\mathrm{ref}}` (the starting model) did,
scaled by :math:`\beta`. :math:`\log \pi(y \mid x)` is a *sum* over the answer's tokens
(the prompt is masked), exactly as TRL computes it.

The flow (chapter 7 draws it from real tensors):

1. concatenate ``[x + y_w; x + y_l]`` along the batch: one ``(2B, T)`` forward;
2. gather each answer token's log-probability from the logits (prompt masked), sum;
3. split into chosen and rejected, subtract the reference's, scale by :math:`\beta`;
4. loss :math:`-\log\sigma(r_w - r_l)`.

Its gradient is
:math:`-\beta\,\sigma(r_l - r_w)\,[\nabla\log\pi_\theta(y_w) - \nabla\log\pi_\theta(y_l)]`:
the *dynamic coefficient* :math:`\sigma(r_l - r_w)` is large on pairs the implicit reward
still orders wrongly and small on pairs it already gets right.

Names follow TRL (``chosen_logps``, ``ref_chosen_logps``, ``rewards/margins``, ...), so
the tests compare ours with TRL's ``DPOTrainer`` number for number. Chapter 7 explains
every piece.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F

from ._checks import check_float_tensor, check_int, check_int_tensor, check_real, check_tensor
from .data import IGNORE_INDEX

__all__ = [
    "compute_loss",
    "concatenated_forward",
    "concatenated_inputs",
    "dpo_loss",
    "logits_to_keep",
    "per_token_logps",
    "reference_logps",
    "reward_metrics",
    "sequence_logps",
    "with_reference_logps",
]

_SIDES = ("chosen", "rejected")


def per_token_logps(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Log-probability of each next token, and which of them count (the "gather" step).

    Position :math:`t` of ``logits`` predicts token :math:`t+1`, so the labels are
    shifted by one inside: :math:`\log p_t = z_{t, y_{t+1}} - \log\sum_v e^{z_{t,v}}`.

    Args:
        logits: ``(B, T, V)`` model outputs.
        labels: ``(B, T)`` token ids, ``ignore_index`` where no loss is taken (prompt, padding).
        ignore_index: the label value that marks a position to skip.

    Returns:
        ``(logps, mask)``, both ``(B, T-1)``: the log-probabilities (0 where masked) and
        a boolean mask of the response tokens.
    """
    check_tensor(logits, "logits")
    check_tensor(labels, "labels")
    ignore_index = check_int(ignore_index, "ignore_index")
    if logits.dim() != 3 or not logits.is_floating_point():
        raise ValueError(f"logits must be a floating (B, T, V) tensor, got shape {tuple(logits.shape)}, {logits.dtype}")
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels must have shape (B, T) = {tuple(logits.shape[:2])}, got {tuple(labels.shape)}")
    if labels.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool):
        raise TypeError(f"labels must be integer token ids, got {labels.dtype}")
    if logits.shape[1] < 2:
        raise ValueError(f"need at least 2 positions to predict a next token, got T = {logits.shape[1]}")
    logits = logits[:, :-1].float()  # (B, T-1, V): position t predicts token t+1
    labels = labels[:, 1:]  # (B, T-1)
    mask = labels != ignore_index
    valid = labels[mask]
    if valid.numel() and (valid.min() < 0 or valid.max() >= logits.shape[-1]):
        raise ValueError(f"labels must be ignore_index ({ignore_index}) or token ids in [0, {logits.shape[-1]})")
    index = labels.masked_fill(~mask, 0).unsqueeze(-1)  # (B, T-1, 1); masked slots gather a dummy id
    # x_y - logsumexp(x): the log-softmax of the one token we need, never the full (B, T-1, V) log-softmax.
    logps = logits.gather(-1, index).squeeze(-1) - torch.logsumexp(logits, dim=-1)  # (B, T-1)
    return logps.masked_fill(~mask, 0.0), mask


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    r"""Sum of the response tokens' log-probabilities: :math:`\log\pi(y \mid x)` per sequence.

    .. math::  \log \pi(y \mid x) = \sum_{t:\ \mathrm{label}_{t+1} \ne -100} \log p_\theta(\mathrm{label}_{t+1} \mid \mathrm{tokens}_{\le t})

    Labels are shifted inside (the model's convention): give the same ``(B, T)``
    labels the model's own loss takes. A sum, not a mean, as in the DPO paper and TRL.

    Args:
        logits: ``(B, T, V)``.
        labels: ``(B, T)``, ``ignore_index`` on the prompt and padding.
        ignore_index: the label value to skip.

    Returns:
        ``(B,)`` float32 log-probabilities.

    Raises:
        ValueError: a row has no response token (nothing to score), or shapes disagree.
    """
    logps, mask = per_token_logps(logits, labels, ignore_index)
    empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"labels rows {empty} have no response token: after the shift every label is "
            f"ignore_index ({ignore_index}); each sequence needs at least one token to score"
        )
    return logps.sum(dim=1)


def _check_batch(batch: Mapping) -> None:
    if not isinstance(batch, Mapping):
        raise TypeError(f"batch must be a dict as PreferenceCollator makes, got {type(batch).__name__}")
    keys = [f"{side}_{name}" for side in _SIDES for name in ("input_ids", "attention_mask", "labels")]
    missing = [k for k in keys if k not in batch]
    if missing:
        raise ValueError(f"batch is missing {missing}; build it with llmbook.data.PreferenceCollator")
    for key in keys:
        check_tensor(batch[key], key)
    for side in _SIDES:
        shapes = {batch[f"{side}_{name}"].shape for name in ("input_ids", "attention_mask", "labels")}
        if len(shapes) != 1 or batch[f"{side}_input_ids"].dim() != 2:
            raise ValueError(f"{side}_input_ids, _attention_mask and _labels must share one (B, T) shape, got {shapes}")
    n_chosen, n_rejected = batch["chosen_input_ids"].shape[0], batch["rejected_input_ids"].shape[0]
    if n_chosen != n_rejected:
        raise ValueError(
            f"mismatched batch sizes: {n_chosen} chosen and {n_rejected} rejected sequences; DPO needs pairs"
        )
    if n_chosen == 0:
        raise ValueError("batch holds no pairs (chosen_input_ids has 0 rows): pass at least one preference pair")


def concatenated_inputs(batch: Mapping[str, torch.Tensor], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Stack chosen over rejected: ``input_ids``, ``attention_mask``, ``labels`` of shape ``(2B, T)``.

    Rows ``0..B-1`` are the chosen sequences, rows ``B..2B-1`` the rejected ones (TRL's
    order). If the two sides were padded to different lengths, the shorter is right-padded.
    """
    _check_batch(batch)
    pad_token_id = check_int(pad_token_id, "pad_token_id")
    length = max(batch[f"{side}_input_ids"].shape[1] for side in _SIDES)
    fill = {"input_ids": pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    out = {}
    for name, value in fill.items():
        parts = [batch[f"{side}_{name}"] for side in _SIDES]
        parts = [F.pad(p, (0, length - p.shape[1]), value=value) for p in parts]
        out[name] = torch.cat(parts, dim=0)  # (2B, T)
    return out


def logits_to_keep(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> int:
    """How many last positions of ``(B, T)`` labels need logits: from just before the earliest answer token on.

    Position ``t`` predicts token ``t + 1``, so the earliest labelled token ``f`` (over
    the whole batch) needs the logits of position ``f - 1`` and everything after it.
    """
    check_int_tensor(labels, "labels")
    ignore_index = check_int(ignore_index, "ignore_index")
    if labels.dim() != 2 or labels.shape[0] == 0:
        raise ValueError(f"labels must have shape (B, T) with B >= 1, got {tuple(labels.shape)}")
    has_label = labels != ignore_index
    if not has_label.any():
        raise ValueError("labels has no response token at all")
    first = int(has_label.float().argmax(dim=1)[has_label.any(dim=1)].min())
    return labels.shape[1] - max(first - 1, 0)


def _accepts(model: torch.nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def concatenated_forward(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    r"""One forward over ``[chosen; rejected]``; returns ``(chosen_logps, rejected_logps)``, each ``(B,)``.

    The two halves go through the model together (one ``(2B, T)`` batch), then
    :func:`sequence_logps` gathers and sums each answer's token log-probabilities.
    Only the positions from the earliest answer token on are projected to the
    vocabulary (``logits_to_keep``): the prompt's logits would be masked anyway, and
    the ``(tokens, V)`` logits are the largest tensor of the step.

    Args:
        model: a causal LM returning ``.logits`` (a transformers model, with or without LoRA).
        batch: as made by :class:`llmbook.data.PreferenceCollator` (``chosen_input_ids``,
            ``chosen_attention_mask``, ``chosen_labels`` and the same for ``rejected``).
    """
    inputs = concatenated_inputs(batch)
    labels = inputs.pop("labels")  # (2B, T)
    T = labels.shape[1]
    empty = (labels[:, 1:] == IGNORE_INDEX).all(dim=1).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"rows {empty} of [chosen; rejected] have no response token (all labels are -100)")
    keep = logits_to_keep(labels)
    kwargs = {"use_cache": False}
    if _accepts(model, "logits_to_keep") and keep < T:
        kwargs["logits_to_keep"] = keep
    else:
        keep = T
    logits = model(**inputs, **kwargs).logits  # (2B, keep, V)
    logps = sequence_logps(logits, labels[:, T - keep:])  # (2B,)
    return logps.chunk(2, dim=0)


def _check_beta(beta) -> float:
    return check_real(beta, "beta", low=0.0, low_open=True)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""The DPO loss of each pair, and the implicit rewards.

    .. math::
        r_w = \beta\,(\log\pi_\theta(y_w) - \log\pi_{\mathrm{ref}}(y_w)),\quad
        r_l = \beta\,(\log\pi_\theta(y_l) - \log\pi_{\mathrm{ref}}(y_l)),\quad
        \ell = -\log\sigma(r_w - r_l)

    Args:
        policy_chosen_logps, policy_rejected_logps: ``(B,)`` summed log-probabilities
            under the policy (with gradient).
        ref_chosen_logps, ref_rejected_logps: ``(B,)`` the same under the frozen reference.
        beta: :math:`\beta > 0`, the scale of the implicit reward (how strongly the
            policy is tied to the reference).

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each ``(B,)``; the rewards are
        detached (they are for logging, as in TRL). Average ``losses`` for the step.
        ``float32`` for half-precision inputs (``float64`` for ``float64``).
    """
    beta = _check_beta(beta)
    named = {
        "policy_chosen_logps": policy_chosen_logps,
        "policy_rejected_logps": policy_rejected_logps,
        "ref_chosen_logps": ref_chosen_logps,
        "ref_rejected_logps": ref_rejected_logps,
    }
    for name, value in named.items():
        check_float_tensor(value, name)
        if value.dim() != 1:
            raise ValueError(f"{name} must have shape (B,), one log-probability per pair, got {tuple(value.shape)}")
    shapes = {name: value.shape[0] for name, value in named.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"mismatched batch sizes: {shapes}; every input needs one entry per pair")
    if not shapes["policy_chosen_logps"]:
        raise ValueError("policy_chosen_logps and the others are empty (B = 0): a DPO step needs at least one pair")
    for name, value in named.items():
        if not torch.isfinite(value).all():
            raise ValueError(f"{name} has non-finite values ({value.tolist()}); a log-probability must be finite")
    # Half-precision log-probabilities are computed in float32, as llmbook.losses does: a bf16
    # difference of two sums of hundreds of log-probs keeps 2 to 3 digits.
    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps = (
        v.float() if v.dtype in (torch.float16, torch.bfloat16) else v for v in named.values()
    )
    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # log pi/pi_ref of y_w
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    chosen_rewards = beta * chosen_logratios
    rejected_rewards = beta * rejected_logratios
    # -log sigma(z) via logsigmoid: exact for large |z|, where log(sigmoid(z)) would underflow to -inf.
    # 0 - x rather than -x: a loss that rounds to 0 (margin >= ~100) is +0.0, not -0.0.
    losses = 0.0 - F.logsigmoid(chosen_rewards - rejected_rewards)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, float]:
    """The four numbers TRL logs at each step, under TRL's names.

    ``rewards/chosen`` and ``rewards/rejected`` are batch means of the implicit rewards,
    ``rewards/margins`` the mean of ``chosen - rejected``, ``rewards/accuracies`` the
    fraction of pairs with ``chosen > rejected`` (strictly: a tie counts as wrong).
    """
    for name, value in (("chosen_rewards", chosen_rewards), ("rejected_rewards", rejected_rewards)):
        check_float_tensor(value, name)
        if value.dim() != 1 or value.shape[0] == 0:
            raise ValueError(f"{name} must have shape (B,) with B >= 1, one reward per pair, got {tuple(value.shape)}")
    if chosen_rewards.shape != rejected_rewards.shape:
        raise ValueError(f"mismatched batch sizes: chosen_rewards {tuple(chosen_rewards.shape)}, "
                         f"rejected_rewards {tuple(rejected_rewards.shape)}")
    chosen_rewards, rejected_rewards = chosen_rewards.detach().float(), rejected_rewards.detach().float()
    return {
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
    }


@torch.no_grad()
def reference_logps(
    model: torch.nn.Module, batch: Mapping[str, torch.Tensor], ref_model: torch.nn.Module | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ref_chosen_logps, ref_rejected_logps)`` under the frozen reference, without gradient.

    The reference is ``ref_model`` if given, else ``model`` with its LoRA adapters
    switched off (:func:`llmbook.lora.disable_lora`): the same weights the policy
    started from, so no second copy of the model is needed.
    """
    from .lora import disable_lora, lora_layers

    if ref_model is not None:
        return concatenated_forward(ref_model, batch)
    if not lora_layers(model):
        raise ValueError("model has no LoRA layers, so it cannot serve as its own reference: pass ref_model")
    with disable_lora(model):
        return concatenated_forward(model, batch)


def with_reference_logps(
    model: torch.nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], ref_model: torch.nn.Module | None = None
) -> list[dict[str, torch.Tensor]]:
    """Copies of ``batches`` with ``ref_chosen_logps`` and ``ref_rejected_logps`` added.

    The reference never changes, so computing its log-probabilities once, before
    training, saves one forward per step (TRL's ``precompute_ref_log_probs``).
    """
    was_training = model.training
    model.eval()
    try:
        out = []
        for batch in batches:
            ref_chosen, ref_rejected = reference_logps(model, batch, ref_model)
            out.append({**batch, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected})
        return out
    finally:
        model.train(was_training)


def compute_loss(
    model: torch.nn.Module,
    batch: Mapping[str, torch.Tensor],
    beta: float = 0.1,
    ref_model: torch.nn.Module | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """One DPO step's loss and TRL's four reward metrics: a ``loss_fn`` for :func:`llmbook.train.train`.

    Reference log-probabilities come from the batch when present (see
    :func:`with_reference_logps`), else from :func:`reference_logps`.
    Use as ``train(model, batches, functools.partial(compute_loss, beta=0.1), ...)``.
    """
    _check_beta(beta)
    if "ref_chosen_logps" in batch and "ref_rejected_logps" in batch:
        ref_chosen, ref_rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
    else:
        ref_chosen, ref_rejected = reference_logps(model, batch, ref_model)
    chosen_logps, rejected_logps = concatenated_forward(model, batch)
    losses, chosen_rewards, rejected_rewards = dpo_loss(chosen_logps, rejected_logps, ref_chosen, ref_rejected, beta)
    return losses.mean(), reward_metrics(chosen_rewards, rejected_rewards)
