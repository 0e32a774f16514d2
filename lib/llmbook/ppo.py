r"""PPO for a language model: the KL-shaped reward, GAE, the clipped policy and value losses.

Each completion token $o_t$ is an action; the state is the prompt and the tokens before it.
The reward the notes write, $r(x, y) = r_\phi(x, y) - \beta\,(\log\pi_\theta(y \mid x) - \log\pi_{\mathrm{ref}}(y \mid x))$,
is spread over the tokens: every token pays its share of the penalty, and the reward
model's score arrives with the last one,

$$r_t = -\beta\,\big(\log\pi_\theta(o_t) - \log\pi_{\mathrm{ref}}(o_t)\big) + [t = T]\; r_\phi(x, o).$$

A value model $V(s_t)$ estimates the return from each state. The advantage of each token
is the generalised advantage estimate (GAE, Schulman et al., 2016) with the TD errors
$\delta_t = r_t + \gamma V(s_{t+1}) - V(s_t)$ ($V = 0$ after the last token):

$$\hat A_t = \sum_{l \ge 0} (\gamma\lambda)^l\, \delta_{t+l}, \qquad \hat R_t = \hat A_t + V(s_t),$$

$\lambda = 0$ gives the one-step TD error, $\lambda = 1$ the Monte Carlo return minus $V$.
The policy loss is PPO's clipped surrogate with $\rho_t = \pi_\theta(o_t) / \pi_{\theta_{\mathrm{old}}}(o_t)$,
the value loss its clipped squared error, both averaged over the completion tokens:

$$\mathcal{L}_\pi = \overline{\max\big(-\hat A_t\rho_t,\ -\hat A_t \operatorname{clip}(\rho_t, 1-\epsilon, 1+\epsilon)\big)},\qquad
\mathcal{L}_V = \tfrac12\,\overline{\max\big((V_t - \hat R_t)^2,\ (\operatorname{clip}(V_t, V^{\mathrm{old}}_t \pm \epsilon_V) - \hat R_t)^2\big)}.$$

Names follow TRL's ``PPOTrainer`` (``kl_coef``, ``gamma``, ``lam``, ``cliprange``,
``cliprange_value``, ``vf_coef``, the metrics ``pg_clipfrac``, ``vf_clipfrac``,
``approxkl``). Chapter 8's GRPO puts the penalty in the loss instead, and needs no
value model.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from llmbook import grpo, models, sampling
from llmbook._checks import check_float_tensor, check_int, check_real, check_tensor
from llmbook.rewards import RewardModel

__all__ = ["completion_values", "compute_loss", "gae", "kl_penalised_rewards", "policy_loss", "rollout", "value_loss",
           "whiten"]


def _checked_mask(mask: torch.Tensor, shape: torch.Size, name: str = "completion_mask") -> torch.Tensor:
    """``mask`` as bool, checked: the given shape, (B, C), each row's 1s first (completions padded on the right)."""
    check_tensor(mask, name)
    if mask.shape != shape or mask.dim() != 2:
        raise ValueError(f"{name} must have shape {tuple(shape)} (B, C), got {tuple(mask.shape)}")
    mask = mask.bool()
    if (mask[:, 1:] & ~mask[:, :-1]).any():
        raise ValueError(f"{name} must be 1 on each completion's tokens and 0 after them (padding on the right)")
    if not mask.any():
        raise ValueError(f"{name} is 0 everywhere: there is no completion token")
    return mask


