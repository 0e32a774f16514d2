"""llmbook.dpo against TRL 1.16's DPOTrainer, torch, and the closed forms of chapter 7."""

import copy
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llmbook import data, dpo, lora, models

VOCAB = 49152  # the real tokenizer's vocabulary, so TRL can tokenise text for the tiny model

PAIRS = [
    {"prompt": "Say hi.", "chosen": "Hi there, friend!", "rejected": "No."},
    {"prompt": "Count to three.", "chosen": "1, 2, 3.", "rejected": "1, 2, 3, 4, 5, 6, 7."},
    {"prompt": "What is 2+2?", "chosen": "4", "rejected": "It is 5, I think."},
    {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "I cannot name one."},
]


@pytest.fixture(scope="module")
def batch(tokenizer):
    return data.PreferenceCollator(tokenizer)(PAIRS)


def tiny(seed, vocab_size=VOCAB):
    return models.tiny_model(seed=seed, vocab_size=vocab_size)


@pytest.fixture
def small_batch():
    """A preference batch of random tokens for a 256-token vocabulary: 3 pairs, prompts of 4-6 tokens."""
    gen = torch.Generator().manual_seed(0)
    batch = {}
    prompts = [torch.randint(3, 256, (n,), generator=gen).tolist() for n in (4, 6, 5)]
    for side, lengths in (("chosen", (3, 2, 5)), ("rejected", (6, 4, 2))):
        ids = [p + torch.randint(3, 256, (n,), generator=gen).tolist() for p, n in zip(prompts, lengths)]
        labels = [[-100] * len(p) + seq[len(p):] for p, seq in zip(prompts, ids)]
        batch[f"{side}_input_ids"] = data.pad(ids, 2, length=12)
        batch[f"{side}_attention_mask"] = data.pad([[1] * len(x) for x in ids], 0, length=12)
        batch[f"{side}_labels"] = data.pad(labels, -100, length=12)
    return batch


def with_lora(model, seed=0, scale=0.05):
    """Our LoRA on q/v with B made non-zero, so the policy differs from its reference."""
    lora.apply_lora(model, ["q_proj", "v_proj"], r=4, lora_alpha=8)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.lora_layers(model):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * scale)
    return model


def torch_sequence_logps(logits, labels):
    """The reference: torch's cross-entropy on shifted labels, summed per row."""
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none")
    return -nll.sum(dim=1)


