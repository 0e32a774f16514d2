"""llmbook.grpo against closed forms, torch, and TRL's GRPOTrainer loss on an identical batch."""

import math

import numpy as np
import pytest
import torch

from llmbook import grpo, models

V = 64


def tiny(seed=0):
    return models.tiny_model(seed=seed, vocab_size=V)


def a_batch(seed=0, B=4, P=5, C=6):
    """Left-padded prompts and right-padded completions, as a rollout gives them."""
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(3, V, (B, P), generator=g)
    completion_ids = torch.randint(3, V, (B, C), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[1, :2] = 0  # a shorter prompt
    completion_mask = torch.ones(B, C, dtype=torch.long)
    completion_mask[0, 4:] = 0  # completions that stopped early
    completion_mask[2, 1:] = 0
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
            "completion_ids": completion_ids, "completion_mask": completion_mask}


# ---------------------------------------------------------------- advantages

def test_group_advantages_are_the_rewards_standardised_within_each_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 2.0, 0.0, 1.0, 3.0])
    got = grpo.group_advantages(rewards, 4)
    want = []
    for group in rewards.numpy().reshape(3, 4):  # numpy: mean and Bessel-corrected std
        want += list((group - group.mean()) / (group.std(ddof=1) + 1e-4))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-6)
    assert torch.equal(got[4:8], torch.zeros(4))  # a group that agrees carries no signal
    np.testing.assert_allclose(grpo.group_advantages(rewards, 4, scale_rewards="none").numpy(),
                               rewards.numpy() - rewards.numpy().reshape(3, 4).mean(1).repeat(4), atol=1e-6)
    flat = rewards.numpy()
    np.testing.assert_allclose(grpo.group_advantages(rewards, 4, scale_rewards="batch").numpy(),
                               (flat - flat.reshape(3, 4).mean(1).repeat(4)) / (flat.std(ddof=1) + 1e-4),
                               rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- the k3 estimator

def test_k3_is_never_negative_and_its_expectation_under_the_policy_is_the_exact_kl():
    g = torch.Generator().manual_seed(0)
    policy = torch.log_softmax(torch.randn(50, dtype=torch.float64, generator=g), 0)
    ref = torch.log_softmax(torch.randn(50, dtype=torch.float64, generator=g), 0)
    k3 = grpo.per_token_kl(policy, ref)  # at every token of the vocabulary
    assert (k3 >= 0).all()
    exact = torch.nn.functional.kl_div(ref, policy, log_target=True, reduction="sum")  # KL(policy || ref), torch
    torch.testing.assert_close((policy.exp() * k3).sum(), exact)
    # and sampled, as training sees it: the mean over tokens drawn from the policy approaches it
    tokens = torch.multinomial(policy.exp(), 200_000, replacement=True, generator=g)
    sample = grpo.per_token_kl(policy[tokens], ref[tokens])
    assert abs(sample.mean() - exact) < 4 * sample.std() / len(tokens) ** 0.5
    assert torch.equal(grpo.per_token_kl(policy, policy), torch.zeros(50, dtype=torch.float64))


# ---------------------------------------------------------------- log-probabilities

def torch_completion_logps(model, batch):
    """The reference: torch's log-softmax of the full logits, read at each completion token."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    P = batch["prompt_ids"].shape[1]
    want = torch.log_softmax(logits[:, P - 1:-1], -1).gather(-1, batch["completion_ids"][..., None])[..., 0]
    return want * batch["completion_mask"]


def test_completion_logps_are_torchs_log_softmax_at_the_completion_tokens():
    model, batch = tiny(), a_batch()
    got = grpo.completion_logps(model, batch)
    torch.testing.assert_close(got.detach(), torch_completion_logps(model, batch), rtol=1e-5, atol=1e-5)
    assert got.requires_grad
    # completions whose first column is padding in every row still line up
    shifted = {**batch, "completion_mask": batch["completion_mask"].clone()}
    shifted["completion_mask"][:, 0] = 0
    torch.testing.assert_close(grpo.completion_logps(model, shifted).detach(), torch_completion_logps(model, shifted),
                               rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- the loss

def test_at_the_first_inner_step_the_loss_gradient_is_the_plain_policy_gradient():
    g = torch.Generator().manual_seed(1)
    logps = (-torch.rand(4, 6, generator=g) * 3).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6, [1, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]])
    advantages = torch.tensor([1.5, -0.5, 0.0, -1.0])
    loss, metrics = grpo.grpo_loss(logps, logps.detach(), advantages, mask)
    loss.backward()
    # REINFORCE with the group baseline: d/d logp of -(1/B) sum_i A_i mean_t logp_{i,t}
    want = -(advantages[:, None] * mask / mask.sum(1, keepdim=True)) / 4
    torch.testing.assert_close(logps.grad, want)
    assert metrics["clip_ratio/region_mean"] == 0.0  # ratio 1: nothing clipped


# ---------------------------------------------------------------- rollouts

def test_rollout_samples_what_generate_samples_and_masks_after_the_end():
    model = tiny()
    prompt_ids = torch.randint(3, V, (2, 5), generator=torch.Generator().manual_seed(3))
    prompt_mask = torch.ones_like(prompt_ids)
    prompt_mask[1, :2] = 0
    eos = 7
    batch = grpo.rollout(model, prompt_ids, prompt_mask, num_generations=3, max_new_tokens=6, eos_token_id=eos,
                         pad_token_id=0, generator=torch.Generator().manual_seed(0))
    # transformers' generate, same seed, same draws: the same tokens
    torch.manual_seed(0)
    want = model.generate(prompt_ids.repeat_interleave(3, 0), attention_mask=prompt_mask.repeat_interleave(3, 0),
                          do_sample=True, top_k=0, max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    torch.manual_seed(0)
    again = grpo.rollout(model, prompt_ids, prompt_mask, num_generations=3, max_new_tokens=6, eos_token_id=eos,
                         pad_token_id=0)
    C = again["completion_ids"].shape[1]
    assert torch.equal(again["completion_ids"], want[:, 5:5 + C])
    assert torch.equal(batch["prompt_ids"], prompt_ids.repeat_interleave(3, 0))
    # the mask is 1 up to and including each row's first end token, 0 after
    for ids, mask in zip(batch["completion_ids"].tolist(), batch["completion_mask"].tolist()):
        end = ids.index(eos) + 1 if eos in ids else len(ids)
        assert mask == [1] * end + [0] * (len(ids) - end)
    # the sampling log-probs are the model's own at those tokens
    torch.testing.assert_close(batch["sampling_logps"], torch_completion_logps(model, batch), rtol=1e-5, atol=1e-5)


def test_recorded_hidden_states_let_the_top_layers_score_the_completions():
    model = models.tiny_model(seed=0, vocab_size=V, num_hidden_layers=4)
    top = models.top_layers(model, 2)
    prompt_ids = torch.randint(3, V, (2, 5), generator=torch.Generator().manual_seed(4))
    prompt_mask = torch.ones_like(prompt_ids)
    prompt_mask[0, :1] = 0
    batch = grpo.rollout(model, prompt_ids, prompt_mask, num_generations=2, max_new_tokens=5, eos_token_id=[],
                         generator=torch.Generator().manual_seed(1), top_layers=2)
    P, C = 5, batch["completion_ids"].shape[1]
    assert batch["inputs_embeds"].shape == (4, P + C, 64)
    # transformers' hidden states entering layer 2, from one pass over the whole sequence
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[2]
    real = mask.bool()
    real[:, -1] = False  # the last position is never computed (zeros)
    torch.testing.assert_close(batch["inputs_embeds"][real], hidden[real], rtol=1e-5, atol=1e-5)
    assert torch.equal(batch["inputs_embeds"][:, -1], torch.zeros(4, 64))
    with torch.no_grad():
        torch.testing.assert_close(grpo.completion_logps(top, batch), torch_completion_logps(model, batch),
                                   rtol=1e-5, atol=1e-5)


def test_compute_loss_is_grpo_loss_of_the_batch_with_its_metrics():
    model, batch = tiny(), a_batch()
    batch["advantages"] = torch.tensor([1.0, -1.0, 0.5, -0.5])
    batch["rewards"] = torch.tensor([1.0, 0.0, 1.0, 0.0])
    ref = grpo.completion_logps(model, batch).detach() - 0.1  # a reference a little off the policy
    batch["ref_per_token_logps"] = ref
    loss, metrics = grpo.compute_loss(model, batch, beta=0.04)
    logps = grpo.completion_logps(model, batch)
    want, want_metrics = grpo.grpo_loss(logps, logps.detach(), batch["advantages"], batch["completion_mask"],
                                        ref_per_token_logps=ref, beta=0.04)
    torch.testing.assert_close(loss, want)
    # (compute_loss takes its log-probs from the same log-softmax as the entropy: float32 rounding apart)
    assert metrics["kl"] == pytest.approx(want_metrics["kl"], rel=1e-5) and metrics["kl"] > 0
    assert metrics["reward"] == 0.5
    assert metrics["completion_length"] == batch["completion_mask"].float().sum(1).mean().item()


def test_compute_loss_logs_trls_entropy_and_the_share_of_groups_without_signal():
    from trl.trainer.utils import entropy_from_logits

    model, batch = tiny(), a_batch()
    batch["advantages"] = torch.zeros(4)
    batch["rewards"] = torch.tensor([1.0, 1.0, 0.0, 1.0])  # two groups of 2: one agrees, one does not
    _, metrics = grpo.compute_loss(model, batch, num_generations=2)
    assert metrics["frac_reward_zero_std"] == 0.5
    _, metrics4 = grpo.compute_loss(model, batch, num_generations=4)
    assert metrics4["frac_reward_zero_std"] == 0.0
    # TRL's entropy of the full logits at the positions that predict a completion token
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    P = batch["prompt_ids"].shape[1]
    entropy = entropy_from_logits(logits[:, P - 1:-1])  # (B, C)
    want = entropy[batch["completion_mask"].bool()].mean().item()
    assert metrics["entropy"] == pytest.approx(want, rel=1e-5) and 0 < want < math.log(128)
    with pytest.raises(ValueError, match="num_generations"):
        grpo.compute_loss(model, batch, num_generations=3)


def trl_loss(batch, per_token_logps_inputs, loss_type, beta, tokenizer, tmp_path):
    """TRL's GRPOTrainer._compute_loss on the same model and batch (eval mode: no accumulation divisor)."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    path = tmp_path / "tiny"
    tiny().save_pretrained(path)
    args = GRPOConfig(output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, report_to=[], beta=beta,
                      epsilon=0.2, loss_type=loss_type, num_generations=2, per_device_train_batch_size=4,
                      max_completion_length=batch["completion_ids"].shape[1], disable_tqdm=True,
                      save_strategy="no", gradient_checkpointing=False)
    trainer = GRPOTrainer(model=str(path), reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                          args=args, train_dataset=Dataset.from_list([{"prompt": "a"}] * 4),
                          processing_class=tokenizer)
    trainer.model.eval()
    loss = trainer._compute_loss(trainer.model, {**batch, **per_token_logps_inputs})
    return loss, {k: v[-1] for k, v in trainer._metrics["eval"].items()}


@pytest.mark.parametrize("loss_type, beta", [("grpo", 0.04), ("bnpo", 0.0), ("dr_grpo", 0.04)])
def test_grpo_loss_equals_trls_on_an_identical_batch(loss_type, beta, tokenizer, tmp_path):
    batch = a_batch()
    model = tiny()
    model.eval()
    logps = grpo.completion_logps(model, batch)
    g = torch.Generator().manual_seed(2)
    # old and reference log-probs a little off, so that the ratio is clipped at some tokens
    old = logps.detach() + 0.3 * torch.randn(logps.shape, generator=g)
    ref = logps.detach() + 0.3 * torch.randn(logps.shape, generator=g)
    advantages = grpo.group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 2)
    ours, metrics = grpo.grpo_loss(logps, old, advantages, batch["completion_mask"], ref_per_token_logps=ref,
                                   beta=beta, epsilon=0.2, loss_type=loss_type)
    theirs, their_metrics = trl_loss(batch, {"old_per_token_logps": old, "ref_per_token_logps": ref,
                                             "advantages": advantages}, loss_type, beta, tokenizer, tmp_path)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    for key, value in metrics.items():
        assert value == pytest.approx(their_metrics[key], rel=1e-5, abs=1e-7), key
    assert 0 < metrics["clip_ratio/region_mean"] < 1  # the clip was exercised


