"""llmbook.ppo against closed forms (GAE as the direct sum, the clipped losses term by term) and transformers."""

import pytest
import torch

from llmbook import grpo, models, ppo, rewards

V = 64
f64 = dict(dtype=torch.float64)


def masked_rows(seed=0, B=4, C=6):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, C, dtype=torch.long)
    for row, length in enumerate([6, 3, 1, 5][:B]):
        mask[row, length:] = 0
    return g, mask


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 0.0), (1.0, 1.0), (0.5, 1.0)])
def test_gae_is_the_discounted_sum_of_td_errors(gamma, lam):
    g, mask = masked_rows()
    rewards_, values = torch.randn(4, 6, generator=g, **f64), torch.randn(4, 6, generator=g, **f64)
    advantages, returns = ppo.gae(rewards_, values, mask, gamma=gamma, lam=lam)
    for b in range(4):
        n = int(mask[b].sum())
        v = [values[b, t].item() for t in range(n)] + [0.0]  # V = 0 after the last token
        delta = [rewards_[b, t].item() + gamma * v[t + 1] - v[t] for t in range(n)]
        for t in range(n):
            want = sum((gamma * lam) ** k * delta[t + k] for k in range(n - t))
            assert advantages[b, t].item() == pytest.approx(want, abs=1e-12)
            assert returns[b, t].item() == pytest.approx(want + v[t], abs=1e-12)
            if lam == 1.0:  # Monte Carlo: the discounted return from t, minus V(s_t)
                mc = sum(gamma**k * rewards_[b, t + k].item() for k in range(n - t))
                assert returns[b, t].item() == pytest.approx(mc, abs=1e-12)
            if lam == 0.0:  # one-step TD error
                assert advantages[b, t].item() == pytest.approx(delta[t], abs=1e-12)
        assert (advantages[b, n:] == 0).all() and (returns[b, n:] == 0).all()


def test_the_kl_shaped_rewards_sum_to_the_notes_formula():
    g, mask = masked_rows()
    logps, ref = torch.randn(4, 6, generator=g, **f64) - 2, torch.randn(4, 6, generator=g, **f64) - 2
    scores = torch.tensor([1.0, -2.0, 0.5, 3.0], **f64)
    shaped = ppo.kl_penalised_rewards(scores, logps, ref, mask, kl_coef=0.1)
    m = mask.bool()
    for b in range(4):
        n = int(mask[b].sum())
        # r_phi(x, y) - beta (log pi(y|x) - log pi_ref(y|x)), the sequence's log-probs summed over its tokens
        want = scores[b] - 0.1 * (logps[b, :n].sum() - ref[b, :n].sum())
        assert shaped[b].sum().item() == pytest.approx(want.item(), abs=1e-12)
        assert shaped[b, : n - 1].tolist() == pytest.approx((-0.1 * (logps[b] - ref[b]))[: n - 1].tolist())
    assert (shaped[~m] == 0).all()


def test_policy_loss_is_the_clipped_surrogate_term_by_term_and_clipped_tokens_get_no_gradient():
    g, mask = masked_rows()
    old = torch.randn(4, 6, generator=g, **f64) - 2
    logps = (old + 0.4 * torch.randn(4, 6, generator=g, **f64)).requires_grad_()
    adv = torch.randn(4, 6, generator=g, **f64)
    loss, metrics = ppo.policy_loss(logps, old, adv, mask, cliprange=0.2)
    terms, clipped = [], []
    for b, t in mask.nonzero().tolist():
        rho = float(torch.exp(logps.detach()[b, t] - old[b, t]))
        a = adv[b, t].item()
        plain, clip = -a * rho, -a * min(max(rho, 0.8), 1.2)
        terms.append(max(plain, clip))
        clipped.append(clip > plain)
    assert loss.item() == pytest.approx(sum(terms) / len(terms), abs=1e-12)
    assert metrics["pg_clipfrac"] == pytest.approx(sum(clipped) / len(clipped))
    assert 0 < metrics["pg_clipfrac"] < 1
    (grad,) = torch.autograd.grad(loss, logps)
    flat = grad[mask.bool()]
    assert (flat[torch.tensor(clipped)] == 0).all() and (flat[~torch.tensor(clipped)] != 0).all()
    assert (grad[~mask.bool()] == 0).all()