def trl_trainer(policy, ref, beta, tokenizer, outdir):
    """TRL's DPOTrainer on PAIRS (as conversations), fp32 on the CPU, one step of all four pairs."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    conversations = Dataset.from_list([
        {"prompt": [{"role": "user", "content": p["prompt"]}],
         "chosen": [{"role": "assistant", "content": p["chosen"]}],
         "rejected": [{"role": "assistant", "content": p["rejected"]}]}
        for p in PAIRS
    ])
    # TRL defaults to bf16 autocast and gradient checkpointing; fp32 without checkpointing computes what we do.
    args = DPOConfig(output_dir=str(outdir), use_cpu=True, report_to=[], bf16=False, gradient_checkpointing=False,
                     beta=beta, per_device_train_batch_size=len(PAIRS), max_steps=1, logging_steps=1,
                     learning_rate=1e-3, save_strategy="no", disable_tqdm=True)
    return DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=conversations, processing_class=tokenizer)


# ---------------------------------------------------------------- sequence_logps

def test_sequence_logps_equals_torch_cross_entropy():
    logits = torch.randn(3, 7, 11, dtype=torch.float64)
    labels = torch.randint(0, 11, (3, 7))
    labels[0, :3] = -100  # a prompt
    labels[1, 5:] = -100  # padding
    labels[2, :6] = -100  # one response token, the last
    ours = dpo.sequence_logps(logits, labels)
    torch.testing.assert_close(ours, torch_sequence_logps(logits, labels))
    assert ours.shape == (3,) and (ours < 0).all()


def test_sequence_logps_equals_trl_fused_lm_head(batch):
    from trl.trainer.utils import add_fused_lm_head

    model = tiny(0)
    theirs_model = copy.deepcopy(model)
    add_fused_lm_head(theirs_model)
    ids, mask, labels = batch["chosen_input_ids"], batch["chosen_attention_mask"], batch["chosen_labels"]
    with torch.no_grad():
        ours = dpo.sequence_logps(model(input_ids=ids, attention_mask=mask).logits, labels)
        theirs = theirs_model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True).log_probs.sum(1)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------- concatenated forward

def test_concatenated_forward_equals_two_separate_forwards(small_batch):
    batch, model = small_batch, tiny(0, 256)
    with torch.no_grad():
        chosen, rejected = dpo.concatenated_forward(model, batch)
        separate = [
            torch_sequence_logps(model(input_ids=batch[f"{s}_input_ids"],
                                       attention_mask=batch[f"{s}_attention_mask"]).logits, batch[f"{s}_labels"])
            for s in ("chosen", "rejected")
        ]
    torch.testing.assert_close(chosen, separate[0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(rejected, separate[1], rtol=1e-5, atol=1e-4)


def test_concatenated_forward_of_a_model_that_hides_its_head_gives_the_same(small_batch, hide_head):
    batch, model = small_batch, tiny(0, 256)
    with torch.no_grad():
        kept = torch.stack(dpo.concatenated_forward(model, batch))
        full = torch.stack(dpo.concatenated_forward(hide_head(model), batch))
    torch.testing.assert_close(kept, full, rtol=1e-5, atol=1e-4)


def test_our_response_tokens_are_trls(tokenizer, batch, tmp_path):
    trainer = trl_trainer(tiny(0), tiny(1), 0.1, tokenizer, tmp_path)
    for i, example in enumerate(trainer.train_dataset):
        for side in ("chosen", "rejected"):
            labels = batch[f"{side}_labels"][i]
            assert labels[labels != -100].tolist() == example[f"{side}_ids"]
            n = int(batch[f"{side}_attention_mask"][i].sum())
            assert batch[f"{side}_input_ids"][i, :n].tolist() == example["prompt_ids"] + example[f"{side}_ids"]


# ---------------------------------------------------------------- loss and metrics against TRL

@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_loss_and_the_four_metrics_equal_trls_compute_loss(tokenizer, batch, beta, tmp_path):
    policy, ref = tiny(0), tiny(1)
    with torch.no_grad():
        chosen, rejected = dpo.concatenated_forward(policy, batch)
        ref_chosen, ref_rejected = dpo.concatenated_forward(ref, batch)
    losses, chosen_rewards, rejected_rewards = dpo.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta)
    ours = dpo.reward_metrics(chosen_rewards, rejected_rewards)

    trainer = trl_trainer(policy, ref, beta, tokenizer, tmp_path)
    inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])
    trainer.model.train()
    with torch.no_grad():
        their_loss = trainer.compute_loss(trainer.model, inputs)
    theirs = {k: v[-1] for k, v in trainer._metrics["train"].items() if k.startswith("rewards/")}
    torch.testing.assert_close(losses.mean(), their_loss, rtol=1e-5, atol=1e-5)
    assert set(ours) == set(theirs) == {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"}
    for key in ours:
        assert ours[key] == pytest.approx(theirs[key], abs=1e-4), key
    assert ours["rewards/margins"] != 0  # the two models differ, so the comparison can fail


def test_one_step_of_trls_dpo_trainer_logs_our_numbers(tokenizer, batch, tmp_path):
    policy, ref = tiny(0), tiny(1)
    with torch.no_grad():
        ours = dpo.compute_loss(policy, batch, beta=0.2, ref_model=ref)
    trainer = trl_trainer(policy, ref, 0.2, tokenizer, tmp_path)
    trainer.train()  # one step on the four pairs; the log holds the metrics of that step's batch
    logged = trainer.state.log_history[0]
    assert logged["loss"] == pytest.approx(ours[0].item(), abs=1e-4)
    for key, value in ours[1].items():
        assert logged[key] == pytest.approx(value, abs=1e-4), key


# ---------------------------------------------------------------- closed forms

def test_loss_is_ln2_when_the_policy_is_the_reference(small_batch):
    batch, model = small_batch, tiny(0, 256)
    lora.apply_lora(model, ["q_proj", "v_proj"], r=4, lora_alpha=8)  # B = 0: the policy is the base model
    loss, metrics = dpo.compute_loss(model, batch, beta=0.1)
    torch.testing.assert_close(loss, torch.tensor(math.log(2)))
    assert metrics["rewards/margins"] == 0 and metrics["rewards/accuracies"] == 0


def test_reference_by_disabling_lora_equals_a_frozen_copy(small_batch):
    batch, base = small_batch, tiny(0, 256)
    frozen = copy.deepcopy(base).requires_grad_(False)
    model = with_lora(base)
    ref = torch.stack(dpo.reference_logps(model, batch))
    with torch.no_grad():
        copy_logps = torch.stack(dpo.concatenated_forward(frozen, batch))
        policy_logps = torch.stack(dpo.concatenated_forward(model, batch))
    torch.testing.assert_close(ref, copy_logps)
    assert (policy_logps - ref).abs().max() > 1e-3  # the adapters do change the policy


def test_precomputed_reference_gives_the_same_loss(small_batch):
    batch, model = small_batch, with_lora(tiny(0, 256))
    on_the_fly = dpo.compute_loss(model, batch, beta=0.3)
    [precomputed] = dpo.with_reference_logps(model, [batch])
    assert set(precomputed) == set(batch) | {"ref_chosen_logps", "ref_rejected_logps"}
    again = dpo.compute_loss(model, precomputed, beta=0.3)
    torch.testing.assert_close(on_the_fly[0], again[0])
    assert on_the_fly[1] == pytest.approx(again[1])


def test_gradient_equals_the_closed_form(small_batch):
    r"""grad L = -(beta/B) sum_i sigma(r_l - r_w)_i (grad log pi(y_w,i) - grad log pi(y_l,i))."""
    batch, beta = small_batch, 0.5
    model = with_lora(tiny(0, 256), scale=0.2)
    params = [p for p in model.parameters() if p.requires_grad]
    ref_chosen, ref_rejected = dpo.reference_logps(model, batch)
    chosen, rejected = dpo.concatenated_forward(model, batch)
    losses, r_w, r_l = dpo.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta)
    autograd = torch.autograd.grad(losses.mean(), params)

    coeff = torch.sigmoid(r_l - r_w)  # the dynamic coefficient, one per pair
    assert (coeff - 0.5).abs().max() > 1e-3  # rewards are non-zero, so the coefficient is not trivially 1/2
    closed = [torch.zeros_like(p) for p in params]
    B = batch["chosen_input_ids"].shape[0]
    for i in range(B):  # each log pi(y | x) on its own: one sequence, one gradient
        for side, sign in (("chosen", 1.0), ("rejected", -1.0)):
            logits = model(input_ids=batch[f"{side}_input_ids"][i:i + 1],
                           attention_mask=batch[f"{side}_attention_mask"][i:i + 1]).logits
            grads = torch.autograd.grad(torch_sequence_logps(logits, batch[f"{side}_labels"][i:i + 1]).sum(), params)
            for total, g in zip(closed, grads):
                total.add_(-beta / B * coeff[i] * sign * g)
    for a, c in zip(autograd, closed):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-6)
    assert max(a.abs().max() for a in autograd) > 1e-4


def test_metrics_are_trls_definitions():
    m = dpo.reward_metrics(torch.tensor([1.0, -1.0, 0.5]), torch.tensor([0.0, 0.0, 0.5]))
    assert m == pytest.approx({"rewards/chosen": 1 / 6, "rewards/rejected": 1 / 6,
                               "rewards/margins": 0.0, "rewards/accuracies": 1 / 3})


def test_loss_is_stable_for_huge_margins():
    big, zero = torch.tensor([2e4]), torch.zeros(1)
    losses, _, _ = dpo.dpo_loss(-big, zero, zero, zero, beta=1.0)
    torch.testing.assert_close(losses, big)  # -log sigma(-2e4) = 2e4, not inf
    losses, _, _ = dpo.dpo_loss(zero, -big, zero, zero, beta=1.0)
    assert losses.item() == 0.0


# ---------------------------------------------------------------- bad input

def four(n=2):
    return [torch.zeros(n) for _ in range(4)]


@pytest.mark.parametrize("beta, error, match", [
    (0, ValueError, "beta must be > 0"), (-0.1, ValueError, "beta must be > 0"),
    (float("nan"), ValueError, "beta must be finite and > 0"), (float("inf"), ValueError, "beta must be finite and > 0"),
    (True, TypeError, "beta must be a real number"), ("0.1", TypeError, "beta must be a real number"),
    (None, TypeError, "beta must be a real number"),
])
def test_beta_must_be_a_positive_number(beta, error, match):
    with pytest.raises(error, match=match):
        dpo.dpo_loss(*four(), beta=beta)


def test_mismatched_batch_sizes_are_named():
    args = four()
    args[3] = torch.zeros(3)
    with pytest.raises(ValueError, match="mismatched batch sizes"):
        dpo.dpo_loss(*args)


def test_mismatched_chosen_and_rejected_batches(small_batch):
    short = {k: (v[:2] if k.startswith("rejected") else v) for k, v in small_batch.items()}
    with pytest.raises(ValueError, match="mismatched batch sizes: 3 chosen and 2 rejected"):
        dpo.concatenated_forward(tiny(0, 256), short)


def test_dpo_loss_input_types_shapes_and_values():
    with pytest.raises(TypeError, match="policy_chosen_logps must be a torch.Tensor"):
        dpo.dpo_loss([0.0], *four(1)[1:])
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        dpo.dpo_loss(torch.zeros(2, 1), *four()[1:])
    args = four()
    args[1] = torch.tensor([0.0, -float("inf")])
    with pytest.raises(ValueError, match="policy_rejected_logps has non-finite"):
        dpo.dpo_loss(*args)


def test_labels_with_no_response_token_are_an_error():
    labels = torch.tensor([[-100, -100, 3, 4], [7, -100, -100, -100]])  # row 1's only label is dropped by the shift
    with pytest.raises(ValueError, match=r"labels rows \[1\] have no response token"):
        dpo.sequence_logps(torch.randn(2, 4, 9), labels)


def test_a_pair_with_no_response_token_in_a_batch(small_batch):
    broken = dict(small_batch)
    broken["rejected_labels"] = small_batch["rejected_labels"].clone()
    broken["rejected_labels"][2] = -100
    with pytest.raises(ValueError, match=r"labels rows \[5\] have no response token"):
        dpo.concatenated_forward(tiny(0, 256), broken)


def test_sequence_logps_shape_and_range_errors():
    with pytest.raises(ValueError, match=r"labels must have shape \(2, 4\) to match logits"):
        dpo.sequence_logps(torch.randn(2, 4, 9), torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="logits must be a floating"):
        dpo.sequence_logps(torch.randn(2, 4), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="token ids in"):
        dpo.sequence_logps(torch.randn(1, 3, 9), torch.tensor([[0, 9, 1]]))
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        dpo.sequence_logps(torch.randn(1, 3, 9), torch.zeros(1, 3))


def test_batch_keys_and_a_reference_are_required(small_batch):
    with pytest.raises(ValueError, match="missing"):
        dpo.concatenated_forward(tiny(0, 256), {"chosen_input_ids": small_batch["chosen_input_ids"]})
    with pytest.raises(ValueError, match="pass ref_model"):
        dpo.reference_logps(tiny(0, 256), small_batch)
    with pytest.raises(ValueError, match="beta"):
        dpo.compute_loss(tiny(0, 256), small_batch, beta=0, ref_model=tiny(1, 256))


def test_token_logratios_sum_to_the_policy_minus_the_reference(small_batch):
    # The reference: torch's cross-entropy of the trained policy and of a separate copy of the base model.
    base = tiny(0, 256)
    policy = with_lora(copy.deepcopy(base), scale=0.5)
    want = []
    with torch.no_grad():
        for net in (policy, base):
            want.append(torch.cat([torch_sequence_logps(net(input_ids=small_batch[f"{s}_input_ids"],
                                                            attention_mask=small_batch[f"{s}_attention_mask"]).logits,
                                                        small_batch[f"{s}_labels"]) for s in ("chosen", "rejected")]))
    for ref_model in (None, base):        # adapters off, or the separate copy
        ratios, mask = dpo.token_logratios(policy, small_batch, ref_model=ref_model)
        assert (ratios[~mask] == 0).all()
        torch.testing.assert_close(ratios.sum(1), want[0] - want[1], rtol=1e-5, atol=1e-4)
    assert not torch.allclose(want[0], want[1], atol=1e-2), "the adapters changed the policy"


# ---------------------------------------------------------------- the top layers' batch

def three_layers(seed=0, targets=("q_proj", "v_proj"), scale=0.2):
    """A 3-layer tiny model (vocabulary 256) with LoRA on ``targets``, B made non-zero."""
    model = models.tiny_model(seed=seed, vocab_size=256, num_hidden_layers=3)
    lora.apply_lora(model, list(targets), r=4, lora_alpha=8)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in lora.lora_layers(model):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * scale)
    return model


def top_only(k, n=3):
    """LoRA targets on the last k of n layers only: the layers below stay the reference's."""
    return tuple(f"layers.{i}.self_attn.{name}" for i in range(n - k, n) for name in ("q_proj", "v_proj"))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_top_layer_batch_on_the_shared_top_layers_gives_the_full_models_logps(small_batch, k):
    model = three_layers(targets=top_only(k))  # adapters on the top k layers only
    top = models.top_layers(model, k, share=True)
    top_batch = dpo.top_layer_batch(model, small_batch, k)
    with torch.no_grad():
        got = torch.stack(dpo.concatenated_forward(top, top_batch))
        want = torch.stack([torch_sequence_logps(model(input_ids=small_batch[f"{s}_input_ids"],
                                                       attention_mask=small_batch[f"{s}_attention_mask"]).logits,
                                                 small_batch[f"{s}_labels"]) for s in ("chosen", "rejected")])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("k", [1, 3])
