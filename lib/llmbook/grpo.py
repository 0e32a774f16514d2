r"""GRPO: group relative policy optimisation (Shao et al., 2024, arXiv 2402.03300).

The policy samples $G$ completions of each prompt; a program scores them. Each
completion's **advantage** is its reward measured against the others of its group,

$$A_i = \frac{r_i - \operatorname{mean}(r_1, \dots, r_G)}{\operatorname{std}(r_1, \dots, r_G) + 10^{-4}},$$

so no value model is needed: the group is the baseline. Every token $t$ of completion $i$
then gets PPO's clipped objective with the probability ratio
$\rho_{i,t} = \pi_\theta(o_{i,t} \mid \cdot) / \pi_{\theta_{\mathrm{old}}}(o_{i,t} \mid \cdot)$,

$$\ell_{i,t} = -\min\big(\rho_{i,t} A_i,\ \operatorname{clip}(\rho_{i,t}, 1 - \epsilon, 1 + \epsilon_{\mathrm{high}}) A_i\big) + \beta\, \rho_{i,t}\, k_3(i, t),$$

where $k_3 = e^{\log\pi_{\mathrm{ref}} - \log\pi_\theta} - (\log\pi_{\mathrm{ref}} - \log\pi_\theta) - 1 \ge 0$ is
the per-token estimate of $\mathrm{KL}(\pi_\theta \,\|\, \pi_{\mathrm{ref}})$ (its value unbiased under
samples from $\pi_\theta$), weighted by $\rho_{i,t}$ by default so that its gradient is that KL's
gradient too (``use_bias_correction_kl``). The loss averages $\ell$ over each completion's tokens, then over
completions (``loss_type="grpo"``); ``"bnpo"`` averages over all tokens of the batch and
``"dr_grpo"`` divides the sum by (completions x the longest completion allowed).

Names follow TRL's ``GRPOTrainer`` (``advantages``, ``per_token_logps``,
``old_per_token_logps``, ``ref_per_token_logps``, ``completion_mask``, the metrics ``kl``
and ``clip_ratio/...``), so the tests compare ours with its loss number for number.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from llmbook import losses, sampling
from llmbook._checks import check_bool, check_float_tensor, check_int, check_real, check_tensor, check_token_ids
from llmbook.models import _decoder_layers
from llmbook.utils import eval_mode

__all__ = ["LOSS_TYPES", "completion_logps", "compute_loss", "grpo_loss", "group_advantages", "per_token_kl",
           "rollout"]

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo")
_SCALES = ("group", "batch", "none")


def group_advantages(rewards: torch.Tensor, num_generations: int, *, scale_rewards: str = "group") -> torch.Tensor:
    """Each completion's reward minus its group's mean, divided by the group's standard deviation (+1e-4).

    Args:
        rewards: ``(N,)``, the ``num_generations`` completions of each prompt next to each other.
        num_generations: $G$, completions per prompt (at least 2: one alone has no baseline).
        scale_rewards: ``"group"`` (divide by the group's std, Bessel-corrected), ``"batch"``
            (by the std of all ``N`` rewards) or ``"none"`` (no division).

    Returns:
        ``(N,)`` float advantages; a group whose rewards are all equal gets 0 everywhere.
    """
    check_float_tensor(rewards, "rewards")
    num_generations = check_int(num_generations, "num_generations", minimum=2)
    if scale_rewards not in _SCALES:
        raise ValueError(f"scale_rewards must be one of {_SCALES}, got {scale_rewards!r}")
    if rewards.dim() != 1 or rewards.numel() % num_generations:
        raise ValueError(f"rewards must have shape (N,) with N a multiple of num_generations = {num_generations}, "
                         f"got {tuple(rewards.shape)}")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards must be finite (a NaN or inf reward would spread to its whole group)")
    grouped = rewards.view(-1, num_generations)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_rewards == "group":
        advantages = advantages / (grouped.std(dim=1, keepdim=True) + 1e-4)
    elif scale_rewards == "batch":
        advantages = advantages / (rewards.std() + 1e-4)
    return advantages.reshape(-1)


def per_token_kl(per_token_logps: torch.Tensor, ref_per_token_logps: torch.Tensor) -> torch.Tensor:
    r"""The k3 estimate of $\mathrm{KL}(\pi_\theta \,\|\, \pi_{\mathrm{ref}})$ at each sampled token: $e^{d} - d - 1$, $d = \log\pi_{\mathrm{ref}} - \log\pi_\theta$.

    Never negative ($e^d \ge 1 + d$), zero where the two agree; its mean over tokens sampled
    from $\pi_\theta$ is the exact KL (Schulman, 2020, "Approximating KL divergence").
    """
    check_float_tensor(per_token_logps, "per_token_logps")
    check_float_tensor(ref_per_token_logps, "ref_per_token_logps")
    if per_token_logps.shape != ref_per_token_logps.shape:
        raise ValueError(f"per_token_logps {tuple(per_token_logps.shape)} and ref_per_token_logps "
                         f"{tuple(ref_per_token_logps.shape)} must have the same shape")
    d = ref_per_token_logps - per_token_logps
    return torch.exp(d) - d - 1


def completion_logps(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    r"""$\log\pi_\theta(o_t \mid q, o_{<t})$ of every completion token: ``(B, C)``, 0 where ``completion_mask`` is 0.

    Args:
        model: a causal LM (transformers, with or without adapters).
        batch: ``prompt_ids``, ``prompt_mask`` ``(B, P)`` (prompts padded on the left) and
            ``completion_ids``, ``completion_mask`` ``(B, C)`` (completions padded on the right).

    The prompt and completion go through the model as one sequence; only the completion's
    positions are projected to the vocabulary (:func:`llmbook.losses.answer_logps`). When the
    batch holds ``inputs_embeds`` ``(B, P + C, H)`` (a :func:`rollout` with ``top_layers=k``),
    those go in instead of the ids: ``model`` is then a :func:`llmbook.models.top_layers` copy.
    """
    logps, _ = losses.answer_logps(model, _scored_inputs(_checked(batch, model)))
    C = batch["completion_ids"].shape[1]
    out = logps.new_zeros(batch["prompt_ids"].shape[0], C)  # answer_logps covers the columns from the first scored one on
    out[:, C - logps.shape[1]:] = logps
    return out


def _checked(batch, model=None):
    """``batch`` if it holds a prompt and a completion of matching shapes, with a completion token
    (and, given the ``model``, token ids of its vocabulary)."""
    if not isinstance(batch, Mapping):
        raise TypeError(f"batch must be a dict of prompt_ids, prompt_mask, completion_ids, completion_mask, "
                        f"got {type(batch).__name__}")
    names = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")
    missing = [name for name in names if name not in batch]
    if missing:
        raise ValueError(f"batch is missing {missing}")
    prompt_ids, prompt_mask, completion_ids, completion_mask = (check_tensor(batch[n], n) for n in names)
    if prompt_ids.shape != prompt_mask.shape or completion_ids.shape != completion_mask.shape \
            or prompt_ids.dim() != 2 or prompt_ids.shape[0] != completion_ids.shape[0]:
        raise ValueError(f"prompt_ids/prompt_mask must be (B, P) and completion_ids/completion_mask (B, C), got "
                         f"{tuple(prompt_ids.shape)}, {tuple(prompt_mask.shape)}, {tuple(completion_ids.shape)}, "
                         f"{tuple(completion_mask.shape)}")
    if not completion_mask.bool().any():
        raise ValueError("completion_mask is 0 everywhere: there is no completion token to score")
    for name in ("prompt_ids", "completion_ids"):
        check_token_ids(batch[name], name, model)
    return batch


def _scored_inputs(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Prompt and completion as one sequence, the completion's tokens labelled (checked by the caller)."""
    prompt_ids, prompt_mask = batch["prompt_ids"], batch["prompt_mask"]
    completion_ids, completion_mask = batch["completion_ids"], batch["completion_mask"]
    ids = torch.cat([prompt_ids, completion_ids], dim=1)
    mask = torch.cat([prompt_mask, completion_mask], dim=1)
    labels = ids.masked_fill(mask == 0, losses.IGNORE_INDEX)
    labels[:, : prompt_ids.shape[1]] = losses.IGNORE_INDEX
    inputs = {"input_ids": ids}
    if "inputs_embeds" in batch:
        embeds = check_float_tensor(batch["inputs_embeds"], "inputs_embeds")
        if embeds.dim() != 3 or embeds.shape[:2] != ids.shape:
            raise ValueError(f"inputs_embeds must have shape (B, P + C, H) = {tuple(ids.shape)} + (H,), "
                             f"got {tuple(embeds.shape)}")
        inputs = {"inputs_embeds": embeds}
    shared = {"shared_prefix": batch["shared_prefix"]} if "shared_prefix" in batch else {}
    return {**inputs, "attention_mask": mask, "labels": labels, **shared}


def grpo_loss(
    per_token_logps: torch.Tensor,
    old_per_token_logps: torch.Tensor,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    ref_per_token_logps: torch.Tensor | None = None,
    beta: float = 0.0,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    loss_type: str = "grpo",
    max_completion_length: int | None = None,
    use_bias_correction_kl: bool = True,
) -> tuple[torch.Tensor, dict[str, float]]:
    r"""GRPO's clipped loss with the k3 KL penalty, and TRL's metrics.

    Args:
        per_token_logps: ``(B, C)`` $\log\pi_\theta$ of the sampled tokens (with gradient).
        old_per_token_logps: ``(B, C)`` the same under the policy that sampled them (no gradient).
            At the first step on fresh samples they are ``per_token_logps.detach()``: the ratio is
            1 and the loss's gradient is the plain policy gradient.
        advantages: ``(B,)`` from :func:`group_advantages`.
        completion_mask: ``(B, C)``, 1 on the completion's tokens, 0 elsewhere (bool, integer
            or float 0/1). What the other tensors hold where it is 0 (padding, NaN, infinities)
            reaches neither the loss nor its gradient.
        ref_per_token_logps: ``(B, C)`` under the reference; needed when ``beta > 0``.
        beta: the KL penalty's weight ($\beta \ge 0$).
        epsilon, epsilon_high: the clipping range $[1 - \epsilon, 1 + \epsilon_{\mathrm{high}}]$
            (``epsilon_high`` defaults to ``epsilon``).
        loss_type: ``"grpo"``, ``"bnpo"`` or ``"dr_grpo"`` (see the module's text).
        max_completion_length: ``dr_grpo``'s divisor per completion (default ``C``).
        use_bias_correction_kl: weight each token's k3 by the ratio $\rho_{i,t}$ (TRL's default): the
            tokens were sampled from $\pi_{\theta_{\mathrm{old}}}$, and $\rho$ turns their average into
            an estimate of the KL under $\pi_\theta$ (importance sampling). At $\rho = 1$ the value is
            unchanged but the gradient is not: with the weight, the expected gradient is that of
            $\mathrm{KL}(\pi_\theta \,\|\, \pi_{\mathrm{ref}})$; without it, that of
            $\mathrm{KL}(\pi_{\mathrm{ref}} \,\|\, \pi_\theta)$ (chapter 8 checks both exactly).

    Returns:
        ``(loss, metrics)``: ``metrics`` holds ``clip_ratio/low_mean``, ``clip_ratio/high_mean``,
        ``clip_ratio/region_mean`` (shares of completion tokens whose ratio the clip cut off)
        and, when ``beta > 0``, ``kl`` (the mean k3 over completion tokens, ratio-weighted when
        ``use_bias_correction_kl``).
    """
    check_float_tensor(per_token_logps, "per_token_logps")
    check_float_tensor(old_per_token_logps, "old_per_token_logps")
    check_float_tensor(advantages, "advantages")
    check_tensor(completion_mask, "completion_mask")
    shape = per_token_logps.shape
    if per_token_logps.dim() != 2 or old_per_token_logps.shape != shape or completion_mask.shape != shape:
        raise ValueError(f"per_token_logps, old_per_token_logps and completion_mask must share one (B, C) shape, got "
                         f"{tuple(shape)}, {tuple(old_per_token_logps.shape)}, {tuple(completion_mask.shape)}")
    if advantages.shape != shape[:1]:
        raise ValueError(f"advantages must have shape (B,) = {tuple(shape[:1])}, got {tuple(advantages.shape)}")
    beta = check_real(beta, "beta", low=0.0)
    use_bias_correction_kl = check_bool(use_bias_correction_kl, "use_bias_correction_kl")
    epsilon = check_real(epsilon, "epsilon", low=0.0, low_open=True, high=1.0, high_open=True)
    epsilon_high = epsilon if epsilon_high is None else check_real(epsilon_high, "epsilon_high", low=0.0,
                                                                   low_open=True)
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if beta > 0 and ref_per_token_logps is None:
        raise ValueError("beta > 0 needs ref_per_token_logps (the reference's log-probabilities of the tokens)")
    C = shape[1]
    max_completion_length = C if max_completion_length is None else check_int(
        max_completion_length, "max_completion_length", minimum=C)

    if completion_mask.is_complex() or not bool(((completion_mask == 0) | (completion_mask == 1)).all()):
        raise ValueError(f"completion_mask must hold only 0 (not a completion token) and 1, got values "
                         f"{completion_mask.unique().tolist()[:8]}")
    keep = completion_mask.bool()
    mask = keep.to(per_token_logps.dtype)

    def masked(x):  # 0 off the completion: padding's values (NaN, inf) must not reach the loss or its gradient
        return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))

    per_token_logps, old_per_token_logps = masked(per_token_logps), masked(old_per_token_logps)
    if ref_per_token_logps is not None:
        ref_per_token_logps = masked(ref_per_token_logps)
    ratio = torch.exp(per_token_logps - old_per_token_logps)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    A = advantages[:, None]
    per_token_loss = -torch.min(ratio * A, clipped * A)
    metrics = {}

    def masked_mean(x):
        return ((x * mask).sum() / mask.sum().clamp(min=1.0)).item()

    if beta > 0:
        kl = per_token_kl(per_token_logps, ref_per_token_logps)
        if use_bias_correction_kl:
            kl = kl * ratio
        per_token_loss = per_token_loss + beta * kl
        metrics["kl"] = masked_mean(kl.detach())
    if loss_type == "grpo":
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    else:  # dr_grpo
        loss = (per_token_loss * mask).sum() / (shape[0] * max_completion_length)
    low = ((ratio < 1 - epsilon) & (A < 0)).float().detach()
    high = ((ratio > 1 + epsilon_high) & (A > 0)).float().detach()
    metrics["clip_ratio/low_mean"] = masked_mean(low)
    metrics["clip_ratio/high_mean"] = masked_mean(high)
    metrics["clip_ratio/region_mean"] = masked_mean(torch.maximum(low, high))
    return loss, metrics


