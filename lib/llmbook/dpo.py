r"""DPO: direct preference optimisation (Rafailov et al., 2023, arXiv 2305.18290).

Given a prompt $x$, a preferred answer $y_w$ and a dispreferred one
$y_l$, DPO trains the policy $\pi_\theta$ directly on the pair, with no
reward model and no sampling:

$$r_\theta(x, y) = \beta \log \frac{\pi_\theta(y \mid x)}{\pi_{\mathrm{ref}}(y \mid x)}, \qquad \mathcal{L}_{\mathrm{DPO}} = -\log \sigma\big(r_\theta(x, y_w) - r_\theta(x, y_l)\big)$$

$r_\theta$ is the *implicit reward*: how much more likely the policy makes an
answer than the frozen reference $\pi_{\mathrm{ref}}$ (the starting model) did,
scaled by $\beta$. $\log \pi(y \mid x)$ is a *sum* over the answer's tokens
(the prompt is masked), exactly as TRL computes it.

The flow (chapter 7 draws it from real tensors):

1. concatenate ``[x + y_w; x + y_l]`` along the batch: one ``(2B, T)`` forward;
2. gather each answer token's log-probability from the logits (prompt masked), sum;
3. split into chosen and rejected, subtract the reference's, scale by $\beta$;
4. loss $-\log\sigma(r_w - r_l)$.

Its gradient is
$-\beta\,\sigma(r_l - r_w)\,[\nabla\log\pi_\theta(y_w) - \nabla\log\pi_\theta(y_l)]$:
the *dynamic coefficient* $\sigma(r_l - r_w)$ is large on pairs the implicit reward
still orders wrongly and small on pairs it already gets right.

Names follow TRL (``chosen_logps``, ``ref_chosen_logps``, ``rewards/margins``, ...), so
the tests compare ours with TRL's ``DPOTrainer`` number for number. Chapter 7 explains
every piece.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F

from llmbook import losses
from llmbook._checks import check_bool, check_float_tensor, check_int, check_int_tensor, check_real, check_tensor
from llmbook.data import IGNORE_INDEX
from llmbook.lora import disable_lora, lora_layers
from llmbook.models import _decoder_layers, top_layer_inputs
from llmbook.utils import eval_mode

__all__ = [
    "REFUSAL_MARKERS",
    "compute_loss",
    "concatenated_forward",
    "concatenated_inputs",
    "dpo_loss",
    "is_refusal",
    "preference_eval",
    "reference_logps",
    "reward_metrics",
    "sequence_logps",
    "token_logratios",
    "top_layer_batch",
    "with_reference_logps",
]

_SIDES = ("chosen", "rejected")

# How assistants open a refusal ("I can't help with that", "I'm sorry, but I cannot ...").
REFUSAL_MARKERS = (
    "i can't", "i cannot", "i can not", "i won't", "i will not", "i'm sorry", "i am sorry", "sorry,", "sorry.",
    "sorry!",
    "i'm not able to", "i am not able to", "i'm unable", "i am unable", "as an ai",
)
_FIRST_SENTENCE = re.compile(r"^.*?(?:[.!?](?=\s|$)|$)", re.DOTALL)


def is_refusal(text: str) -> bool:
    """Whether an answer refuses: its first sentence holds one of :data:`REFUSAL_MARKERS`.

    Chapter 7 counts refusals with it: on requests an assistant should decline (a
    refusal is wanted) and on ordinary ones (a refusal is over-refusal). Only the
    first sentence counts, so "You can't ..." or a later "I'm sorry to hear" inside a
    helpful answer is not a refusal. Curly apostrophes count as straight ones.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    first = _FIRST_SENTENCE.match(text.strip().replace("\u2019", "'")).group(0).lower()
    return any(marker in first for marker in REFUSAL_MARKERS)