def test_top_layer_batch_holds_the_hidden_states_entering_layer_L_minus_k(small_batch, k):
    model = three_layers(targets=top_only(k))
    [with_ref] = dpo.with_reference_logps(model, [small_batch])
    top_batch = dpo.top_layer_batch(model, with_ref, k)
    assert set(top_batch) == {key.replace("_input_ids", "_inputs_embeds") for key in with_ref}
    for key, value in with_ref.items():  # masks, labels and reference log-probabilities are kept as they are
        if not key.endswith("_input_ids"):
            assert torch.equal(top_batch[key], value), key
    for side in ("chosen", "rejected"):
        with torch.no_grad():
            hidden = model(input_ids=small_batch[f"{side}_input_ids"],
                           attention_mask=small_batch[f"{side}_attention_mask"],
                           output_hidden_states=True).hidden_states  # hidden_states[i] enters layer i
        embeds = top_batch[f"{side}_inputs_embeds"]
        assert embeds.shape == (3, 12, model.config.hidden_size) and not embeds.requires_grad
        real = small_batch[f"{side}_attention_mask"].bool()
        torch.testing.assert_close(embeds[real], hidden[3 - k][real])
    if k == 3:  # the layers' input is the token embedding
        torch.testing.assert_close(top_batch["chosen_inputs_embeds"],
                                   model.get_input_embeddings()(small_batch["chosen_input_ids"]))