def _same_shape(tensors: Mapping[str, torch.Tensor]) -> torch.Size:
    shapes = {name: tuple(check_float_tensor(t, name).shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"these must have one shape (B, C): {shapes}")
    return next(iter(tensors.values())).shape


def _finite_on(mask: torch.Tensor, tensors: Mapping[str, torch.Tensor]) -> None:
    """A ``ValueError`` naming the first tensor with a NaN or infinite value on the mask (padding may hold any)."""
    for name, tensor in tensors.items():
        if not torch.isfinite(tensor.detach()[mask]).all():
            raise ValueError(f"{name} must be finite on the completion tokens (a NaN would spread through the loss)")


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum()


def kl_penalised_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                         completion_mask: torch.Tensor, *, kl_coef: float = 0.05) -> torch.Tensor:
    r"""Per-token rewards $r_t = -\beta(\log\pi_\theta - \log\pi_{\mathrm{ref}})_t$, plus ``scores`` at each row's last token.

    Args:
        scores: ``(B,)`` the reward model's score of each completion.
        logprobs, ref_logprobs: ``(B, C)`` the sampled tokens' log-probabilities under the
            policy that sampled them and under the reference.
        completion_mask: ``(B, C)``, 1 on each completion's tokens (padded on the right).
        kl_coef: $\beta \ge 0$.

    Returns:
        ``(B, C)``, 0 off the completion. Its row sums are $r_\phi - \beta\log\frac{\pi_\theta(o)}{\pi_{\mathrm{ref}}(o)}$.
    """
    shape = _same_shape({"logprobs": logprobs, "ref_logprobs": ref_logprobs})
    mask = _checked_mask(completion_mask, shape)
    check_float_tensor(scores, "scores")
    if scores.shape != shape[:1]:
        raise ValueError(f"scores must be (B,) = {tuple(shape[:1])}, got {tuple(scores.shape)}")
    kl_coef = check_real(kl_coef, "kl_coef", low=0.0)
    _finite_on(mask, {"logprobs": logprobs, "ref_logprobs": ref_logprobs})
    if not torch.isfinite(scores).all():
        raise ValueError("scores must be finite")
    rewards = torch.where(mask, -kl_coef * (logprobs - ref_logprobs), 0.0)
    last = mask.sum(1) - 1  # each row's last completion token
    return rewards.index_put((torch.arange(len(last), device=last.device), last), scores.to(rewards.dtype),
                             accumulate=True)