def _check_every_row_has_answer(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> None:
    """Each row of ``(B, T)`` labels must score at least one token (after the shift)."""
    empty = (labels[..., 1:] == ignore_index).all(dim=-1).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"labels rows {empty} have no response token: after the shift every label is "
            f"ignore_index ({ignore_index}); each sequence needs at least one token to score"
        )


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    r"""Sum of the response tokens' log-probabilities: $\log\pi(y \mid x)$ per sequence.

    $$\log \pi(y \mid x) = \sum_{t:\ \mathrm{label}_{t+1} \ne -100} \log p_\theta(\mathrm{label}_{t+1} \mid \mathrm{tokens}_{\le t})$$

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
    check_float_tensor(logits, "logits")
    check_int_tensor(labels, "labels")
    ignore_index = check_int(ignore_index, "ignore_index")
    if logits.dim() != 3:
        raise ValueError(f"logits must be a floating (B, T, V) tensor, got shape {tuple(logits.shape)}")
    _check_every_row_has_answer(labels, ignore_index)
    logps, _ = losses.per_token_logps(logits, labels, ignore_index)
    return logps.sum(dim=1)


def _input_name(batch: Mapping) -> str:
    """``"input_ids"``, or ``"inputs_embeds"`` for a batch of hidden states (:func:`top_layer_batch`)."""
    return "inputs_embeds" if "chosen_inputs_embeds" in batch and "chosen_input_ids" not in batch else "input_ids"


def _check_batch(batch: Mapping) -> None:
    if not isinstance(batch, Mapping):
        raise TypeError(f"batch must be a dict as PreferenceCollator makes, got {type(batch).__name__}")
    names = (_input_name(batch), "attention_mask", "labels")
    keys = [f"{side}_{name}" for side in _SIDES for name in names]
    missing = [k for k in keys if k not in batch]
    if missing:
        raise ValueError(f"batch is missing {missing}; build it with llmbook.data.PreferenceCollator")
    for key in keys:
        check_tensor(batch[key], key)
    for side in _SIDES:
        shapes = {tuple(batch[f"{side}_{name}"].shape[:2]) for name in names}
        if len(shapes) != 1 or batch[f"{side}_attention_mask"].dim() != 2:
            raise ValueError(f"{side}_{names[0]}, _attention_mask and _labels must share one (B, T) shape, "
                             f"got {shapes}")
    if names[0] == "input_ids":  # labels are the tokens themselves (not shifted), or -100
        for side in _SIDES:
            labels, ids = batch[f"{side}_labels"], batch[f"{side}_input_ids"]
            wrong = ((labels != -100) & (labels != ids)).any(dim=1).nonzero().flatten().tolist()
            if wrong:
                raise ValueError(f"{side}_labels rows {wrong} disagree with {side}_input_ids: a label must be the "
                                 "token at its position (not shifted) or -100")
    n_chosen, n_rejected = batch["chosen_labels"].shape[0], batch["rejected_labels"].shape[0]
    if n_chosen != n_rejected:
        raise ValueError(
            f"mismatched batch sizes: {n_chosen} chosen and {n_rejected} rejected sequences; DPO needs pairs"
        )
    if n_chosen == 0:
        raise ValueError("batch holds no pairs (chosen_input_ids has 0 rows): pass at least one preference pair")


def concatenated_inputs(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stack chosen over rejected: ``input_ids``, ``attention_mask``, ``labels`` of shape ``(2B, T)``.

    Rows ``0..B-1`` are the chosen sequences, rows ``B..2B-1`` the rejected ones (TRL's
    order). :class:`llmbook.data.PreferenceCollator` pads both sides to one length ``T``.
    A batch from :func:`top_layer_batch` gives ``inputs_embeds`` ``(2B, T, H)`` in place of
    ``input_ids``.
    """
    _check_batch(batch)
    first = _input_name(batch)
    lengths = {side: batch[f"{side}_labels"].shape[1] for side in _SIDES}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"chosen and rejected must be padded to one length to be stacked, got {lengths}; "
                         "build the batch with llmbook.data.PreferenceCollator")
    return {name: torch.cat([batch[f"{side}_{name}"] for side in _SIDES], dim=0)  # (2B, T)
            for name in (first, "attention_mask", "labels")}