def test_dpo_through_the_shared_top_layers_is_the_full_models_dpo(small_batch):
    # With adapters only on the top layer, the reference (adapters off) needs no other layer either.
    model = three_layers(targets=top_only(1), scale=1.0)
    top = models.top_layers(model, 1, share=True)
    top_batch = dpo.top_layer_batch(model, small_batch, 1)
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == 4
    full_loss, full_metrics = dpo.compute_loss(model, small_batch, beta=0.5)
    want = torch.autograd.grad(full_loss, params)
    top_loss, top_metrics = dpo.compute_loss(top, top_batch, beta=0.5)
    got = torch.autograd.grad(top_loss, params)  # the model's own LoRA parameters, through the copy
    torch.testing.assert_close(top_loss, full_loss)
    assert top_metrics == pytest.approx(full_metrics, abs=1e-5)
    assert abs(full_loss.item() - math.log(2)) > 1e-3  # the adapters move the policy off its reference
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_top_layer_batch_refuses_adapters_below_the_top_layers(small_batch):
    # Their effect would be baked into the cached hidden states, where switching the
    # adapters off (the reference) could not reach it.
    model = three_layers()  # adapters in all 3 layers
    with pytest.raises(ValueError, match="LoRA adapters below its top 2 layers"):
        dpo.top_layer_batch(model, small_batch, 2)
    assert dpo.top_layer_batch(model, small_batch, 3)  # k = L: nothing below