def test_bad_inputs_are_named():
    logps = torch.zeros(2, 3)
    mask = torch.ones(2, 3)
    with pytest.raises(ValueError, match="num_generations must be >= 2"):
        grpo.group_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="multiple of num_generations = 3"):
        grpo.group_advantages(torch.zeros(4), 3)
    with pytest.raises(ValueError, match="rewards must be finite"):
        grpo.group_advantages(torch.tensor([1.0, float("nan")]), 2)
    with pytest.raises(ValueError, match="scale_rewards must be one of"):
        grpo.group_advantages(torch.zeros(4), 2, scale_rewards="std")
    with pytest.raises(ValueError, match="beta > 0 needs ref_per_token_logps"):
        grpo.grpo_loss(logps, logps, torch.zeros(2), mask, beta=0.1)
    with pytest.raises(ValueError, match="advantages must have shape"):
        grpo.grpo_loss(logps, logps, torch.zeros(3), mask)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        grpo.grpo_loss(logps, logps, torch.zeros(2), mask, loss_type="dapo")
    with pytest.raises(ValueError, match="epsilon must be in"):
        grpo.grpo_loss(logps, logps, torch.zeros(2), mask, epsilon=1.5)
    with pytest.raises(ValueError, match="num_generations must be >= 2"):
        grpo.rollout(tiny(), torch.ones(1, 2, dtype=torch.long), num_generations=1, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"inputs_embeds must have shape \(B, P \+ C, H\)"):
        grpo.completion_logps(tiny(), {**a_batch(), "inputs_embeds": torch.zeros(4, 3, 64)})
    with pytest.raises(ValueError, match="'advantages' added"):
        grpo.compute_loss(tiny(), a_batch())
    with pytest.raises(ValueError, match="completion_mask is 0 everywhere"):
        grpo.completion_logps(tiny(), {**a_batch(), "completion_mask": torch.zeros(4, 6, dtype=torch.long)})


