r"""A reward model learned from preference pairs (Bradley–Terry), as RLHF trains one.

A reward model $r_\phi(x, y)$ is a language model whose vocabulary head is replaced by a
scalar head, ``score``, read at the last token of prompt and answer. It is trained on pairs
$(x, y_w, y_l)$ in which $y_w$ was preferred, under the Bradley–Terry model

$$P(y_w \succ y_l \mid x) = \sigma\big(r_\phi(x, y_w) - r_\phi(x, y_l)\big),$$

by maximising the likelihood of the observed preferences:

$$\mathcal{L}(\phi) = -\frac{1}{B}\sum_{i=1}^{B} \log\sigma\big(r_{w,i} - r_{l,i} - m_i\big)
+ c\,\frac{1}{B}\sum_{i=1}^{B}\big(r_{w,i} + r_{l,i}\big)^2 .$$

Only differences of rewards enter the first term, so a constant added to every reward
changes nothing; the second term (``center_rewards_coefficient`` $c$, Eisenstein et al.,
2023) pins that constant near zero. $m_i$ is an optional ``margin``. Names follow TRL's
``RewardTrainer`` (``rewards_chosen``, ``rewards_rejected``, ``margin``,
``center_rewards_coefficient``, the metrics ``accuracy`` and ``margin``), and the tests
compare the loss with its ``compute_loss`` on one batch.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from llmbook._checks import check_float_tensor, check_real, check_tensor

__all__ = ["RewardModel", "compute_loss", "last_token", "reward_loss"]


class RewardModel(nn.Module):
    """A transformers decoder with a scalar head ``score`` (``hidden -> 1``, no bias) at every position.

    ``backbone`` is a causal LM of the transformers library (or a
    :func:`llmbook.models.top_layers` copy fed ``inputs_embeds``); its vocabulary head is
    not used. ``forward`` returns one score per position, ``(B, T)``: a reward model reads
    the last token's (:func:`last_token`), a value model (:mod:`llmbook.ppo`) every
    completion position's. The head starts at zero unless ``init_std`` is given, so an
    untrained reward model scores every answer 0.
    """

    def __init__(self, backbone: nn.Module, *, init_std: float = 0.0):
        super().__init__()
        if not isinstance(backbone, nn.Module) or not hasattr(backbone, "model"):
            raise TypeError(f"backbone must be a transformers causal LM (with .model), got {type(backbone).__name__}")
        init_std = check_real(init_std, "init_std", low=0.0)
        self.backbone = backbone
        hidden = backbone.config.hidden_size
        dtype = next(backbone.parameters()).dtype
        device = next(backbone.parameters()).device
        self.score = nn.Linear(hidden, 1, bias=False, dtype=dtype, device=device)
        nn.init.normal_(self.score.weight, std=init_std) if init_std else nn.init.zeros_(self.score.weight)

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None) -> torch.Tensor:
        """``(B, T)`` scores, one per position (the backbone's last hidden state through ``score``)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        out = self.backbone.model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                  use_cache=False)
        return self.score(out.last_hidden_state).squeeze(-1)


def last_token(scores: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Each row's score at its last attended position: ``(B, T) -> (B,)``.

    Prompts may be padded on the left and answers on the right; the last position whose
    ``attention_mask`` is 1 is the answer's last token, as transformers'
    sequence-classification models read it.
    """
    check_float_tensor(scores, "scores")
    check_tensor(attention_mask, "attention_mask")
    if scores.shape != attention_mask.shape or scores.dim() != 2:
        raise ValueError(f"scores and attention_mask must both be (B, T), got {tuple(scores.shape)} and "
                         f"{tuple(attention_mask.shape)}")
    attended = attention_mask.bool()
    if not attended.any(dim=1).all():
        raise ValueError("attention_mask has a row of zeros: that row has no token to score")
    T = attended.shape[1]
    last = T - 1 - attended.flip(1).int().argmax(dim=1)
    return scores.gather(1, last[:, None])[:, 0]


def reward_loss(rewards_chosen: torch.Tensor, rewards_rejected: torch.Tensor, *, margin: torch.Tensor | None = None,
                center_rewards_coefficient: float | None = None) -> torch.Tensor:
    r"""The Bradley–Terry loss $-\overline{\log\sigma(r_w - r_l - m)} + c\,\overline{(r_w + r_l)^2}$ (module docstring).

    Args:
        rewards_chosen, rewards_rejected: ``(B,)`` rewards of the preferred and the other answer.
        margin: ``(B,)`` or ``None``; how much more the preferred answer should score.
        center_rewards_coefficient: $c \ge 0$, or ``None`` (no centring term), as TRL's ``RewardConfig``.
    """
    check_float_tensor(rewards_chosen, "rewards_chosen")
    check_float_tensor(rewards_rejected, "rewards_rejected")
    if rewards_chosen.shape != rewards_rejected.shape or rewards_chosen.dim() != 1 or not rewards_chosen.numel():
        raise ValueError(f"rewards_chosen and rewards_rejected must be (B,) with B >= 1, got "
                         f"{tuple(rewards_chosen.shape)} and {tuple(rewards_rejected.shape)}")
    for name, value in (("rewards_chosen", rewards_chosen), ("rewards_rejected", rewards_rejected)):
        if not torch.isfinite(value).all():
            raise ValueError(f"{name} must be finite, got {value.detach().tolist()}")
    diff = rewards_chosen - rewards_rejected
    if margin is not None:
        check_float_tensor(margin, "margin")
        if margin.shape != diff.shape:
            raise ValueError(f"margin must be (B,) = {tuple(diff.shape)}, got {tuple(margin.shape)}")
        diff = diff - margin
    loss = -nn.functional.logsigmoid(diff).mean()
    if center_rewards_coefficient is not None:
        c = check_real(center_rewards_coefficient, "center_rewards_coefficient", low=0.0)
        loss = loss + c * ((rewards_chosen + rewards_rejected) ** 2).mean()
    return loss


def compute_loss(model: RewardModel, batch: Mapping[str, torch.Tensor], *,
                 center_rewards_coefficient: float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The reward loss of a batch of pairs, a ``loss_fn`` for :func:`llmbook.train.train`.

    ``batch`` holds ``chosen_*`` and ``rejected_*`` inputs (``input_ids`` or ``inputs_embeds``,
    and ``attention_mask``) of the same shape, and optionally ``margin``. Both halves go
    through the model as one batch, as TRL's trainer does. Metrics as TRL logs them:
    ``accuracy`` (share of pairs with $r_w > r_l$), ``margin`` (mean $r_w - r_l$),
    ``mean_reward``.
    """
    if not isinstance(batch, Mapping):
        raise TypeError(f"batch must be a dict of chosen_* and rejected_* inputs, got {type(batch).__name__}")
    key = "inputs_embeds" if "chosen_inputs_embeds" in batch else "input_ids"
    names = [f"{side}_{name}" for side in ("chosen", "rejected") for name in (key, "attention_mask")]
    missing = [name for name in names if name not in batch]
    if missing:
        raise ValueError(f"batch is missing {missing}")
    if batch[f"chosen_{key}"].shape != batch[f"rejected_{key}"].shape:
        raise ValueError(f"chosen_{key} and rejected_{key} must have one shape, got "
                         f"{tuple(batch[f'chosen_{key}'].shape)} and {tuple(batch[f'rejected_{key}'].shape)}")
    inputs = torch.cat([batch[f"chosen_{key}"], batch[f"rejected_{key}"]])
    mask = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    rewards = last_token(model(**{key: inputs, "attention_mask": mask}), mask)
    chosen, rejected = rewards.chunk(2)
    loss = reward_loss(chosen, rejected, margin=batch.get("margin"), center_rewards_coefficient=center_rewards_coefficient)
    with torch.no_grad():
        metrics = {"accuracy": (chosen > rejected).float().mean().item(),
                   "margin": (chosen - rejected).mean().item(), "mean_reward": rewards.mean().item()}
    return loss, metrics