def test_top_layer_batch_refuses_a_batch_of_hidden_states(small_batch):
    model = three_layers(targets=top_only(1))
    top_batch = dpo.top_layer_batch(model, small_batch, 1)
    with pytest.raises(ValueError, match="batch already holds inputs_embeds"):
        dpo.top_layer_batch(model, top_batch, 1)
    with pytest.raises(ValueError, match="missing"):
        dpo.top_layer_batch(model, {"chosen_input_ids": small_batch["chosen_input_ids"]}, 1)
    with pytest.raises(ValueError, match=r"k must be in \[1, 3\]"):
        dpo.top_layer_batch(model, small_batch, 4)


# ---------------------------------------------------------------- held-out evaluation

SIDES = ("chosen", "rejected")


def rows(batch, lo, hi):
    return {key: value[lo:hi] for key, value in batch.items()}


def plain_eval(model, batches, stop_token_id=None):
    """The reference: separate forwards of each side with adapters on and off, torch's cross-entropy and KL."""
    from torch.distributions import Categorical, kl_divergence

    got = {key: [] for key in ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps",
                               "p_stop", "p_stop_ref")}
    kl, tokens = 0.0, 0
    got["chosen_kl"], got["rejected_kl"] = [], []
    model.eval()
    with torch.no_grad():
        for batch in batches:
            for side in SIDES:
                ids, mask, labels = (batch[f"{side}_{n}"] for n in ("input_ids", "attention_mask", "labels"))
                policy = model(input_ids=ids, attention_mask=mask).logits
                with lora.disable_lora(model):
                    ref = model(input_ids=ids, attention_mask=mask).logits
                got[f"{side}_logps"].append(torch_sequence_logps(policy, labels))
                got[f"ref_{side}_logps"].append(torch_sequence_logps(ref, labels))
                answer = labels[:, 1:] != -100  # position t predicts label t + 1
                per_token = kl_divergence(Categorical(logits=policy[:, :-1]), Categorical(logits=ref[:, :-1]))
                got[f"{side}_kl"].append((per_token * answer).sum(1))  # summed over each answer's tokens
                kl += per_token[answer].sum().item()
                tokens += int(answer.sum())
                if side == "chosen" and stop_token_id is not None:
                    for row in range(len(ids)):
                        t = int(((labels[row] == stop_token_id) & (labels[row] != -100)).nonzero()[0])
                        got["p_stop"].append(policy[row, t - 1].softmax(-1)[stop_token_id].item())
                        got["p_stop_ref"].append(ref[row, t - 1].softmax(-1)[stop_token_id].item())
    out = {key: torch.cat(value) for key, value in got.items() if key.endswith(("logps", "_kl"))}
    if stop_token_id is not None:
        out["p_stop"], out["p_stop_ref"] = torch.tensor(got["p_stop"]), torch.tensor(got["p_stop_ref"])
    return out, kl / tokens