@torch.no_grad()
def rollout(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor | None = None,
    *,
    num_generations: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    top_layers: int | None = None,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    r"""$G$ sampled completions of each prompt, as a batch for :func:`completion_logps` and :func:`grpo_loss`.

    The samples come from :func:`llmbook.sampling.generate` (one prompt pass per prompt, its
    KV cache copied to the $G$ rows).

    Args:
        model: the policy, a causal LM of the transformers library.
        prompt_ids: ``(B, P)`` prompts, left-padded; ``prompt_mask`` ``(B, P)`` is 0 on padding
            (``None``: no padding).
        num_generations: $G$, completions per prompt (at least 2: the group is the baseline).
        max_new_tokens, temperature, top_p, eos_token_id, pad_token_id, generator: as in
            :func:`llmbook.sampling.generate`.
        top_layers: ``k`` records, while sampling, the hidden states entering the model's
            layer ``L - k`` at every position, so that a :func:`llmbook.models.top_layers`
            copy can score the completions without running the ``L - k`` layers below again
            (they hold no trainable parameter). ``None``: nothing recorded.
        progress: a bar over the decoding steps.

    Returns:
        ``prompt_ids``, ``prompt_mask`` ``(N, P)`` with ``N = B G`` (each prompt repeated
        $G$ times, next to each other), ``completion_ids`` and ``completion_mask`` ``(N, C)``
        (1 up to and including a row's first end token), ``sampling_logps`` ``(N, C)`` (each
        token's log-probability under the model when it was sampled, temperature 1, 0 on
        padding); with ``top_layers``, ``inputs_embeds`` ``(N, P + C, H)``. Its last position
        is zeros: the hidden state of the last token is never computed, and nothing scored
        reads it (position $t$ only sees positions up to $t$). ``shared_prefix`` ``(P, G)``
        says that the rows of each group share their prompt, so that scoring the batch
        (:func:`completion_logps`, :func:`compute_loss`) runs it through the model once per
        group (:func:`llmbook.losses.shared_prefix`); drop the key to score every row whole.
    """
    G = check_int(num_generations, "num_generations", minimum=2, hint="(a group of one has no baseline)")
    check_tensor(prompt_ids, "prompt_ids")
    if prompt_mask is None:
        prompt_mask = torch.ones_like(prompt_ids)
    hook, recorded = None, []
    if top_layers is not None:
        layers, k = _decoder_layers(model, top_layers)

        def record(module, args, kwargs):
            recorded.append(args[0] if args else kwargs["hidden_states"])

        hook = layers[len(layers) - k].register_forward_pre_hook(record, with_kwargs=True)
    try:
        with eval_mode(model):  # sampling, not training: no dropout
            sequences, logps = sampling.generate(
                model, prompt_ids, attention_mask=prompt_mask, max_new_tokens=max_new_tokens,
                temperature=temperature, top_p=top_p, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                generator=generator, num_return_sequences=G, output_logps=True, progress=progress)
    finally:
        if hook is not None:
            hook.remove()
    device = sequences.device
    P = prompt_ids.shape[1]
    completion_ids = sequences[:, P:]
    batch = {
        "prompt_ids": prompt_ids.to(device).repeat_interleave(G, dim=0),
        "prompt_mask": prompt_mask.to(device).repeat_interleave(G, dim=0),
        "completion_ids": completion_ids,
        "completion_mask": sampling._through_first_end(completion_ids, sampling._end_ids(model, eos_token_id)),
        "sampling_logps": logps,
        # the G rows of a group repeat one prompt: scoring runs it once per group
        "shared_prefix": (P, G),
    }
    if top_layers is not None:  # the prompt pass (B rows), then one position per decoding step (N rows)
        steps = [recorded[0].repeat_interleave(G, dim=0), *recorded[1:]]
        hidden = torch.cat(steps, dim=1)
        batch["inputs_embeds"] = torch.cat([hidden, hidden.new_zeros(hidden.shape[0], 1, hidden.shape[2])], dim=1)
    return batch


def compute_loss(
    model: torch.nn.Module,
    batch: Mapping[str, torch.Tensor],
    *,
    beta: float = 0.0,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    loss_type: str = "grpo",
    num_generations: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    r"""The GRPO loss of a :func:`rollout` batch, a ``loss_fn`` for :func:`llmbook.train.train`.

    The batch holds ``advantages`` ``(N,)`` and, when ``beta > 0``, ``ref_per_token_logps``
    ``(N, C)``; ``old_per_token_logps`` when it was sampled before the latest update, else the
    current log-probabilities (detached) stand in for them: one update per batch, as TRL's
    default ``num_iterations=1``. Metrics: those of :func:`grpo_loss`, plus ``reward`` (the
    mean of ``rewards`` when the batch has them), ``completion_length`` (mean tokens),
    ``entropy`` (the policy's mean entropy $-\sum_v \pi(v)\log\pi(v)$ over the completion
    tokens, in nats, as TRL logs it) and, given ``num_generations`` $G$,
    ``frac_reward_zero_std`` (the share of groups whose $G$ rewards are all equal: those carry
    no signal).
    """
    if not isinstance(batch, Mapping) or "advantages" not in batch:
        raise ValueError("batch must be a dict from rollout() with 'advantages' added (group_advantages)")
    if "rewards" in batch:
        check_tensor(batch["rewards"], "rewards")
    if num_generations is not None:
        num_generations = check_int(num_generations, "num_generations", minimum=2)
        if "rewards" not in batch or batch["rewards"].numel() % num_generations:
            raise ValueError(f"num_generations ({num_generations}) needs the batch's rewards, a whole number of "
                             f"groups of that size")
    logps, entropy = _logps_and_entropy(model, batch)
    old = batch.get("old_per_token_logps")
    loss, metrics = grpo_loss(logps, logps.detach() if old is None else old, batch["advantages"],
                              batch["completion_mask"], ref_per_token_logps=batch.get("ref_per_token_logps"),
                              beta=beta, epsilon=epsilon, epsilon_high=epsilon_high, loss_type=loss_type)
    if "rewards" in batch:
        metrics["reward"] = batch["rewards"].float().mean().item()
    if num_generations is not None:
        spread = batch["rewards"].float().view(-1, num_generations).std(dim=1)
        metrics["frac_reward_zero_std"] = torch.isclose(spread, torch.zeros_like(spread)).float().mean().item()
    metrics["completion_length"] = batch["completion_mask"].float().sum(1).mean().item()
    metrics["entropy"] = entropy
    return loss, metrics


def _logps_and_entropy(model, batch) -> tuple[torch.Tensor, float]:
    """:func:`completion_logps` and the mean entropy over the completion tokens, from one pass.

    The head projects the completion's positions only (:func:`llmbook.losses.labelled_logits`);
    the same log-softmax gives each token's log-probability and the whole distribution's entropy.
    """
    inputs = _scored_inputs(_checked(batch, model))
    logits, scored = losses.labelled_logits(model, inputs)  # (n, V) at the n completion tokens
    logp = torch.log_softmax(logits.float(), dim=-1)
    target = inputs["labels"][:, 1:][scored]
    grid = logp.new_zeros(scored.shape)  # (B, P + C - 1): position t scores token t + 1
    grid[scored] = logp.gather(1, target[:, None])[:, 0]
    with torch.no_grad():
        entropy = -(logp.exp() * logp).sum(-1).mean().item()
    P = batch["prompt_ids"].shape[1]
    return grid[:, P - 1:], entropy