def test_value_loss_is_half_the_larger_squared_error():
    g, mask = masked_rows()
    old, returns = torch.randn(4, 6, generator=g, **f64), torch.randn(4, 6, generator=g, **f64)
    values = old + 0.5 * torch.randn(4, 6, generator=g, **f64)
    loss, metrics = ppo.value_loss(values, old, returns, mask, cliprange_value=0.2)
    terms = []
    for b, t in mask.nonzero().tolist():
        v, o, r = values[b, t].item(), old[b, t].item(), returns[b, t].item()
        terms.append(max((v - r) ** 2, (o + min(max(v - o, -0.2), 0.2) - r) ** 2))
    assert loss.item() == pytest.approx(0.5 * sum(terms) / len(terms), abs=1e-12)
    assert 0 < metrics["vf_clipfrac"] < 1


def test_whiten_gives_mean_zero_and_unit_unbiased_variance_on_the_mask():
    g, mask = masked_rows()
    x = 3 + 2 * torch.randn(4, 6, generator=g, **f64)
    w = ppo.whiten(x, mask)
    on = w[mask.bool()]
    assert on.mean().item() == pytest.approx(0, abs=1e-12)
    assert on.std().item() == pytest.approx(1, abs=1e-6)  # torch's std is the unbiased one
    assert (w[~mask.bool()] == 0).all()
    kept = ppo.whiten(x, mask, shift_mean=False)[mask.bool()]
    assert kept.mean().item() == pytest.approx(x[mask.bool()].mean().item(), abs=1e-9)


def test_values_are_a_sequence_classifiers_score_of_each_prefix():
    """V(s_t) = the score transformers' LlamaForSequenceClassification gives prompt + completion[:t]."""
    from transformers import LlamaForSequenceClassification

    model = models.tiny_model(seed=0, vocab_size=V)
    value = rewards.RewardModel(model, init_std=0.5)
    config = model.config.__class__(**{**model.config.to_dict(), "num_labels": 1, "pad_token_id": 0})
    classifier = LlamaForSequenceClassification(config).eval()
    classifier.model.load_state_dict(model.model.state_dict())
    classifier.score.weight.data.copy_(value.score.weight)
    g = torch.Generator().manual_seed(0)
    batch = {"prompt_ids": torch.randint(3, V, (2, 4), generator=g), "prompt_mask": torch.ones(2, 4, dtype=torch.long),
             "completion_ids": torch.randint(3, V, (2, 3), generator=g),
             "completion_mask": torch.tensor([[1, 1, 1], [1, 1, 0]])}
    with torch.no_grad():
        got = ppo.completion_values(value, batch)
        for b in range(2):
            for t in range(int(batch["completion_mask"][b].sum())):
                ids = torch.cat([batch["prompt_ids"][b], batch["completion_ids"][b, :t]])[None]
                want = classifier(input_ids=ids).logits[0, 0]
                torch.testing.assert_close(got[b, t], want, rtol=1e-5, atol=1e-6)
    assert got[1, 2] == 0