def test_preference_eval_equals_plain_forwards_with_and_without_the_adapters(small_batch):
    model = with_lora(models.tiny_model(seed=0, vocab_size=256), scale=0.3)
    batches = [rows(small_batch, 0, 2), rows(small_batch, 2, 3)]
    want, want_kl = plain_eval(model, batches)
    model.train()
    got = dpo.preference_eval(model, iter(batches))  # any iterable of batches, read once
    assert model.training  # the model's mode is restored
    assert set(got) == {"chosen_logratio", "rejected_logratio", "chosen_logps", "rejected_logps", "ref_chosen_logps",
                        "ref_rejected_logps", "chosen_kl", "rejected_kl", "kl", "accuracy"}
    for key, value in want.items():
        assert got[key].shape == (3,), key
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-4)
    for side in SIDES:
        torch.testing.assert_close(got[f"{side}_logratio"], want[f"{side}_logps"] - want[f"ref_{side}_logps"],
                                   rtol=1e-5, atol=1e-4)
    assert got["kl"] == pytest.approx(want_kl, rel=1e-4, abs=1e-7)
    assert got["kl"] > 1e-4  # the adapters moved the policy
    assert (got["chosen_kl"] > 0).all() and (got["rejected_kl"] > 0).all()
    ratios = [want[f"{side}_logps"] - want[f"ref_{side}_logps"] for side in SIDES]
    assert got["accuracy"] == pytest.approx((ratios[0] > ratios[1]).float().mean().item())
    assert isinstance(got["kl"], float) and isinstance(got["accuracy"], float)