def gae(rewards: torch.Tensor, values: torch.Tensor, completion_mask: torch.Tensor, *, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Generalised advantage estimates $\hat A_t = \sum_l (\gamma\lambda)^l \delta_{t+l}$ and returns $\hat R_t = \hat A_t + V_t$.

    One backward pass over the positions: $\hat A_t = \delta_t + \gamma\lambda \hat A_{t+1}$,
    with $V$ and $\hat A$ zero after each row's last token (the episode ends there).

    Args:
        rewards: ``(B, C)`` per-token rewards (:func:`kl_penalised_rewards`).
        values: ``(B, C)`` $V(s_t)$, the value of the state before token $t$.
        completion_mask: ``(B, C)``, 1 on each completion's tokens (padded on the right).
        gamma: discount $\gamma \in [0, 1]$; lam: $\lambda \in [0, 1]$.

    Returns:
        ``(advantages, returns)``, both ``(B, C)`` and 0 off the completion; no whitening
        (:func:`whiten` is a separate step, as in TRL).
    """
    shape = _same_shape({"rewards": rewards, "values": values})
    mask = _checked_mask(completion_mask, shape)
    gamma = check_real(gamma, "gamma", low=0.0, high=1.0)
    lam = check_real(lam, "lam", low=0.0, high=1.0)
    _finite_on(mask, {"rewards": rewards, "values": values})
    rewards, values = torch.where(mask, rewards, 0.0), torch.where(mask, values, 0.0)
    advantages = torch.zeros_like(rewards)
    next_value = next_advantage = rewards.new_zeros(shape[0])
    for t in reversed(range(shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    return advantages, torch.where(mask, advantages + values, 0.0)


def whiten(values: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True) -> torch.Tensor:
    """``values`` scaled to unit variance over the masked entries (and mean 0 with ``shift_mean``).

    The variance is the unbiased one, as TRL's ``masked_whiten``; entries off the mask are
    returned as 0. At least two masked entries are needed.
    """
    check_float_tensor(values, "values")
    check_tensor(mask, "mask")
    if mask.shape != values.shape:
        raise ValueError(f"mask must have values' shape {tuple(values.shape)}, got {tuple(mask.shape)}")
    mask = mask.bool()
    values = torch.where(mask, values, 0.0)
    n = int(mask.sum())
    if n < 2:
        raise ValueError(f"whiten needs at least 2 masked entries to estimate a variance, got {n}")
    mean = _masked_mean(values, mask)
    var = (((values - mean) ** 2) * mask).sum() / (n - 1)
    out = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                completion_mask: torch.Tensor, *, cliprange: float = 0.2) -> tuple[torch.Tensor, dict[str, float]]:
    r"""PPO's clipped surrogate $\overline{\max(-\hat A\rho, -\hat A\operatorname{clip}(\rho, 1 \pm \epsilon))}$ over the completion tokens.

    Returns the loss and the metrics ``pg_clipfrac`` (share of tokens where the clipped term
    is the larger, i.e. the gradient is zero) and ``approxkl`` ($\tfrac12\overline{(\log\rho)^2}$).
    """
    shape = _same_shape({"logprobs": logprobs, "old_logprobs": old_logprobs, "advantages": advantages})
    mask = _checked_mask(completion_mask, shape)
    cliprange = check_real(cliprange, "cliprange", low=0.0, low_open=True)
    _finite_on(mask, {"logprobs": logprobs, "old_logprobs": old_logprobs, "advantages": advantages})
    log_ratio = torch.where(mask, logprobs - old_logprobs, 0.0)
    ratio = log_ratio.exp()
    advantages = torch.where(mask, advantages, 0.0)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - cliprange, 1 + cliprange)
    loss = _masked_mean(torch.where(mask, torch.maximum(unclipped, clipped), 0.0), mask)
    with torch.no_grad():
        metrics = {"pg_clipfrac": _masked_mean((clipped > unclipped).float(), mask).item(),
                   "approxkl": _masked_mean(0.5 * log_ratio**2, mask).item()}
    return loss, metrics


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, completion_mask: torch.Tensor,
               *, cliprange_value: float = 0.2) -> tuple[torch.Tensor, dict[str, float]]:
    r"""$\tfrac12\overline{\max((V - \hat R)^2, (\operatorname{clip}(V, V^{\mathrm{old}} \pm \epsilon_V) - \hat R)^2)}$ over the completion tokens.

    Returns the loss and ``vf_clipfrac`` (share of tokens where the clipped error is the larger).
    """
    shape = _same_shape({"values": values, "old_values": old_values, "returns": returns})
    mask = _checked_mask(completion_mask, shape)
    cliprange_value = check_real(cliprange_value, "cliprange_value", low=0.0, low_open=True)
    _finite_on(mask, {"values": values, "old_values": old_values, "returns": returns})
    values, old_values, returns = (torch.where(mask, t, 0.0) for t in (values, old_values, returns))  # padding: any value
    clipped_values = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    plain, clipped = (values - returns) ** 2, (clipped_values - returns) ** 2
    loss = 0.5 * _masked_mean(torch.where(mask, torch.maximum(plain, clipped), 0.0), mask)
    with torch.no_grad():
        metrics = {"vf_clipfrac": _masked_mean((clipped > plain).float(), mask).item()}
    return loss, metrics


def rollout(model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor | None = None, *,
            max_new_tokens: int, top_layers: int, eos_token_id: int | list[int] | None = None,
            **kwargs) -> dict[str, torch.Tensor]:
    """:func:`llmbook.grpo.rollout` whose ``inputs_embeds`` hold every completion token's hidden state.

    ``grpo.rollout`` never feeds a row's last sampled token back, so its hidden state is not
    recorded; a policy's log-probabilities do not need it, but a reward or value model that
    reads the last token does. Here the rows do not stop at ``eos_token_id``: one token more
    than ``max_new_tokens`` is sampled and dropped, and each completion is cut after its first
    end token, so every completion token was fed back once. The first ``max_new_tokens``
    tokens are sampled exactly as ``grpo.rollout`` samples them. (Should every row stop at
    the model's own end-of-turn token first, the missing positions come from one pass of the
    layers below, :func:`llmbook.models.top_layer_inputs`.) Other arguments as ``grpo.rollout``.
    """
    C = check_int(max_new_tokens, "max_new_tokens", minimum=1)
    ends = sampling._end_ids(model, eos_token_id)
    batch = grpo.rollout(model, prompt_ids, prompt_mask, max_new_tokens=C + 1, top_layers=top_layers,
                         eos_token_id=sampling._end_ids(model, None), **kwargs)
    P = batch["prompt_ids"].shape[1]
    width = batch["completion_ids"].shape[1]
    C = min(C, width)
    ids = batch["completion_ids"][:, :C]
    mask = batch["completion_mask"] = sampling._through_first_end(ids, ends) * batch["completion_mask"][:, :C]
    pad = kwargs.get("pad_token_id")
    pad = pad if pad is not None else getattr(getattr(model, "generation_config", None), "pad_token_id", None)
    ids = batch["completion_ids"] = ids.masked_fill(mask == 0, pad if pad is not None else ends[0])
    batch["sampling_logps"] = batch["sampling_logps"][:, :C] * mask
    if width > C:  # the token after the kept ones was sampled: every kept one was fed back
        batch["inputs_embeds"] = batch["inputs_embeds"][:, :P + C]
    else:  # every row ended at the model's end-of-turn token within max_new_tokens
        full = {"input_ids": torch.cat([batch["prompt_ids"], ids], dim=1),
                "attention_mask": torch.cat([batch["prompt_mask"], mask], dim=1)}
        batch["inputs_embeds"] = models.top_layer_inputs(model, full, top_layers)["inputs_embeds"]
    return batch


def completion_values(value_model: RewardModel, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    r"""$V(s_t)$ for every completion token of a :func:`llmbook.grpo.rollout` batch: ``(B, C)``, 0 off the completion.

    The value of the state before token $t$ is read at the position before it (the last
    prompt token for $t = 0$), as TRL reads ``values[:, context_length - 1 : -1]``. With
    ``inputs_embeds`` in the batch (``rollout(top_layers=k)``), ``value_model`` is built on
    a :func:`llmbook.models.top_layers` copy.
    """
    if not isinstance(value_model, RewardModel):
        raise TypeError(f"value_model must be an llmbook.rewards.RewardModel, got {type(value_model).__name__}")
    batch = grpo._checked(batch)
    P, C = batch["prompt_ids"].shape[1], batch["completion_ids"].shape[1]
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    if "inputs_embeds" in batch:
        scores = value_model(inputs_embeds=batch["inputs_embeds"], attention_mask=mask)
    else:
        scores = value_model(input_ids=torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1),
                             attention_mask=mask)
    return scores[:, P - 1:P + C - 1] * batch["completion_mask"]


def compute_loss(models: nn.ModuleDict, batch: Mapping[str, torch.Tensor], *, vf_coef: float = 0.1,
                 cliprange: float = 0.2, cliprange_value: float = 0.2) -> tuple[torch.Tensor, dict[str, float]]:
    r"""$\mathcal{L}_\pi + c_V \mathcal{L}_V$ of a prepared rollout batch, a ``loss_fn`` for :func:`llmbook.train.train`.

    ``models`` holds ``"policy"`` (the causal LM, or its top-layers copy) and ``"value"`` (a
    :class:`llmbook.rewards.RewardModel`); both train. ``batch`` is a :func:`llmbook.grpo.rollout`
    batch with, computed once after sampling, ``old_logprobs``, ``old_values``, ``advantages``
    and ``returns`` (all ``(B, C)``). Metrics: those of the two losses, ``vf_loss``, and
    ``entropy`` (the policy's mean entropy over the completion tokens, in nats).
    """
    if not isinstance(models, nn.ModuleDict) or set(models.keys()) != {"policy", "value"}:
        raise TypeError("models must be an nn.ModuleDict with 'policy' and 'value'")
    vf_coef = check_real(vf_coef, "vf_coef", low=0.0)
    needed = ("old_logprobs", "old_values", "advantages", "returns")
    missing = [name for name in needed if name not in batch]
    if missing:
        raise ValueError(f"batch is missing {missing}: compute them once after sampling")
    mask = batch["completion_mask"]
    logprobs, entropy = grpo._logps_and_entropy(models["policy"], batch)
    pg_loss, metrics = policy_loss(logprobs, batch["old_logprobs"], batch["advantages"], mask, cliprange=cliprange)
    values = completion_values(models["value"], batch)
    vf_loss, vf_metrics = value_loss(values, batch["old_values"], batch["returns"], mask,
                                     cliprange_value=cliprange_value)
    return pg_loss + vf_coef * vf_loss, {**metrics, **vf_metrics, "pg_loss": pg_loss.item(),
                                         "vf_loss": vf_loss.item(), "entropy": entropy}