@pytest.mark.parametrize("stop_at_model_eos", [False, True])
def test_rollout_records_the_last_token_and_samples_what_grpo_rollout_samples(stop_at_model_eos):
    model = models.tiny_model(seed=0, vocab_size=V)
    model.generation_config.eos_token_id = list(range(V)) if stop_at_model_eos else 1
    model.generation_config.pad_token_id = 0
    ids = torch.randint(3, V, (2, 5), generator=torch.Generator().manual_seed(0))
    ends = list(range(3, 40))  # a row ends at its first token below 40
    args = dict(num_generations=3, max_new_tokens=4, eos_token_id=ends, pad_token_id=0, top_layers=1)
    ours = ppo.rollout(model, ids, generator=torch.Generator().manual_seed(5), **args)
    if not stop_at_model_eos:  # grpo.rollout's samples: the same tokens up to each row's end
        plain = grpo.rollout(model, ids, generator=torch.Generator().manual_seed(5), **args)
        torch.testing.assert_close(ours["completion_mask"], plain["completion_mask"])
        assert torch.equal(ours["completion_ids"] * ours["completion_mask"],
                           plain["completion_ids"] * plain["completion_mask"])
        assert ours["completion_mask"].sum(1).min() < 4 <= ours["completion_mask"].sum(1).max() + 1
    # every recorded position, the last completion token's included, is the full model's hidden state there
    full = torch.cat([ours["prompt_ids"], ours["completion_ids"]], dim=1)
    mask = torch.cat([ours["prompt_mask"], ours["completion_mask"]], dim=1)
    want = models.top_layer_inputs(model, {"input_ids": full, "attention_mask": mask}, 1)["inputs_embeds"]
    on = mask.bool()
    torch.testing.assert_close(ours["inputs_embeds"][on], want[on], rtol=1e-5, atol=1e-5)


def test_compute_loss_trains_policy_and_value_and_starts_unclipped():
    model = models.tiny_model(seed=0, vocab_size=V)
    value = rewards.RewardModel(models.tiny_model(seed=1, vocab_size=V), init_std=0.1)
    g, _ = masked_rows()
    batch = {"prompt_ids": torch.randint(3, V, (2, 4), generator=g), "prompt_mask": torch.ones(2, 4, dtype=torch.long),
             "completion_ids": torch.randint(3, V, (2, 3), generator=g),
             "completion_mask": torch.tensor([[1, 1, 1], [1, 1, 0]])}
    with torch.no_grad():
        old = grpo.completion_logps(model, batch)
        values = ppo.completion_values(value, batch)
    shaped = ppo.kl_penalised_rewards(torch.tensor([1.0, -1.0]), old, old, batch["completion_mask"])
    adv, ret = ppo.gae(shaped, values, batch["completion_mask"])
    batch.update(old_logprobs=old, old_values=values, advantages=adv, returns=ret)
    models_ = torch.nn.ModuleDict({"policy": model, "value": value})
    loss, metrics = ppo.compute_loss(models_, batch, vf_coef=0.1)
    loss.backward()
    assert metrics["pg_clipfrac"] == 0 and metrics["vf_clipfrac"] == 0  # old = current: nothing clipped
    assert metrics["approxkl"] == pytest.approx(0, abs=1e-10)
    # at the sampling step the value loss is half the mean squared advantage
    m = batch["completion_mask"].bool()
    assert metrics["vf_loss"] == pytest.approx(0.5 * (adv[m] ** 2).mean().item(), rel=1e-5)
    assert value.score.weight.grad.abs().sum() > 0
    assert model.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0


def test_bad_inputs_are_named():
    mask = torch.ones(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="lam must be in"):
        ppo.gae(torch.zeros(2, 3), torch.zeros(2, 3), mask, lam=1.5)
    with pytest.raises(ValueError, match="completion_mask must be 1 on each completion's tokens and 0 after"):
        ppo.gae(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([[1, 0, 1], [1, 1, 1]]))
    with pytest.raises(ValueError, match="these must have one shape"):
        ppo.policy_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, 3), mask)
    with pytest.raises(ValueError, match="cliprange must be > 0"):
        ppo.policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), mask, cliprange=0.0)
    with pytest.raises(ValueError, match="scores must be"):
        ppo.kl_penalised_rewards(torch.zeros(3), torch.zeros(2, 3), torch.zeros(2, 3), mask)
    with pytest.raises(ValueError, match="whiten needs at least 2"):
        ppo.whiten(torch.zeros(2, 3), torch.tensor([[1, 0, 0], [0, 0, 0]]))