def test_preference_eval_runs_in_eval_mode_and_of_an_untrained_policy_is_the_reference(small_batch):
    model = models.tiny_model(seed=0, vocab_size=256)
    lora.apply_lora(model, ["q_proj", "v_proj"], r=4, lora_alpha=8, lora_dropout=0.5)  # B = 0: policy = reference
    model.train()
    first = dpo.preference_eval(model, [small_batch])
    second = dpo.preference_eval(model, [small_batch])
    for key in ("chosen_logps", "rejected_logps"):  # no dropout: the same numbers twice
        assert torch.equal(first[key], second[key])
    for side in SIDES:
        assert torch.equal(first[f"{side}_logratio"], torch.zeros(3))
    assert first["kl"] == pytest.approx(0.0, abs=1e-6) and first["accuracy"] == 0.0


def with_stop_token(batch, stop):
    """small_batch with ``stop`` written into its chosen rows: in a prompt (no label), and twice into an answer."""
    batch = {key: value.clone() for key, value in batch.items()}
    ids, labels = batch["chosen_input_ids"], batch["chosen_labels"]
    for row, t in ((0, 1), (0, 5), (0, 6), (1, 7), (2, 2), (2, 5), (2, 8)):  # answers start at 4, 6, 5
        ids[row, t] = stop
        if labels[row, t] != -100:
            labels[row, t] = stop
    return batch


def test_p_stop_is_the_softmax_of_the_stop_token_at_its_first_answer_position(small_batch):
    model = with_lora(models.tiny_model(seed=0, vocab_size=256), scale=0.3)
    batch = with_stop_token(small_batch, 1)
    want, _ = plain_eval(model, [batch], stop_token_id=1)
    # The first stop token of each chosen answer is at 5, 7, 5: by hand, position t - 1 predicts it.
    with torch.no_grad():
        logits = model(input_ids=batch["chosen_input_ids"], attention_mask=batch["chosen_attention_mask"]).logits
    by_hand = torch.stack([logits[0, 4], logits[1, 6], logits[2, 4]]).softmax(-1)[:, 1]
    torch.testing.assert_close(want["p_stop"], by_hand)
    got = dpo.preference_eval(model, [rows(batch, 0, 1), rows(batch, 1, 3)], stop_token_id=np.int64(1))
    for key in ("p_stop", "p_stop_ref"):
        assert got[key].shape == (3,) and ((got[key] > 0) & (got[key] < 1)).all()
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-7)
    assert not torch.allclose(got["p_stop"], got["p_stop_ref"])


def test_preference_eval_of_the_shared_top_layers_is_the_full_models(small_batch):
    k = 2
    model = three_layers(targets=top_only(k), scale=1.0)
    batch = with_stop_token(small_batch, 1)
    want, want_kl = plain_eval(model, [batch], stop_token_id=1)
    top = models.top_layers(model, k, share=True)
    got = dpo.preference_eval(top, [dpo.top_layer_batch(model, batch, k)], stop_token_id=1)
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-4)
    assert got["kl"] == pytest.approx(want_kl, rel=1e-4, abs=1e-7) and got["kl"] > 1e-4


def test_preference_eval_with_cached_reference_distributions_is_the_same_without_the_reference(small_batch):
    model = with_lora(models.tiny_model(seed=0, vocab_size=256), scale=0.3)
    batches = [rows(with_stop_token(small_batch, 1), 0, 2), rows(with_stop_token(small_batch, 1), 2, 3)]
    want, want_kl = plain_eval(model, batches, stop_token_id=1)
    cached = dpo.with_reference_logps(model, batches, distributions=True)
    for batch, plain in zip(cached, dpo.with_reference_logps(model, batches)):
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            torch.testing.assert_close(batch[key], plain[key], rtol=1e-5, atol=1e-5)
        labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
        answer = labels[:, 1:] != -100
        ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
        mask = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
        with torch.no_grad(), lora.disable_lora(model):
            logits = model(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(batch["ref_token_logprobs"], logits[:, :-1][answer].log_softmax(-1),
                                   rtol=1e-5, atol=1e-5)
    calls = []
    hook = model.register_forward_hook(lambda module, args, output: calls.append(lora.lora_layers(module)[0].enabled))
    try:
        got = dpo.preference_eval(model, cached, stop_token_id=1)
    finally:
        hook.remove()
    assert calls == [True, True]  # the policy ran, once a batch; the reference never did
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-4)
    assert got["kl"] == pytest.approx(want_kl, rel=1e-4, abs=1e-7) and got["kl"] > 1e-4
    with pytest.raises(ValueError, match=r"ref_token_logprobs has shape \(\d+, 256\), but this batch has"):
        dpo.preference_eval(model, [{**cached[0], "ref_token_logprobs": cached[1]["ref_token_logprobs"]}])
    with pytest.raises(TypeError, match="distributions must be True or False"):
        dpo.with_reference_logps(model, batches, distributions=1)