@torch.no_grad()
def top_layer_batch(model: torch.nn.Module, batch: Mapping[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """``batch`` for :func:`llmbook.models.top_layers` ``(model, k)``: hidden states in place of token ids.

    Each side's ``input_ids`` become ``inputs_embeds``, the hidden states entering layer
    ``L - k`` (:func:`llmbook.models.top_layer_inputs`); every other entry (masks, labels,
    reference log-probabilities) is kept. When only the top ``k`` layers train, the layers
    below give the same output at every step: it is computed once, here. LoRA adapters
    must sit in the top ``k`` layers only (a ValueError says so otherwise), so that the
    copy, with its adapters off, is still the reference.
    """
    _check_batch(batch)
    if any(key.endswith("_inputs_embeds") for key in batch):
        raise ValueError("batch already holds inputs_embeds; pass the collator's batch of input_ids")
    layers, k = _decoder_layers(model, k)
    if any(lora_layers(layer) for layer in layers[: len(layers) - k]):
        raise ValueError(f"model has LoRA adapters below its top {k} layers: the cached hidden states would "
                         "carry them, and a top-layers copy could not switch them off for the reference; "
                         "put the adapters on the top k layers only")
    out = {key: value for key, value in batch.items() if not key.endswith("_input_ids")}
    for side in _SIDES:
        ids = {"input_ids": batch[f"{side}_input_ids"], "attention_mask": batch[f"{side}_attention_mask"]}
        out[f"{side}_inputs_embeds"] = top_layer_inputs(model, ids, k)["inputs_embeds"]
    return out


def concatenated_forward(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    r"""One forward over ``[chosen; rejected]``; returns ``(chosen_logps, rejected_logps)``, each ``(B,)``.

    The two halves go through the model together (one ``(2B, T)`` batch); each answer
    token's log-probability is gathered and summed per row, as :func:`sequence_logps` does
    from full logits. Only the answer tokens' positions are projected to the vocabulary
    (:func:`llmbook.losses.labelled_logits`): the prompt's and the padding's logits would be
    masked anyway, and the ``(tokens, V)`` logits are the largest tensor of the step.

    Args:
        model: a causal LM returning ``.logits`` (a transformers model, with or without LoRA).
        batch: as made by :class:`llmbook.data.PreferenceCollator` (``chosen_input_ids``,
            ``chosen_attention_mask``, ``chosen_labels`` and the same for ``rejected``).
    """
    inputs = concatenated_inputs(batch)
    _check_every_row_has_answer(inputs["labels"])
    logits, scored = losses.labelled_logits(model, inputs)  # (N, V) at the N answer tokens
    token_logps = losses.selective_log_softmax(logits, inputs["labels"][:, 1:][scored])  # (N,)
    logps = _row_sums(token_logps, scored.nonzero()[:, 0], scored.shape[0])  # (2B,)
    return logps.chunk(2, dim=0)


def _row_sums(token_logps: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """``(n_rows,)``: each row's sum of the ``(N,)`` token log-probabilities, ``rows`` naming each one's row."""
    return token_logps.new_zeros(n_rows).index_add(0, rows, token_logps)


def _answer_distributions(model: torch.nn.Module, inputs: Mapping[str, torch.Tensor]):
    """Float32 log-distributions ``(N, V)`` at the answer tokens of a stacked batch, their targets ``(N,)``
    and rows ``(N,)``."""
    logits, scored = losses.labelled_logits(model, inputs)
    return losses.log_softmax(logits.float()), inputs["labels"][:, 1:][scored], scored.nonzero()[:, 0]


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""The DPO loss of each pair, and the implicit rewards.

    $$r_w = \beta\,(\log\pi_\theta(y_w) - \log\pi_{\mathrm{ref}}(y_w)),\quad r_l = \beta\,(\log\pi_\theta(y_l) - \log\pi_{\mathrm{ref}}(y_l)),\quad \ell = -\log\sigma(r_w - r_l)$$

    Args:
        policy_chosen_logps, policy_rejected_logps: ``(B,)`` summed log-probabilities
            under the policy (with gradient).
        ref_chosen_logps, ref_rejected_logps: ``(B,)`` the same under the frozen reference.
        beta: $\beta > 0$, the scale of the implicit reward (how strongly the
            policy is tied to the reference).

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each ``(B,)``; the rewards are
        detached (they are for logging, as in TRL). Average ``losses`` for the step.
        ``float32`` for half-precision inputs (``float64`` for ``float64``).
    """
    beta = check_real(beta, "beta", low=0.0, low_open=True)
    return _dpo_loss(beta, *_check_logps(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                         ref_rejected_logps))


def _dpo_loss(beta, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps):
    """:func:`dpo_loss` on checked inputs."""
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)  # r_w = beta log pi/pi_ref of y_w
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps)
    # -log sigma(z) via logsigmoid: exact for large |z|, where log(sigmoid(z)) would underflow to -inf.
    # 0 - x rather than -x: a loss that rounds to 0 (margin >= ~100) is +0.0, not -0.0.
    losses = 0.0 - F.logsigmoid(chosen_rewards - rejected_rewards)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def _check_logps(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps):
    """The four ``(B,)`` log-probability tensors, checked, half precision raised to float32."""
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
        if (value > 0).any():
            raise ValueError(f"{name} has positive values (largest {value.max().item():.4g}); the log-probability "
                             "of an answer is at most 0: pass log-probabilities, not probabilities or losses")
    # Half-precision log-probabilities are computed in float32, as llmbook.losses does: a bf16
    # difference of two sums of hundreds of log-probs keeps 2 to 3 digits.
    return tuple(v.float() if v.dtype in (torch.float16, torch.bfloat16) else v for v in named.values())


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
    with _reference(model, ref_model) as reference:
        return concatenated_forward(reference, batch)


@contextlib.contextmanager
def _reference(model: torch.nn.Module, ref_model: torch.nn.Module | None):
    """The module that computes the reference: ``ref_model``, else ``model`` with its LoRA adapters off."""
    if ref_model is not None:
        yield ref_model
        return
    if not lora_layers(model):
        raise ValueError("model has no LoRA layers, so it cannot serve as its own reference: pass ref_model")
    with disable_lora(model):
        yield model


@torch.no_grad()
def token_logratios(
    model: torch.nn.Module, batch: Mapping[str, torch.Tensor], ref_model: torch.nn.Module | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Each answer token's $\log \pi_\theta(y_t \mid x, y_{<t}) - \log \pi_{\mathrm{ref}}(y_t \mid x, y_{<t})$.

    Rows are ``[chosen; rejected]`` as in :func:`concatenated_inputs`; summed over a row's
    tokens, the log-ratios give its implicit reward divided by $\beta$. Where the reward
    comes from, token by token, is what chapter 7 looks at with it.

    Returns:
        ``(logratios, mask)``, both ``(2B, K - 1)``: the columns of the labels' last ``K - 1``
        positions (:func:`llmbook.losses.answer_logps`), 0 and ``False`` off the answers.
    """
    inputs = concatenated_inputs(batch)
    _check_every_row_has_answer(inputs["labels"])
    with eval_mode(model):
        policy, mask = losses.answer_logps(model, inputs)
        with _reference(model, ref_model) as reference:
            ref, _ = losses.answer_logps(reference, inputs)
    return policy - ref, mask


@torch.no_grad()
def preference_eval(
    model: torch.nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], *, stop_token_id: int | None = None
) -> dict:
    r"""How far the policy has moved from the reference on held-out pairs, and which way.

    For every pair: the log-ratios $\log\pi_\theta(y) - \log\pi_{\mathrm{ref}}(y)$ of both
    answers (the implicit rewards over $\beta$) and both answers' summed log-probabilities
    under the policy and under the reference. Over all answer tokens: the mean per-token
    $\mathrm{KL}(\pi_\theta \,\|\, \pi_{\mathrm{ref}})$ of the next-token distributions, and
    for every answer the sum of those KLs over its tokens: on answers sampled from the
    policy, the mean of that sum estimates the KL of whole answers,
    $\mathrm{KL}(\pi_\theta(\cdot \mid x) \,\|\, \pi_{\mathrm{ref}}(\cdot \mid x))$.
    The reference is ``model`` with its LoRA adapters off, or, when a batch carries
    ``ref_token_logprobs`` (:func:`with_reference_logps` with ``distributions=True``), those:
    then only the policy runs. Batches may hold ``input_ids`` or, for a
    :func:`llmbook.models.top_layers` copy, ``inputs_embeds`` (:func:`top_layer_batch`).

    Args:
        stop_token_id: if given, also ``p_stop`` and ``p_stop_ref``: the probability, under
            the policy and the reference, of each chosen answer's first ``stop_token_id``
            (for chapter 7's pairs, the end of turn right after the one sentence).

    Returns:
        a dict of ``(pairs,)`` tensors ``chosen_logratio``, ``rejected_logratio``,
        ``chosen_logps``, ``rejected_logps``, ``ref_chosen_logps``, ``ref_rejected_logps``,
        ``chosen_kl``, ``rejected_kl`` (the KL summed over each answer's tokens)
        (and ``p_stop``, ``p_stop_ref``), and floats ``kl`` (per token) and ``accuracy``
        (the share of pairs whose chosen log-ratio is the larger).
    """
    if stop_token_id is not None:
        stop_token_id = check_int(stop_token_id, "stop_token_id", minimum=0)
    if isinstance(batches, (str, bytes, Mapping)) or not isinstance(batches, Iterable):
        raise TypeError(f"batches must be a list of preference batches (dicts), got {type(batches).__name__}"
                        + (": wrap one batch as [batch]" if isinstance(batches, Mapping) else ""))
    out: dict[str, list] = {key: [] for key in ("policy", "ref", "p_stop", "p_stop_ref", "kl_sums")}
    kl_total, n_tokens = 0.0, 0
    with eval_mode(model):
        for batch in batches:
            inputs = concatenated_inputs(batch)
            _check_every_row_has_answer(inputs["labels"])
            dist, target, rows = _answer_distributions(model, inputs)  # (N, V), (N,), (N,)
            if "ref_token_logprobs" in batch:
                ref_dist = check_float_tensor(batch["ref_token_logprobs"], "ref_token_logprobs")
                if ref_dist.shape != dist.shape:
                    raise ValueError(
                        f"ref_token_logprobs has shape {tuple(ref_dist.shape)}, but this batch has "
                        f"{dist.shape[0]} answer tokens over a vocabulary of {dist.shape[1]}: make it with "
                        "with_reference_logps(..., distributions=True) from this batch")
            else:
                with _reference(model, None) as reference:
                    ref_dist, _, _ = _answer_distributions(reference, inputs)
            token_kl = (dist.exp() * (dist - ref_dist)).sum(-1)  # (N,)
            kl_total += token_kl.sum().item()
            n_tokens += dist.shape[0]
            n_rows = inputs["labels"].shape[0]
            out["kl_sums"].append(_row_sums(token_kl, rows, n_rows))
            token_logps = {"policy": dist.gather(1, target[:, None])[:, 0],
                           "ref": ref_dist.gather(1, target[:, None])[:, 0]}
            for key, logps in token_logps.items():
                out[key].append(_row_sums(logps, rows, n_rows))
            if stop_token_id is not None:
                for row in range(n_rows // 2):  # the chosen rows
                    where = ((rows == row) & (target == stop_token_id)).nonzero().flatten()
                    if not len(where):
                        raise ValueError(f"a chosen answer has no stop token {stop_token_id}")
                    out["p_stop"].append(token_logps["policy"][where[0]].exp().item())
                    out["p_stop_ref"].append(token_logps["ref"][where[0]].exp().item())
    if not out["policy"]:
        raise ValueError("batches is empty")
    result = {}
    for name, key in (("", "policy"), ("ref_", "ref")):
        chosen, rejected = zip(*(t.chunk(2) for t in out[key]))
        result[f"{name}chosen_logps"], result[f"{name}rejected_logps"] = torch.cat(chosen), torch.cat(rejected)
    chosen, rejected = zip(*(t.chunk(2) for t in out["kl_sums"]))
    result["chosen_kl"], result["rejected_kl"] = torch.cat(chosen), torch.cat(rejected)
    result["chosen_logratio"] = result["chosen_logps"] - result["ref_chosen_logps"]
    result["rejected_logratio"] = result["rejected_logps"] - result["ref_rejected_logps"]
    if stop_token_id is not None:
        result["p_stop"], result["p_stop_ref"] = torch.tensor(out["p_stop"]), torch.tensor(out["p_stop_ref"])
    result["kl"] = kl_total / n_tokens
    result["accuracy"] = (result["chosen_logratio"] > result["rejected_logratio"]).float().mean().item()
    return result


def with_reference_logps(
    model: torch.nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    ref_model: torch.nn.Module | None = None,
    *,
    distributions: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """Copies of ``batches`` with ``ref_chosen_logps`` and ``ref_rejected_logps`` added.

    The reference never changes, so computing its log-probabilities once, before
    training, saves one forward per step (TRL's ``precompute_ref_log_probs``).

    Args:
        distributions: also add ``ref_token_logprobs``, the reference's float32 next-token
            log-distribution ``(N, V)`` at each of the batch's ``N`` answer tokens (chosen rows
            first, row by row): :func:`preference_eval` then compares the policy with it and
            runs no reference. About ``4 N V`` bytes a batch; meant for held-out batches that
            are evaluated many times.
    """
    distributions = check_bool(distributions, "distributions")
    out = []
    with eval_mode(model), torch.no_grad():
        for batch in batches:
            if not distributions:
                ref_chosen, ref_rejected = reference_logps(model, batch, ref_model)
                out.append({**batch, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected})
                continue
            inputs = concatenated_inputs(batch)
            _check_every_row_has_answer(inputs["labels"])
            with _reference(model, ref_model) as reference:
                dist, target, rows = _answer_distributions(reference, inputs)
            logps = dist.gather(1, target[:, None])[:, 0]
            sums = _row_sums(logps, rows, inputs["labels"].shape[0])
            ref_chosen, ref_rejected = sums.chunk(2)
            out.append({**batch, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected,
                        "ref_token_logprobs": dist})
    return out


def compute_loss(
    model: torch.nn.Module,
    batch: Mapping[str, torch.Tensor],
    beta: float = 0.1,
    ref_model: torch.nn.Module | None = None,
    *,
    record: list | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """One DPO step's loss and TRL's four reward metrics: a ``loss_fn`` for :func:`llmbook.train.train`.

    Reference log-probabilities come from the batch when present (see
    :func:`with_reference_logps`), else from :func:`reference_logps`.
    Use as ``train(model, batches, functools.partial(compute_loss, beta=0.1), ...)``.

    Args:
        record: a list to which each call appends the pairs' reward margins
            $r_w - r_l$ (a detached ``(B,)`` tensor on the CPU), to plot them afterwards.
    """
    beta = check_real(beta, "beta", low=0.0, low_open=True)
    if record is not None and not isinstance(record, list):
        raise TypeError(f"record must be a list (or None), got {type(record).__name__}")
    given = [key for key in ("ref_chosen_logps", "ref_rejected_logps") if key in batch]
    if len(given) == 1:
        raise ValueError(f"batch holds {given[0]} but not the other reference log-probabilities: give both "
                         "(with_reference_logps adds them) or neither (they are then computed)")
    if given:
        ref_chosen, ref_rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
    else:
        ref_chosen, ref_rejected = reference_logps(model, batch, ref_model)
    chosen_logps, rejected_logps = concatenated_forward(model, batch)
    pair_losses, chosen_rewards, rejected_rewards = _dpo_loss(
        beta, *_check_logps(chosen_logps, rejected_logps, ref_chosen, ref_rejected))
    if record is not None:
        record.append((chosen_rewards - rejected_rewards).cpu())
    return pair_losses.mean(), reward_metrics(chosen_rewards, rejected_rewards)