@pytest.mark.parametrize("junk", [math.nan, 100.0, -math.inf, math.inf])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
def test_what_masked_positions_hold_reaches_neither_the_loss_nor_its_gradient(junk, loss_type):
    # The reference: the same tensors with 0 at the masked positions.
    g = torch.Generator().manual_seed(0)
    logps = -torch.rand(3, 4, generator=g)
    old, ref = logps - 0.1 * torch.rand(3, 4, generator=g), logps - 0.2
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]])
    advantages = torch.tensor([1.0, -1.0, 0.5])

    def loss_and_grad(fill):
        x = torch.where(mask.bool(), logps, fill).requires_grad_()
        o, r = torch.where(mask.bool(), old, 0.5 * fill), torch.where(mask.bool(), ref, -fill)
        loss, metrics = grpo.grpo_loss(x, o, advantages, mask, ref_per_token_logps=r, beta=0.04, loss_type=loss_type)
        loss.backward()
        return loss.detach(), x.grad, metrics

    clean, dirty = loss_and_grad(torch.tensor(0.0)), loss_and_grad(torch.tensor(junk))
    torch.testing.assert_close(dirty[0], clean[0])
    torch.testing.assert_close(dirty[1], clean[1])
    assert dirty[2] == clean[2]
    assert torch.isfinite(dirty[0]) and torch.isfinite(dirty[1]).all()