def test_preference_eval_refusals(small_batch):
    model = with_lora(models.tiny_model(seed=0, vocab_size=256))
    with pytest.raises(ValueError, match="a chosen answer has no stop token 1"):
        dpo.preference_eval(model, [small_batch], stop_token_id=1)
    with pytest.raises(ValueError, match="stop_token_id must be >= 0"):
        dpo.preference_eval(model, [small_batch], stop_token_id=-1)
    with pytest.raises(TypeError, match="stop_token_id must be an integer"):
        dpo.preference_eval(model, [small_batch], stop_token_id="1")
    with pytest.raises(ValueError, match="batches is empty"):
        dpo.preference_eval(model, [])
    with pytest.raises(ValueError, match="cannot serve as its own reference"):
        dpo.preference_eval(models.tiny_model(seed=0, vocab_size=256), [small_batch])


# ---------------------------------------------------------------- refusals

@pytest.mark.parametrize("text, refusal", [
    ("I can't help with that.", True),
    ("I can\u2019t help with that request.", True),  # a curly apostrophe
    ("I\u2019m sorry, but I cannot share that.", True),
    ("I'm sorry, but that is not something I can do.", True),
    ("I cannot provide instructions for that. Is there anything else?", True),
    ("  I WON'T do that!", True),  # leading space, capitals
    ("Sorry, I am unable to assist with this.", True),
    ("As an AI, I do not have opinions.", True),
    ("I am not able to help with that.", True),
    ("You can't divide by zero, so the expression is undefined.", False),
    ("The capital of France is Paris. I'm sorry if that was obvious.", False),  # a later "I'm sorry"
    ("Sure! Here is how to do it. I can't stress enough how easy it is.", False),
    ("Water boils at 100 degrees Celsius at sea level.", False),
    ("", False),
    ("   ", False),
])
def test_is_refusal_reads_the_first_sentence(text, refusal):
    assert dpo.is_refusal(text) is refusal
    assert "i can't" in dpo.REFUSAL_MARKERS and "i'm sorry" in dpo.REFUSAL_MARKERS


@pytest.mark.parametrize("text", [None, b"I can't help with that.", ["I can't."], 3])
def test_is_refusal_takes_only_a_str(text):
    with pytest.raises(TypeError, match="text must be a str"):
        dpo.is_refusal(text)


# ---------------------------------------------------------------- the data set

def test_preference_file_is_the_generators_output_and_teaches_one_rule():
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_preferences", data.data_dir() / "build_preferences.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    rows = data.read_jsonl("preferences.jsonl")
    # Everything but the model-written continuations is reproduced exactly by the builder.
    assert [{k: v for k, v in r.items() if k != "rejected"} for r in rows] == builder.questions()
    splits = {s: [r for r in rows if r["split"] == s] for s in ("train", "test")}
    assert len(splits["train"]) >= 60 and len(splits["test"]) >= 16
    assert not {r["prompt"] for r in splits["train"]} & {r["prompt"] for r in splits["test"]}
    for r in rows:  # one true sentence; the rejected answer goes on after it
        assert r["chosen"].endswith(".") and r["chosen"].count(".") == 1
        assert any(a.lower() in r["chosen"].lower() for a in r["answer"])
        assert r["rejected"].startswith(r["chosen"]) and r["rejected"][len(r["chosen"]):].strip()
        assert not re.search(r"\b[Aa] [aeiouAEIOU]", r["prompt"] + " " + r["chosen"]), "a octagon, a owlet"
