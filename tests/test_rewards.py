"""llmbook.rewards against closed forms and TRL's RewardTrainer loss on an identical batch."""

import math

import pytest
import torch

from llmbook import models, rewards

V = 64


def pair_inputs(seed=0, B=3, T=7, pad=0):
    """Chosen and rejected ids padded on the right with ``pad`` to one length, as TRL's collator pads them."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (2 * B, T), generator=g)
    mask = torch.ones_like(ids)
    for row, length in enumerate([7, 5, 6, 4, 7, 3][: 2 * B]):
        mask[row, length:] = 0
    return ids.masked_fill(mask == 0, pad), mask


def test_reward_loss_is_the_bradley_terry_negative_log_likelihood_plus_the_centring_term():
    chosen = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    rejected = torch.tensor([0.0, 0.5, 2.5], dtype=torch.float64)
    margin = torch.tensor([0.0, 1.0, -1.0], dtype=torch.float64)
    nll = -sum(math.log(1 / (1 + math.exp(-(c - r - m)))) for c, r, m in zip(chosen.tolist(), rejected.tolist(), margin.tolist())) / 3
    centre = sum((c + r) ** 2 for c, r in zip(chosen.tolist(), rejected.tolist())) / 3
    got = rewards.reward_loss(chosen, rejected, margin=margin, center_rewards_coefficient=0.01)
    assert got.item() == pytest.approx(nll + 0.01 * centre, rel=1e-12)
    # a constant added to every reward changes only the centring term
    shifted = rewards.reward_loss(chosen + 5, rejected + 5, margin=margin)
    assert shifted.item() == pytest.approx(nll, rel=1e-12)


def test_last_token_reads_each_rows_last_attended_position():
    scores = torch.arange(12.0).view(2, 6)
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])  # left and right padding, none
    assert rewards.last_token(scores, mask).tolist() == [4.0, 11.0]


def sequence_classifier(model):
    """transformers' LlamaForSequenceClassification with ``model``'s decoder and a random score head."""
    from transformers import LlamaForSequenceClassification

    config = model.config.__class__(**{**model.config.to_dict(), "num_labels": 1, "pad_token_id": 0})
    classifier = LlamaForSequenceClassification(config)
    classifier.model.load_state_dict(model.model.state_dict())
    torch.nn.init.normal_(classifier.score.weight, std=0.5, generator=torch.Generator().manual_seed(3))
    return classifier.eval()


def test_reward_model_scores_what_transformers_sequence_classifier_scores():
    model = models.tiny_model(seed=0, vocab_size=V)
    classifier = sequence_classifier(model)
    ours = rewards.RewardModel(model)
    ours.score.weight.data.copy_(classifier.score.weight)
    ids, mask = pair_inputs()
    with torch.no_grad():
        theirs = classifier(input_ids=ids, attention_mask=mask).logits[:, 0]
        got = rewards.last_token(ours(input_ids=ids, attention_mask=mask), mask)
    torch.testing.assert_close(got, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("center", [None, 0.01])
def test_compute_loss_equals_trls_reward_trainer_on_an_identical_batch(center, tmp_path, tokenizer):
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    model = models.tiny_model(seed=0, vocab_size=V)
    classifier = sequence_classifier(model)
    args = RewardConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[], disable_tqdm=True,
                        center_rewards_coefficient=center, save_strategy="no")
    data = Dataset.from_list([{"prompt": "a", "chosen": " b", "rejected": " c"}] * 2)
    trainer = RewardTrainer(model=classifier, args=args, train_dataset=data, processing_class=tokenizer)
    assert tokenizer.pad_token_id < V  # the trainer reads the last token before the tokenizer's pad
    ids, mask = pair_inputs(pad=tokenizer.pad_token_id)
    trainer.model.train()
    theirs = trainer.compute_loss(classifier, {"input_ids": ids, "attention_mask": mask})
    theirs.backward()
    ours_model = rewards.RewardModel(models.tiny_model(seed=0, vocab_size=V))
    ours_model.score.weight.data.copy_(classifier.score.weight)
    ours_model.train()
    B = ids.shape[0] // 2
    batch = {"chosen_input_ids": ids[:B], "chosen_attention_mask": mask[:B],
             "rejected_input_ids": ids[B:], "rejected_attention_mask": mask[B:]}
    ours, metrics = rewards.compute_loss(ours_model, batch, center_rewards_coefficient=center)
    ours.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_model.score.weight.grad, classifier.score.weight.grad, rtol=1e-4, atol=1e-6)
    for key in ("accuracy", "margin"):
        assert metrics[key] == pytest.approx(trainer._metrics["train"][key][-1], rel=1e-5, abs=1e-7), key


def test_a_zero_head_scores_every_answer_zero_and_the_first_loss_is_log_2():
    model = rewards.RewardModel(models.tiny_model(seed=0, vocab_size=V))
    ids, mask = pair_inputs()
    batch = {"chosen_input_ids": ids[:3], "chosen_attention_mask": mask[:3],
             "rejected_input_ids": ids[3:], "rejected_attention_mask": mask[3:]}
    loss, metrics = rewards.compute_loss(model, batch)
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6) and metrics["accuracy"] == 0


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="rewards_chosen and rewards_rejected must be"):
        rewards.reward_loss(torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="center_rewards_coefficient must be >= 0"):
        rewards.reward_loss(torch.zeros(2), torch.zeros(2), center_rewards_coefficient=-1.0)
    with pytest.raises(ValueError, match="attention_mask has a row of zeros"):
        rewards.last_token(torch.zeros(2, 3), torch.tensor([[1, 1, 0], [0, 0, 0]]))
