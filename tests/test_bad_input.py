"""Bad input to every public function of llmbook fails with a TypeError or ValueError that names the argument.

One table, one row per (function, bad argument): wrong kinds of value give a ``TypeError``,
values of the right kind outside the allowed range a ``ValueError``, and the message
names the argument (and, for a range, what is allowed). A second table checks that the
number forms a reader meets (NumPy scalars, 0-d tensors) are accepted and give what the
reference implementation (transformers, torch, PEFT's figures, a closed form) gives for
the plain Python number.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llmbook import data, distributed, dpo, extraction, grpo, hallucination as H, lora, losses, models, plots, ppo, prefix, rewards, sampling, train, utils, widgets

V = 16  # vocabulary of the small logits
TINY_V = 256  # vocabulary of models.tiny_model


@pytest.fixture(scope="module")
def tiny():
    return models.tiny_model(seed=0)


class Ctx:
    """What the table's calls need: small tensors, a tiny model, the real tokenizer."""

    def __init__(self, tiny, tokenizer, chat_model, tmp):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(2, V, generator=g)                      # (B, V) next-token logits
        self.logits = torch.randn(2, 5, V, generator=g)              # (B, T, V)
        self.labels = torch.randint(0, V, (2, 5), generator=g)       # (B, T)
        self.hidden = torch.randn(2, 5, 8, generator=g)              # (B, T, H)
        self.weight = torch.randn(V, 8, generator=g)                 # (V, H)
        self.ids = torch.randint(3, TINY_V, (2, 5), generator=g)     # prompts for the tiny model
        self.logps = torch.randn(3, generator=g) - 5                 # (B,) log-probabilities
        self.tiny, self.tok, self.chat_model = tiny, tokenizer, chat_model
        self.tmp = tmp

    def dpo_loss(self, **kwargs):
        args = dict(policy_chosen_logps=self.logps, policy_rejected_logps=self.logps - 1,
                    ref_chosen_logps=self.logps - 0.5, ref_rejected_logps=self.logps - 0.5)
        return dpo.dpo_loss(**{**args, **kwargs})

    def pref_batch(self, **overrides):
        ids = torch.randint(3, TINY_V, (2, 6))
        labels = ids.clone()
        labels[:, :3] = -100
        batch = {f"{side}_{name}": value.clone() for side in ("chosen", "rejected")
                 for name, value in (("input_ids", ids), ("attention_mask", torch.ones_like(ids)), ("labels", labels))}
        return {**batch, **overrides}

    def grpo_batch(self):
        """Two rows of a prompt (4 tokens) and a completion (3 tokens), ids of the tiny model."""
        return {"prompt_ids": torch.randint(3, TINY_V, (2, 4)), "prompt_mask": torch.ones(2, 4, dtype=torch.long),
                "completion_ids": torch.randint(3, TINY_V, (2, 3)), "completion_mask": torch.ones(2, 3, dtype=torch.long),
                "advantages": torch.tensor([1.0, -1.0])}

    def train(self, **kwargs):
        args = dict(steps=1, progress=False)
        return train.train(torch.nn.Linear(2, 1), [torch.randn(1, 2)], kwargs.pop("loss_fn", lambda m, b: m(b).sum()),
                           **{**args, **kwargs})

    def lora_linear(self, **kwargs):
        return lora.LoRALinear(torch.nn.Linear(16, 16), **{"r": 2, "lora_alpha": 4, **kwargs})

    def history(self):
        h = train.History()
        h.log(step=1, loss=2.0, grad_norm=1.0)
        h.log(step=2, loss=1.0, grad_norm=0.5)
        return h

    def file(self, name, content: bytes):
        path = self.tmp / name
        path.write_bytes(content)
        return path

    def qa_batch(self, **overrides):
        ids = torch.randint(3, TINY_V, (2, 6))
        labels = ids.clone()
        labels[:, :3] = -100
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
                "unknown": torch.tensor([True, False]), **overrides}


@pytest.fixture(scope="module")
def ctx(tiny, tokenizer, chat_model, tmp_path_factory):
    return Ctx(tiny, tokenizer, chat_model, tmp_path_factory.mktemp("files"))


# (id, call, error, pattern the message must match)
BAD = [
    # --- sampling
    ("temperature-str", lambda c: sampling.apply_temperature(c.x, "hot"), TypeError, "temperature must be a real number"),
    ("temperature-vector", lambda c: sampling.apply_temperature(c.x, torch.tensor([0.5, 1.0])), TypeError,
     r"temperature must be a real number \(a 0-d tensor at most\)"),
    ("temperature-zero", lambda c: sampling.apply_temperature(c.x, 0), ValueError, "temperature must be .*> 0"),
    ("temperature-nan-tensor", lambda c: sampling.sample_next_token(c.x, temperature=torch.tensor(math.nan)),
     ValueError, "temperature must be .*>= 0"),
    ("top_k-float", lambda c: sampling.top_k_filter(c.x, 2.0), TypeError, "top_k must be an integer"),
    ("top_k-np-zero", lambda c: sampling.top_k_filter(c.x, np.int64(0)), ValueError, "top_k must be >= 1"),
    ("top_k-bool-tensor", lambda c: sampling.top_k_filter(c.x, torch.tensor(True)), TypeError, "top_k must be an integer"),
    ("top_p-tensor-above-1", lambda c: sampling.top_p_filter(c.x, torch.tensor(1.5)), ValueError,
     r"top_p must be in \(0, 1\]"),
    ("top_p-nan", lambda c: sampling.top_p_filter(c.x, math.nan), ValueError, r"top_p must be .*in \(0, 1\]"),
    ("min_p-np-negative", lambda c: sampling.min_p_filter(c.x, np.float32(-0.1)), ValueError, r"min_p must be in \[0, 1\]"),
    ("min_tokens_to_keep-zero", lambda c: sampling.top_p_filter(c.x, 0.5, min_tokens_to_keep=0), ValueError,
     "min_tokens_to_keep must be >= 1"),
    ("generator-int", lambda c: sampling.sample_next_token(c.x, generator=0), TypeError, "generator must be a torch.Generator"),
    ("max_new_tokens-np-zero", lambda c: sampling.generate(c.tiny, c.ids, max_new_tokens=np.int64(0)), ValueError,
     "max_new_tokens must be >= 1"),
    ("generate-attention_mask-list", lambda c: sampling.generate(c.tiny, c.ids, max_new_tokens=2,
                                                                 attention_mask=[[1] * 5] * 2),
     TypeError, "attention_mask must be a torch.Tensor"),
    ("generate-input_ids-out-of-vocab", lambda c: sampling.generate(c.tiny, c.ids + TINY_V, max_new_tokens=2),
     ValueError, r"input_ids must hold token ids in \[0, 256\)"),
    ("generate-pad_token_id-negative", lambda c: sampling.generate(c.tiny, c.ids, max_new_tokens=2, eos_token_id=2,
                                                                   pad_token_id=-1),
     ValueError, r"pad_token_id must be in \[0, 255\]"),
    ("generate-eos-str", lambda c: sampling.generate(c.tiny, c.ids, max_new_tokens=2, eos_token_id=["a"]), TypeError,
     "eos_token_id"),
    ("generate-mask-right-padded", lambda c: sampling.generate(c.tiny, c.ids, max_new_tokens=2,
                                                               attention_mask=torch.tensor([[1] * 5, [1, 1, 1, 0, 0]])),
     ValueError, r"attention_mask rows \[1\] have padding after their tokens.*padding_side = 'left'"),
    ("generate-prefix-tensor", lambda c: sampling.generate(c.tiny, c.ids, max_new_tokens=2, prefix=c.ids[0]),
     TypeError, "prefix must be a SharedPrefix made by prefix_cache"),
    ("prefix_cache-out-of-vocab", lambda c: sampling.prefix_cache(c.tiny, [3, TINY_V]), ValueError,
     r"prefix_ids must be in \[0, 255\]"),
    ("prefix_cache-2d", lambda c: sampling.prefix_cache(c.tiny, c.ids), ValueError, "prefix_ids must be 1-D"),
    ("prefix_cache-empty", lambda c: sampling.prefix_cache(c.tiny, []), ValueError,
     "prefix_ids must hold at least one token id"),
    ("generate-mask-float", lambda c: sampling.generate(c.tiny, c.ids, max_new_tokens=2,
                                                        attention_mask=torch.tensor([[1.0] * 5, [0, 0, 0.5, 1, 1]])),
     TypeError, "attention_mask must be an integer or bool tensor of 0s and 1s"),
    ("generate-mask-all-zero-row", lambda c: sampling.generate(c.tiny, c.ids, max_new_tokens=2,
                                                               attention_mask=torch.tensor([[1] * 5, [0] * 5])),
     ValueError, r"attention_mask rows \[1\] are all 0"),
    ("generate-mask-value-2", lambda c: sampling.generate(c.tiny, c.ids, max_new_tokens=2,
                                                          attention_mask=torch.tensor([[1] * 5, [0, 0, 2, 1, 1]])),
     ValueError, "attention_mask must hold only 0 .* and 1"),
    ("generate-eos-out-of-vocab", lambda c: sampling.generate(c.tiny, c.ids, max_new_tokens=2, eos_token_id=10**6),
     ValueError, r"eos_token_id must be in \[0, 255\] \(a token of the model's vocabulary of 256\)"),
    ("generate-pad-out-of-vocab", lambda c: sampling.generate(c.tiny, c.ids, max_new_tokens=2, eos_token_id=2,
                                                              pad_token_id=TINY_V),
     ValueError, r"pad_token_id must be in \[0, 255\]"),
    ("generate-empty-batch", lambda c: sampling.generate(c.tiny, c.ids[:0], max_new_tokens=2), ValueError,
     r"input_ids must hold at least one prompt .*got shape \(0, 5\)"),
    ("temperature-overflows", lambda c: sampling.apply_temperature(c.x, 1e-320), ValueError,
     "temperature must be large enough that logits / temperature stays finite in torch.float32"),
    ("sample-temperature-overflows", lambda c: sampling.sample_next_token(c.x, temperature=1e-45), ValueError,
     "temperature must be large enough"),
    ("generate-temperature-overflows", lambda c: sampling.generate(c.tiny, c.ids, max_new_tokens=2, temperature=1e-320),
     ValueError, "temperature must be large enough"),
    # --- losses
    ("log_softmax-int", lambda c: losses.log_softmax(torch.arange(3)), TypeError, "logits must be a floating-point"),
    ("log_softmax-empty-vocabulary", lambda c: losses.log_softmax(torch.randn(2, 0)), ValueError,
     r"logits must have a non-empty dimension dim=-1"),
    ("log_softmax-dim-out-of-range", lambda c: losses.log_softmax(c.x, dim=5), ValueError,
     r"dim must be in \[-2, 1\] \(a dimension of logits of shape \(2, 16\)\)"),
    ("log_softmax-dim-float", lambda c: losses.log_softmax(c.x, dim=1.5), TypeError, "dim must be an integer"),
    ("selective-empty-vocabulary", lambda c: losses.selective_log_softmax(torch.randn(2, 0), torch.zeros(2, dtype=torch.long)),
     ValueError, "logits must have a non-empty last"),
    ("sft_loss-ignore_index-none", lambda c: losses.sft_loss(c.logits, c.labels, ignore_index=None), TypeError,
     "ignore_index must be an integer, got NoneType"),
    ("chunked-ignore_index-none", lambda c: losses.chunked_sft_loss(c.hidden, c.weight, c.labels, ignore_index=None),
     TypeError, "ignore_index must be an integer"),
    ("sft_loss-ignore_index-float", lambda c: losses.sft_loss(c.logits, c.labels, ignore_index=-100.5), TypeError,
     "ignore_index must be an integer"),
    ("sft_loss-no-response", lambda c: losses.sft_loss(c.logits, torch.full((2, 5), -100)), ValueError,
     "no response token"),
    ("sft_loss-labels-shape", lambda c: losses.sft_loss(c.logits, c.labels[:1]), ValueError,
     r"labels must have shape \(2, 5\)"),
    ("selective-index-float", lambda c: losses.selective_log_softmax(c.x, torch.zeros(2)), TypeError,
     "index must be an integer tensor"),
    ("per_token_logps-float-labels", lambda c: losses.per_token_logps(c.logits, c.labels.float()), TypeError,
     "labels must be an integer tensor"),
    ("chunk_size-float", lambda c: losses.chunked_sft_loss(c.hidden, c.weight, c.labels, chunk_size=2.5), TypeError,
     "chunk_size must be an integer"),
    ("chunk_size-zero", lambda c: losses.chunked_sft_loss(c.hidden, c.weight, c.labels, chunk_size=0), ValueError,
     "chunk_size must be >= 1"),
    # --- dpo
    ("beta-np-zero", lambda c: c.dpo_loss(beta=np.float32(0)), ValueError, "beta must be .*> 0"),
    ("beta-str", lambda c: c.dpo_loss(beta="0.1"), TypeError, "beta must be a real number"),
    ("beta-inf", lambda c: c.dpo_loss(beta=math.inf), ValueError, "beta must be finite"),
    ("dpo-mismatched-batch", lambda c: c.dpo_loss(ref_rejected_logps=c.logps[:2]), ValueError,
     "mismatched batch sizes"),
    ("dpo-integer-logps", lambda c: c.dpo_loss(policy_chosen_logps=torch.tensor([-3, -4, -5])), TypeError,
     "policy_chosen_logps must be a floating-point tensor"),
    ("dpo-list-logps", lambda c: c.dpo_loss(ref_chosen_logps=[-1.0, -2.0, -3.0]), TypeError,
     "ref_chosen_logps must be a torch.Tensor"),
    ("sequence_logps-empty-row", lambda c: dpo.sequence_logps(c.logits, torch.cat([c.labels[:1], torch.full((1, 5), -100)])),
     ValueError, r"labels rows \[1\] have no response token"),
    ("batch-list-values", lambda c: dpo.concatenated_inputs(c.pref_batch(chosen_input_ids=[[1, 2, 3]])), TypeError,
     "chosen_input_ids must be a torch.Tensor"),
    ("batch-sides-unequal-length", lambda c: (lambda b: dpo.concatenated_inputs({**b, **{
        f"rejected_{n}": b[f"rejected_{n}"][:, :-1] for n in ("input_ids", "attention_mask", "labels")}}))(c.pref_batch()),
     ValueError, "chosen and rejected must be padded to one length"),
    ("compute_loss-record-tuple", lambda c: dpo.compute_loss(c.tiny, c.pref_batch(), record=()), TypeError,
     "record must be a list"),
    ("batch-mismatched", lambda c: (lambda b: dpo.concatenated_inputs({**b, **{
        f"rejected_{n}": b[f"rejected_{n}"][:1] for n in ("input_ids", "attention_mask", "labels")}}))(c.pref_batch()),
     ValueError, "mismatched batch sizes"),
    ("compute_loss-one-reference", lambda c: dpo.compute_loss(c.tiny, c.pref_batch(ref_chosen_logps=-torch.ones(2))),
     ValueError, "batch holds ref_chosen_logps but not the other reference log-probabilities"),
    ("dpo-positive-logps", lambda c: c.dpo_loss(ref_rejected_logps=torch.tensor([-1.0, 0.5, -2.0])), ValueError,
     r"ref_rejected_logps has positive values \(largest 0.5\); the log-probability of an answer is at most 0"),
    ("compute_loss-beta-negative", lambda c: dpo.compute_loss(c.tiny, c.pref_batch(), beta=-1), ValueError,
     "beta must be .*> 0"),
    ("dpo-empty-batch", lambda c: c.dpo_loss(**{k: c.logps[:0] for k in ("policy_chosen_logps", "policy_rejected_logps",
                                                                          "ref_chosen_logps", "ref_rejected_logps")}),
     ValueError, r"policy_chosen_logps and the others are empty \(B = 0\)"),
    ("concatenated_forward-empty-batch", lambda c: dpo.concatenated_forward(c.tiny, {k: v[:0] for k, v in
                                                                                     c.pref_batch().items()}),
     ValueError, r"batch holds no pairs \(chosen_input_ids has 0 rows\)"),
    ("sequence_logps-ignore_index-none", lambda c: dpo.sequence_logps(c.logits, c.labels, ignore_index=None), TypeError,
     "ignore_index must be an integer"),
    ("reward_metrics-list", lambda c: dpo.reward_metrics([1.0], [0.0]), TypeError, "chosen_rewards must be a torch.Tensor"),
    ("reward_metrics-empty", lambda c: dpo.reward_metrics(torch.zeros(0), torch.zeros(0)), ValueError,
     r"chosen_rewards must have shape \(B,\) with B >= 1"),
    ("logits_to_keep-list", lambda c: losses.logits_to_keep([[1, 2]]), TypeError, "labels must be a torch.Tensor"),
    ("logits_to_keep-float", lambda c: losses.logits_to_keep(torch.zeros(2, 3)), TypeError,
     "labels must be an integer tensor"),
    ("logits_to_keep-1d", lambda c: losses.logits_to_keep(torch.tensor([1, 2, 3])), ValueError,
     r"labels must have shape \(B, T\)"),
    ("logits_to_keep-no-answer", lambda c: losses.logits_to_keep(torch.full((2, 3), -100)), ValueError,
     "labels has no response token at all"),
    ("response_loss-no-labels", lambda c: losses.response_loss(c.tiny, {"input_ids": c.labels}), TypeError,
     "batch must be a dict with 'labels'"),
    ("top_layers-k-zero", lambda c: models.top_layers(c.tiny, 0), ValueError, r"k must be in \[1, 2\]"),
    ("top_layers-k-too-many", lambda c: models.top_layers(c.tiny, 99), ValueError, r"k must be in \[1, 2\], got 99"),
    ("top_layers-not-a-decoder", lambda c: models.top_layers(torch.nn.Linear(2, 2), 1), TypeError,
     "model must be a transformers decoder"),
    ("top_layer_inputs-no-input-ids", lambda c: models.top_layer_inputs(c.tiny, {"labels": c.labels}, 1), TypeError,
     "batch must be a dict with input_ids"),
    ("top_layers-share-str", lambda c: models.top_layers(c.tiny, 1, share="yes"), TypeError,
     r"share must be True or False, got str \('yes'\)"),
    ("top_layers-share-int", lambda c: models.top_layers(c.tiny, 1, share=1), TypeError, "share must be True or False"),
    ("top_layer_batch-inputs_embeds", lambda c: dpo.top_layer_batch(c.tiny, dpo.top_layer_batch(c.tiny, c.pref_batch(), 1),
                                                                    1),
     ValueError, "batch already holds inputs_embeds"),
    ("top_layer_batch-k-too-many", lambda c: dpo.top_layer_batch(c.tiny, c.pref_batch(), 3), ValueError,
     r"k must be in \[1, 2\], got 3"),
    ("preference_eval-stop_token_id-negative", lambda c: dpo.preference_eval(c.tiny, [c.pref_batch()], stop_token_id=-1),
     ValueError, "stop_token_id must be >= 0, got -1"),
    ("preference_eval-stop_token_id-float", lambda c: dpo.preference_eval(c.tiny, [c.pref_batch()], stop_token_id=1.5),
     TypeError, "stop_token_id must be an integer"),
    ("preference_eval-no-batches", lambda c: dpo.preference_eval(c.tiny, []), ValueError, "batches is empty"),
    ("preference_eval-no-lora", lambda c: dpo.preference_eval(c.tiny, [c.pref_batch()]), ValueError,
     "model has no LoRA layers, so it cannot serve as its own reference"),
    ("is_refusal-none", lambda c: dpo.is_refusal(None), TypeError, "text must be a str, got NoneType"),
    ("singular_spectra-empty", lambda c: plots.singular_spectra({}, [1.0]), ValueError,
     "spectra must hold at least one"),
    ("token_losses-lengths-differ", lambda c: plots.token_losses(None, [1.0], [True, False], ["a"]), ValueError,
     "one entry per token"),
    ("token_strip-highlight-length", lambda c: plots.token_strip(None, ["a"], 0, "row", [True, False]), ValueError,
     "highlight must have one entry per token"),
    ("prefix_layout-prompt-longer-than-tokens", lambda c: plots.prefix_layout(["a"], n_virtual=1, n_prompt=2,
                                                                              num_layers=2), ValueError, "n_prompt"),
    ("progress-desc-not-str", lambda c: utils.progress(range(3), desc=3), TypeError, "desc must be a str"),
    ("shared_prefix-group-does-not-divide",
     lambda c: losses.shared_prefix({"input_ids": c.labels.clamp(min=0).repeat(2, 1)}, 3),
     ValueError, r"group_size \(3\) must divide the batch's 4 rows"),
    ("shared_prefix-group-too-large", lambda c: losses.shared_prefix({"input_ids": c.labels.clamp(min=0)}, 3),
     ValueError, "group_size must be"),
    ("shared_prefix-no-inputs", lambda c: losses.shared_prefix({"labels": c.labels}), TypeError,
     "batch must hold the model's inputs"),
    ("shared_prefix-claim-not-a-pair", lambda c: losses.answer_logps(c.tiny, {"input_ids": c.labels.clamp(min=0),
                                                                              "labels": c.labels,
                                                                              "shared_prefix": 3}),
     TypeError, r"shared_prefix must be a pair \(positions, group_size\)"),
    ("answer_logps-no-labels", lambda c: losses.answer_logps(c.tiny, {"input_ids": c.labels}), TypeError,
     "batch must be a dict with 'labels'"),
    ("answer_logps-float-labels", lambda c: losses.answer_logps(c.tiny, {"input_ids": c.labels.clamp(min=0),
                                                                        "labels": c.labels.float()}), TypeError,
     "labels must be an integer tensor"),
    ("token_logratios-no-lora", lambda c: dpo.token_logratios(c.tiny, c.pref_batch()), ValueError,
     "model has no LoRA layers, so it cannot serve as its own reference"),
    ("reference_logps-no-lora", lambda c: dpo.reference_logps(c.tiny, c.pref_batch()), ValueError,
     "model has no LoRA layers, so it cannot serve as its own reference: pass ref_model"),
    ("with_reference_logps-no-lora", lambda c: dpo.with_reference_logps(c.tiny, [c.pref_batch()]), ValueError,
     "cannot serve as its own reference"),
    # --- lora
    ("r-float", lambda c: c.lora_linear(r=2.5), TypeError, "r must be an integer"),
    ("r-np-zero", lambda c: c.lora_linear(r=np.int64(0)), ValueError, "r must be >= 1"),
    ("r-too-large", lambda c: c.lora_linear(r=100), ValueError, r"r must be at most min\(in_features, out_features\) = 16"),
    ("lora_alpha-inf", lambda c: c.lora_linear(lora_alpha=math.inf), ValueError, "lora_alpha must be finite and > 0"),
    ("lora_alpha-overflows-float32", lambda c: c.lora_linear(lora_alpha=1e39), ValueError,
     r"lora_alpha \(1e\+39\) makes the scaling alpha/r = 5e\+38 larger than torch.float32 can hold"),
    ("dpo-labels-disagree", lambda c: dpo.concatenated_forward(c.tiny, c.pref_batch(
        chosen_labels=torch.tensor([[-100, -100, -100, 5, 6, 7], [-100, -100, -100, 5, 6, 7]]))), ValueError,
     r"chosen_labels rows \[0, 1\] disagree with chosen_input_ids"),
    ("lora_alpha-str", lambda c: c.lora_linear(lora_alpha="8"), TypeError, "lora_alpha must be a real number"),
    ("lora_alpha-zero", lambda c: c.lora_linear(lora_alpha=0), ValueError, "lora_alpha must be .*> 0"),
    ("lora_dropout-str", lambda c: c.lora_linear(lora_dropout="0.1"), TypeError, "lora_dropout must be a real number"),
    ("lora_dropout-one", lambda c: c.lora_linear(lora_dropout=1.0), ValueError, r"lora_dropout must be in \[0, 1\)"),
    ("target_modules-int", lambda c: lora.apply_lora(models.tiny_model(), 5, r=2, lora_alpha=4), TypeError,
     "target_modules must be"),
    ("apply_lora-r-zero", lambda c: lora.apply_lora(models.tiny_model(), ["q_proj"], r=0, lora_alpha=4), ValueError,
     "r must be >= 1"),
    ("apply_lora-tied-lm_head", lambda c: lora.apply_lora(models.tiny_model(), ["lm_head"], r=2, lora_alpha=4), ValueError,
     r"'lm_head', whose weight is tied to 'model.embed_tokens.weight'.*untie it first"),
    ("apply_lora-model-str", lambda c: lora.apply_lora("model", ["q_proj"], r=2, lora_alpha=4), TypeError,
     "model must be a torch.nn.Module"),
    ("count_parameters-str", lambda c: lora.count_parameters("model"), TypeError, "model must be a torch.nn.Module"),
    ("merge_lora-str", lambda c: lora.merge_lora("model"), TypeError, "model must be a torch.nn.Module"),
    ("unmerge_lora-no-lora", lambda c: lora.unmerge_lora(models.tiny_model()), ValueError,
     "model has no LoRA layers to unmerge"),
    ("disable_lora-no-lora", lambda c: lora.disable_lora(models.tiny_model()).__enter__(), ValueError,
     "model has no LoRA layers to disable"),
    ("lora_layers-str", lambda c: lora.lora_layers("model"), TypeError, "model must be a torch.nn.Module"),
    ("LoRALinear-base-conv", lambda c: lora.LoRALinear(torch.nn.Conv1d(4, 4, 1), 2, 4), TypeError,
     "base must be an nn.Linear"),
    # --- prefix
    ("num_virtual_tokens-bool", lambda c: prefix.prefix_parameter_count(True, 2, 8), TypeError,
     "num_virtual_tokens must be an integer"),
    ("kv_dim-float", lambda c: prefix.prefix_parameter_count(3, 2, 2.5), TypeError, "kv_dim must be an integer"),
    ("num_layers-zero", lambda c: prefix.prefix_parameter_count(3, 0, 8), ValueError, "num_layers must be >= 1"),
    ("projection_dim-tensor-zero", lambda c: prefix.PrefixEncoder(3, 2, 2, 16, projection_dim=torch.tensor(0)),
     ValueError, "projection_dim must be >= 1"),
    ("head_dim-str", lambda c: prefix.PrefixEncoder(3, 2, 2, "16"), TypeError, "head_dim must be an integer"),
    ("prefix-model-zero-tokens", lambda c: prefix.PrefixTuningModel(c.tiny, 0), ValueError,
     "num_virtual_tokens must be >= 1"),
    ("prefix_cache-batch_size-zero", lambda c: prefix.PrefixTuningModel(c.tiny, 2).prefix_cache(0), ValueError,
     "batch_size must be >= 1"),
    # --- train
    ("train-loss-a-float", lambda c: c.train(loss_fn=lambda m, b: 1.0), TypeError,
     "loss_fn must return the loss as a tensor .* got float"),
    ("steps-float", lambda c: c.train(steps=2.5), TypeError, "steps must be an integer"),
    ("steps-zero", lambda c: c.train(steps=0), ValueError, "steps must be >= 1"),
    ("grad_accum_steps-np-zero", lambda c: c.train(grad_accum_steps=np.int64(0)), ValueError,
     "grad_accum_steps must be >= 1"),
    ("lr-str", lambda c: c.train(lr="1e-3"), TypeError, "lr must be a real number"),
    ("lr-inf", lambda c: c.train(lr=math.inf), ValueError, "lr must be finite and > 0"),
    ("warmup_steps-float", lambda c: c.train(warmup_steps=1.5), TypeError, "warmup_steps must be an integer"),
    ("warmup_steps-negative", lambda c: c.train(warmup_steps=-1), ValueError, "warmup_steps must be >= 0"),
    ("max_grad_norm-zero", lambda c: c.train(max_grad_norm=0), ValueError, "max_grad_norm must be .*> 0"),
    ("max_grad_norm-negative", lambda c: c.train(max_grad_norm=-1.0), ValueError, "max_grad_norm must be .*> 0"),
    ("loss_fn-none", lambda c: c.train(loss_fn=None), TypeError, "loss_fn must be callable"),
    ("History-mean-empty", lambda c: train.History().mean(), ValueError, "the history is empty .*'loss'"),
    ("History-last-empty", lambda c: train.History().last(), ValueError, "the history is empty"),
    ("History-mean-unknown-key", lambda c: c.history().mean("acc"), KeyError,
     r"key 'acc' is not a metric of this history; it has \['grad_norm', 'loss'"),
    ("History-mean-last-zero", lambda c: c.history().mean(last=0), ValueError, "last must be >= 1"),
    ("History-mean-last-negative", lambda c: c.history().mean(last=-1), ValueError, "last must be >= 1"),
    ("History-mean-last-float", lambda c: c.history().mean(last=2.5), TypeError, "last must be an integer"),
    # --- models
    ("tiny-kv-heads-zero", lambda c: models.tiny_model(num_key_value_heads=0), ValueError,
     "num_key_value_heads must be >= 1"),
    ("tiny-hidden-indivisible", lambda c: models.tiny_model(hidden_size=30, num_attention_heads=4), ValueError,
     r"hidden_size \(30\) must be a multiple of num_attention_heads \(4\)"),
    ("tiny-vocab-float", lambda c: models.tiny_model(vocab_size=2.5), TypeError, "vocab_size must be an integer"),
    ("tiny-dtype-int", lambda c: models.tiny_model(dtype=torch.int64), TypeError, "dtype must be a floating"),
    ("chat-max_new_tokens-zero", lambda c: models.chat(c.chat_model, c.tok, "Hi", max_new_tokens=0), ValueError,
     "max_new_tokens must be >= 1"),
    ("load_model-device-gpu", lambda c: models.load_model(device="gpu"), ValueError,
     r"device must be a torch.device or a string such as 'cpu', 'cuda', 'cuda:0' or 'mps', got 'gpu'"),
    ("tiny_model-device-float", lambda c: models.tiny_model(device=3.5), ValueError, "device must be a torch.device"),
    ("load_model-name-int", lambda c: models.load_model(123), TypeError, "name must be a model id or a path"),
    ("default_model_path-verify-str", lambda c: models.default_model_path(verify="no"), TypeError,
     r"verify must be True, False or None, got str"),
    ("default_model_path-verify-str", lambda c: models.default_model_path(verify="yes"), TypeError,
     "verify must be True, False or None"),
    ("resolve_dtype-int8", lambda c: models.resolve_dtype("int8", "cpu"), ValueError, "dtype must be a torch floating dtype"),
    # --- data
    ("encode_sft-max_length-negative", lambda c: data.encode_sft(c.tok, "Hi", "Hello", max_length=-1), ValueError,
     "max_length must be >= 1"),
    ("encode_sft-max_length-float", lambda c: data.encode_sft(c.tok, "Hi", "Hello", max_length=2.5), TypeError,
     "max_length must be an integer"),
    ("SFTCollator-max_length-zero", lambda c: data.SFTCollator(c.tok, max_length=0), ValueError,
     "max_length must be >= 1"),
    ("PreferenceCollator-max_length-zero", lambda c: data.PreferenceCollator(c.tok, max_length=np.int64(0)), ValueError,
     "max_length must be >= 1"),
    ("pad-length-float", lambda c: data.pad([[1, 2]], 0, length=2.5), TypeError, "length must be an integer"),
    ("pad-value-str", lambda c: data.pad([[1, 2]], "x"), TypeError, "value must be an integer"),
    ("pad-of-str", lambda c: data.pad(["ab"], 0), TypeError, r"sequences\[0\] must be a list of integer token ids"),
    ("pad-empty", lambda c: data.pad([], 0), ValueError, "sequences is empty"),
    ("chat_prompt-int", lambda c: data.chat_prompt(c.tok, 3), ValueError, "prompt must be a non-empty string, got 3"),
    ("read_jsonl-missing-file", lambda c: data.read_jsonl("no-such-file.jsonl"), FileNotFoundError, "no-such-file.jsonl"),
    ("PreferenceCollator-empty", lambda c: data.PreferenceCollator(c.tok)([]), ValueError,
     "examples is empty: a batch needs at least one example"),
    ("PreferenceCollator-one-dict", lambda c: data.PreferenceCollator(c.tok)({"prompt": "a", "chosen": "b", "rejected": "c"}),
     TypeError, r"examples must be a list of dicts .*got a dict; wrap a single example as \[example\]"),
    ("SFTCollator-empty", lambda c: data.SFTCollator(c.tok)([]), ValueError, "examples is empty"),
    ("SFTCollator-list-of-str", lambda c: data.SFTCollator(c.tok)(["What is 2+2?"]), TypeError,
     r"examples\[0\] must be a dict with 'prompt', 'response', got a str"),
    ("write_jsonl-one-dict", lambda c: data.write_jsonl(c.tmp / "x.jsonl", {"a": 1, "b": 2}), TypeError,
     r"rows must be an iterable of dicts, one per line, got a dict; wrap a single row as \[row\]"),
    ("write_jsonl-str", lambda c: data.write_jsonl(c.tmp / "x.jsonl", "abc"), TypeError, "rows must be an iterable of dicts"),
    ("write_jsonl-row-str", lambda c: data.write_jsonl(c.tmp / "x.jsonl", [{"a": 1}, "b"]), TypeError,
     "rows must hold dicts .*row 2 is a str"),
    ("write_jsonl-nan", lambda c: data.write_jsonl(c.tmp / "x.jsonl", [{"a": math.nan}]), ValueError,
     "rows: row 1 holds a NaN or infinite number"),
    ("read_jsonl-invalid-utf8", lambda c: data.read_jsonl(c.file("bad.jsonl", b'{"a": 1}\n{"b": "\xff\xfe"}\n')),
     ValueError, r"bad.jsonl:2: not valid UTF-8 \(byte 0xff at column 8\)"),
    ("read_jsonl-nan", lambda c: data.read_jsonl(c.file("nan.jsonl", b'{"a": 1}\n{"loss": NaN}\n')), ValueError,
     r"nan.jsonl:2: NaN is not a JSON number"),
    ("read_jsonl-infinity", lambda c: data.read_jsonl(c.file("inf.jsonl", b'{"x": -Infinity}\n')), ValueError,
     r"inf.jsonl:1: -Infinity is not a JSON number"),
    ("read_jsonl-deeply-nested", lambda c: data.read_jsonl(c.file("deep.jsonl", b"[" * 100000 + b"]" * 100000 + b"\n")),
     ValueError, r"deep.jsonl:1: nested too deeply to read"),
    ("read_jsonl-not-an-object", lambda c: data.read_jsonl(c.file("list.jsonl", b'{"a": 1}\n[1, 2]\n')), ValueError,
     r"list.jsonl:2: a row must be a JSON object"),
    # --- answering prompts
    ("answers-max_new_tokens-np-zero", lambda c: sampling.generate_answers(c.chat_model, c.tok, ["hi"],
                                                                           max_new_tokens=np.int64(0)),
     ValueError, "max_new_tokens must be >= 1"),
    ("answers-batch_size-float", lambda c: sampling.generate_answers(c.chat_model, c.tok, ["hi"], batch_size=1.5),
     TypeError, "batch_size must be an integer"),
    ("answers-prompts-str", lambda c: sampling.generate_answers(c.chat_model, c.tok, "hi"), ValueError,
     "prompts must be a non-empty list of strings"),
    ("answers-stems-wrong-length", lambda c: sampling.generate_answers(c.chat_model, c.tok, ["a", "b"], stems=["x"]),
     ValueError, "stems must be a list of 2 strings"),
    ("answers-share_prefix-str", lambda c: sampling.generate_answers(c.chat_model, c.tok, ["hi"], share_prefix="no"),
     TypeError, "share_prefix must be True or False"),
    ("answers-greedy-int", lambda c: sampling.generate_answers(c.chat_model, c.tok, ["hi"], greedy=1), TypeError,
     "greedy must be True or False"),
    ("answers-no-greedy-no-samples", lambda c: sampling.generate_answers(c.chat_model, c.tok, ["hi"], greedy=False),
     ValueError, r"num_samples must be >= 1 \(with greedy=False there must be samples\)"),
    ("answers-temperature-inf", lambda c: sampling.generate_answers(c.chat_model, c.tok, ["Hi?"], num_samples=1,
                                                                    temperature=math.inf),
     ValueError, "temperature must be finite and >= 0"),
    ("answers-temperature-tiny", lambda c: sampling.generate_answers(c.chat_model, c.tok, ["Hi?"], num_samples=1,
                                                                     temperature=1e-320),
     ValueError, "temperature must be large enough"),
    ("answers-temperature-str", lambda c: sampling.generate_answers(c.chat_model, c.tok, ["Hi?"], num_samples=1,
                                                                    temperature="hot"), TypeError,
     "temperature must be a real number"),
    ("answers-num_samples-float", lambda c: sampling.generate_answers(c.chat_model, c.tok, ["Hi?"], num_samples=1.5),
     TypeError, "num_samples must be an integer"),
    ("answers-generator-int", lambda c: sampling.generate_answers(c.chat_model, c.tok, ["Hi?"], num_samples=1,
                                                                  generator=0),
     TypeError, "generator must be a torch.Generator"),
    ("generate-num_return_sequences-zero", lambda c: sampling.generate(c.tiny, c.ids, max_new_tokens=2,
                                                                       num_return_sequences=0),
     ValueError, "num_return_sequences must be >= 1"),
    ("generate-greedy_first-str", lambda c: sampling.generate(c.tiny, c.ids, max_new_tokens=2, greedy_first="yes"),
     TypeError, "greedy_first must be True or False"),
    ("generate-output_logps-int", lambda c: sampling.generate(c.tiny, c.ids, max_new_tokens=2, output_logps=1),
     TypeError, "output_logps must be True or False"),
    ("generate-suppress-out-of-vocab", lambda c: sampling.generate(c.tiny, c.ids, max_new_tokens=2,
                                                                   suppress_tokens=[TINY_V]),
     ValueError, "suppress_tokens must be in"),
    ("left_pad-empty-row", lambda c: sampling.left_pad([[1, 2], []], 0), ValueError,
     "sequences must each hold at least one token"),
    ("left_pad-str", lambda c: sampling.left_pad("abc", 0), TypeError, "sequences must be a non-empty list"),
    ("left_pad-pad-negative", lambda c: sampling.left_pad([[1]], -1), ValueError, "pad_token_id must be >= 0"),
    ("position_ids-list", lambda c: sampling.position_ids([[1, 1]]), TypeError, "attention_mask must be a torch.Tensor"),
    ("newline_token_ids-no-tokenizer", lambda c: sampling.newline_token_ids(None), TypeError,
     "tokenizer must be a tokenizer"),
    ("generate_answers-stop_at_newline-str", lambda c: sampling.generate_answers(c.chat_model, c.tok, ["Hi?"],
     stop_at_newline="yes"), TypeError, "stop_at_newline"),
    ("probe_order-row-without-question", lambda c: H.probe_order([{"answer": "x"}]), ValueError,
     "rows must be a list of dicts with a 'question'"),
    ("load_builder-unknown-name", lambda c: data.load_builder("nonsense"), ValueError, "no builder 'nonsense'"),
    ("load_builder-a-path", lambda c: data.load_builder("../build_sft"), ValueError,
     "name must be a data set's name"),
    ("stop_token_ids-no-tokenizer", lambda c: sampling.stop_token_ids(c.chat_model, None), TypeError,
     "tokenizer must be a tokenizer"),
    ("chat-prompt-list", lambda c: models.chat(c.chat_model, c.tok, ["hi"]), TypeError, "prompt must be a str"),
    # --- the extraction task
    ("score-reference-not-json", lambda c: extraction.score('{"animal": "fox"}', {"response": "fox, red, park"}), ValueError,
     r"example\['response'\] must be one JSON object \(the reference answer\), got 'fox, red, park'"),
    ("score-reference-list", lambda c: extraction.score('{"animal": "fox"}', {"response": "[1, 2]"}), ValueError,
     r"example\['response'\] must be one JSON object"),
    ("score-reference-dict", lambda c: extraction.score('{"animal": "fox"}', {"response": {"animal": "fox"}}), TypeError,
     r"example\['response'\] must be a str holding a JSON object, got dict"),
    ("score-example-str", lambda c: extraction.score('{"animal": "fox"}', "fox"), ValueError,
     "example must be a dict with a 'response'"),
    ("load_task-split", lambda c: extraction.load_task("dev"), ValueError, r"split must be one of \('train', 'test'\)"),
    ("parse_answer-none", lambda c: extraction.parse_answer(None), TypeError, "answer must be a str"),
    # --- hallucination
    ("probe-row-without-answer", lambda c: H.probe(c.chat_model, c.tok, [{"question": "Hi?"}], systems=["A."]),
     ValueError, r"rows\[0\] needs a non-empty string 'answer', got None"),
    ("probe-rows-a-dict", lambda c: H.probe(c.chat_model, c.tok, {"question": "Hi?", "answer": "x"}, systems=["A."]),
     ValueError, "rows must be a non-empty list of dicts"),
    ("probe-num_samples-zero", lambda c: H.probe(c.chat_model, c.tok, [{"question": "Hi?", "answer": "x"}],
                                                 systems=["Hi."], num_samples=0),
     ValueError, "num_samples must be >= 1"),
    ("probe-systems-str", lambda c: H.probe(c.chat_model, c.tok, [{"question": "Hi?", "answer": "x"}],
                                            systems="Hi."),
     ValueError, "systems must be a non-empty list of system messages"),
    ("paired_bootstrap-shapes", lambda c: H.paired_bootstrap([1, 0, 1], [1, 0]), ValueError,
     r"a and b must have the same shape"),
    ("paired_bootstrap-level", lambda c: H.paired_bootstrap([1, 0, 1], [1, 0, 0], level=95), ValueError,
     r"level must be in \(0, 1\)"),
    ("labelled_logits-no-labels", lambda c: losses.labelled_logits(c.tiny, {"input_ids": c.labels}), TypeError,
     "batch must be a dict with 'labels'"),
    ("labelled_logits-labels-1d", lambda c: losses.labelled_logits(c.tiny, c.qa_batch(labels=torch.zeros(6).long())),
     ValueError, r"labels must have shape \(B, T\)"),
    ("with_reference_logps-distributions-int", lambda c: dpo.with_reference_logps(c.tiny, [c.pref_batch()],
                                                                                  distributions=1),
     TypeError, "distributions must be True or False"),
    ("group_advantages-one-generation", lambda c: grpo.group_advantages(torch.zeros(4), 1), ValueError,
     "num_generations must be >= 2"),
    ("group_advantages-nan", lambda c: grpo.group_advantages(torch.tensor([0.0, math.nan]), 2), ValueError,
     "rewards must be finite"),
    ("per_token_kl-shapes", lambda c: grpo.per_token_kl(torch.zeros(2, 3), torch.zeros(2, 4)), ValueError,
     "must have the same shape"),
    ("completion_logps-no-prompt", lambda c: grpo.completion_logps(c.tiny, {"completion_ids": c.labels}), ValueError,
     r"batch is missing \['prompt_ids', 'prompt_mask', 'completion_mask'\]"),
    ("rollout-one-generation", lambda c: grpo.rollout(c.tiny, c.ids, num_generations=1, max_new_tokens=2), ValueError,
     "num_generations must be >= 2"),
    ("rollout-top-layers-too-many", lambda c: grpo.rollout(c.tiny, c.ids, num_generations=2, max_new_tokens=2,
                                                           top_layers=99), ValueError, "k must be"),
    ("compute_loss-rewards-list", lambda c: grpo.compute_loss(c.tiny, {**c.grpo_batch(), "rewards": [1.0, 0.0]},
                                                              num_generations=2), TypeError,
     "rewards must be a torch.Tensor"),
    ("completion_logps-past-vocab", lambda c: grpo.completion_logps(c.tiny, {
        **c.grpo_batch(), "completion_ids": torch.full((2, 3), TINY_V)}), ValueError,
     r"completion_ids must hold token ids in \[0, 256\) \(the model's vocabulary\)"),
    ("completion_logps-float-ids", lambda c: grpo.completion_logps(c.tiny, {
        **c.grpo_batch(), "prompt_ids": torch.ones(2, 4)}), TypeError, "prompt_ids must be an integer tensor"),
    ("top_layer_inputs-past-vocab", lambda c: models.top_layer_inputs(c.tiny, {"input_ids": c.ids + TINY_V}, 1),
     ValueError, r"input_ids must hold token ids in \[0, 256\)"),
    ("top_layer_inputs-float-ids", lambda c: models.top_layer_inputs(c.tiny, {"input_ids": c.ids.float()}, 1),
     TypeError, "input_ids must be an integer tensor"),
    ("preference_eval-str", lambda c: dpo.preference_eval(c.tiny, "a string"), TypeError,
     "batches must be a list of preference batches"),
    ("preference_eval-one-batch", lambda c: dpo.preference_eval(c.tiny, c.pref_batch()), TypeError,
     r"wrap one batch as \[batch\]"),
    ("compute_loss-no-advantages", lambda c: grpo.compute_loss(c.tiny, {"completion_ids": c.labels}), ValueError,
     "'advantages' added"),
    ("grpo_loss-beta-without-ref", lambda c: grpo.grpo_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2),
                                                            torch.ones(2, 3), beta=0.1), ValueError,
     "beta > 0 needs ref_per_token_logps"),
    ("grpo_loss-epsilon-1", lambda c: grpo.grpo_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2),
                                                     torch.ones(2, 3), epsilon=1.0), ValueError, "epsilon must be in"),
    ("grpo_loss-mask-two", lambda c: grpo.grpo_loss(torch.zeros(1, 4), torch.zeros(1, 4), torch.ones(1),
                                                    torch.tensor([[1, 2, 0, 0]]), loss_type="bnpo"), ValueError,
     r"completion_mask must hold only 0 .* and 1, got values \[0, 1, 2\]"),
    ("grpo_loss-mask-negative", lambda c: grpo.grpo_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1),
                                                         torch.tensor([[-1, 1]])), ValueError,
     "completion_mask must hold only 0"),
    ("answer_scores-no-labels", lambda c: losses.answer_scores(c.tiny, {"input_ids": c.labels}), TypeError,
     "batch must be a dict with 'labels'"),
    ("answer_scores-mask-shape", lambda c: losses.answer_scores(
        c.tiny, c.qa_batch(answer_mask=torch.ones(1, 1, dtype=torch.bool))), ValueError,
     "answer_mask must be a bool tensor of the labels' shape"),
    ("train-callback", lambda c: train.train(c.tiny, [c.qa_batch()], losses.response_loss, steps=1, callback="stop"),
     TypeError, "callback must be callable"),
    ("threshold-str", lambda c: H.confident_wrong_rate([True], [0.5], threshold="high"), TypeError,
     "threshold must be a real number"),
    ("threshold-above-1", lambda c: H.confident_wrong_rate([True], [0.5], threshold=1.5), ValueError,
     r"threshold must be in \[0, 1\]"),
    ("group-unknown-shape", lambda c: losses.sft_loss_by_group(c.tiny, c.qa_batch(unknown=torch.tensor([True]))), ValueError,
     r"unknown must have shape \(2,\)"),
    ("knowledge_category-no-samples", lambda c: H.knowledge_category([True], []), ValueError,
     "samples_correct must be a non-empty list of verdicts"),
    ("knowledge_category-bool", lambda c: H.knowledge_category(True, [True]), ValueError,
     "greedy_correct must be a non-empty list of verdicts"),
    ("is_correct-response-none", lambda c: H.is_correct(None, "Paris"), TypeError, "response must be a str, got NoneType"),
    ("is_correct-aliases-str", lambda c: H.is_correct("Paris", "Paris", "Paree"), TypeError, "aliases must be a list of str"),
    ("normalize_answer-none", lambda c: H.normalize_answer(None), TypeError, "text must be a str"),
    ("halluc-accuracy-floats", lambda c: H.accuracy([0.2, 0.4]), TypeError,
     r"correct must hold verdicts True/False only, got 0.2 \(float\)"),
    ("halluc-accuracy-str", lambda c: H.accuracy("abc"), ValueError, "correct must be a non-empty list of verdicts"),
    ("halluc-category-floats", lambda c: H.knowledge_category([0.2], [False]), TypeError,
     "greedy_correct must hold verdicts True/False only"),
    ("halluc-confident-nan", lambda c: H.confident_wrong_rate([True, False], [math.nan, math.nan]), ValueError,
     r"confidence must be in \[0, 1\], got nan"),
    ("halluc-confident-strings", lambda c: H.confident_wrong_rate(["False", "False"], [0.9, 0.8]), TypeError,
     "correct must hold verdicts True/False only"),
    ("halluc-probe-aliases-str", lambda c: H.probe(c.chat_model, c.tok, [{"question": "Hi?", "answer": "Paris",
                                                                         "aliases": "xy"}], systems=["A."]),
     TypeError, r"rows\[0\]\['aliases'\] must be a list of strings"),
    ("paired_bootstrap-nan", lambda c: utils.paired_bootstrap([1, math.nan, 1], [1, 0, 1]), ValueError,
     "a holds NaN or infinite scores"),
    ("paired_bootstrap-str", lambda c: utils.paired_bootstrap("abc", [1, 0, 1]), TypeError, "a must be numbers"),
    ("sft_loss_by_group-unknown-floats", lambda c: losses.sft_loss_by_group(
        c.tiny, c.qa_batch(unknown=torch.tensor([0.5, 2.0]))), TypeError, "unknown must be a bool tensor"),
    ("merge_lora-unload-str", lambda c: lora.merge_lora(lora.apply_lora(models.tiny_model(), ["q_proj"], r=2,
                                                                        lora_alpha=4), unload="no"),
     TypeError, "unload must be True or False"),
    ("apply_lora-misspelt-target", lambda c: lora.apply_lora(models.tiny_model(), ["q_proj", "v_prj"], r=2,
                                                             lora_alpha=4), ValueError,
     r"target_modules \['v_prj'\] match no linear layer \(the others do\)"),
    ("answer_logps-labels-shorter", lambda c: losses.answer_logps(c.tiny, {
        "input_ids": c.labels.clamp(min=0), "labels": c.labels[:, :4]}), ValueError,
     r"labels must have the inputs' shape \(2, 5\) \(not shifted\), got \(2, 4\)"),
    ("answer_logps-mask-one-row", lambda c: losses.answer_logps(c.tiny, {
        "input_ids": c.labels.clamp(min=0), "attention_mask": torch.ones(1, 5), "labels": c.labels}), ValueError,
     r"attention_mask must have the inputs' shape \(2, 5\), got \(1, 5\)"),
    ("answer_logps-ids-past-vocab", lambda c: losses.answer_logps(c.tiny, {
        "input_ids": c.labels.clamp(min=0) + TINY_V, "labels": c.labels}), ValueError,
     r"input_ids must hold token ids in \[0, 256\)"),
    ("response_loss-float-ids", lambda c: losses.response_loss(c.tiny, {
        "input_ids": c.labels.float(), "labels": c.labels}), TypeError, "input_ids must be an integer tensor"),
    ("labelled_logits-labels-past-vocab", lambda c: losses.labelled_logits(c.tiny, {
        "input_ids": c.labels.clamp(min=0), "labels": c.labels.clamp(min=0) + TINY_V}), ValueError,
     r"labels must hold token ids in \[0, 256\)"),
    ("top_layer_inputs-mask-shape", lambda c: models.top_layer_inputs(c.tiny, {
        "input_ids": c.ids, "attention_mask": torch.ones(2, 3)}, 1), ValueError,
     r"attention_mask must be a tensor of input_ids' shape"),
    ("train-batches-a-tensor", lambda c: train.train(torch.nn.Linear(2, 1), torch.randn(1, 2),
                                                     lambda m, b: m(b).sum(), steps=1, progress=False), TypeError,
     r"batches must be an iterable of batches .* got Tensor; wrap one batch as \[batch\]"),
    ("train-optimizer-str", lambda c: c.train(optimizer="adam"), TypeError, "optimizer must be a torch.optim.Optimizer"),
    ("train-nan-gradient", lambda c: c.train(loss_fn=lambda m, b: torch.where(
        torch.tensor(True), m(b), m(b) / 0.0).sum()), FloatingPointError, "the gradient norm became nan at step 1"),
    ("train-loss-without-gradient", lambda c: c.train(loss_fn=lambda m, b: torch.tensor(1.0)), ValueError,
     "loss_fn's loss has no gradient"),
    ("move_to-device-float", lambda c: train.move_to({"a": torch.ones(1)}, 3.5), TypeError,
     "device must be a torch.device or a string"),
    ("move_to-device-gpu", lambda c: train.move_to({"a": torch.ones(1)}, "gpu"), ValueError,
     "device must be a device torch knows"),
    ("answer_scores-ignore_index-none", lambda c: losses.answer_scores(c.tiny, c.qa_batch(), ignore_index=None),
     TypeError, "ignore_index must be an integer"),
    ("sft_loss_by_group-no-labels", lambda c: losses.sft_loss_by_group(c.tiny, {"unknown": torch.tensor([True])}),
     TypeError, "batch must be a dict with 'labels'"),
    ("chat-tokenizer-none", lambda c: models.chat(c.chat_model, None, "Hi"), TypeError,
     "tokenizer must be the model's tokenizer"),
    ("paired_bootstrap-seed-float", lambda c: utils.paired_bootstrap([1, 0, 1], [1, 0, 0], seed=1.5), TypeError,
     "seed must be an integer"),
    ("history-mean-never-logged", lambda c: (lambda h: (h.log(step=1, loss=2.0), h.mean("acc")))(train.History()),
     KeyError, "key 'acc' is not a metric of this history"),
    ("probe-answer-no-letter", lambda c: H.probe(c.chat_model, c.tok, [{"question": "Hi?", "answer": "!!!"}],
                                                 systems=["A."]), ValueError,
     r"rows\[0\]\['answer'\] must contain a letter or digit"),
    ("shared_prefix-1d-ids", lambda c: losses.shared_prefix({"input_ids": c.ids[0]}), ValueError,
     r"input_ids must have shape \(B, T\)"),
    ("shared_prefix-mask-shape", lambda c: losses.shared_prefix({"input_ids": c.ids, "attention_mask": c.ids[:, :2]}),
     ValueError, r"attention_mask must have the inputs' shape"),
    ("history-log-a-vector", lambda c: train.History().log(step=1, loss=torch.ones(3)), TypeError,
     "metric 'loss' must be a number"),
    ("history-log-a-word", lambda c: train.History().log(step=1, acc="high"), TypeError,
     "metric 'acc' must be a number"),
    ("sft_loss-empty-batch", lambda c: losses.sft_loss(torch.randn(0, 6, 16), torch.zeros(0, 6, dtype=torch.long)),
     ValueError, r"logits are empty \(shape \(0, 6, 16\)\): the batch holds no sequence to score"),
    ("halluc-accuracy-empty", lambda c: H.accuracy([]), ValueError, "correct must be a non-empty list of verdicts"),
    ("group-no-unknown", lambda c: losses.sft_loss_by_group(c.tiny, {"labels": c.labels}), ValueError,
     "batch needs an 'unknown' entry"),
    ("QACollator-empty", lambda c: data.QACollator(c.tok)([]), ValueError, "rows is empty"),
    ("CompletionCollator-empty", lambda c: data.CompletionCollator(c.tok)([]), ValueError, "rows is empty"),
    ("CompletionCollator-one-dict", lambda c: data.CompletionCollator(c.tok)({"prompt": "2 + 3 =", "answer": "5"}),
     TypeError, "rows must be a list of dicts with 'prompt', 'answer', got a dict"),
    ("CompletionCollator-no-answer", lambda c: data.CompletionCollator(c.tok)([{"prompt": "2 + 3 ="}]), ValueError,
     r"rows\[0\] needs 'prompt' and 'answer'; missing \['answer'\]"),
    ("CompletionCollator-prompt-ends-with-space",
     lambda c: data.CompletionCollator(c.tok)([{"prompt": "1 + 1 = ", "answer": "2"}]), ValueError,
     r"rows\[0\]\['prompt'\] ends with white space"),
    ("CompletionCollator-answer-empty", lambda c: data.CompletionCollator(c.tok)([{"prompt": "1 + 1 =", "answer": ""}]),
     ValueError, r"rows\[0\]\['answer'\] must hold a word"),
    ("CompletionCollator-answer-none",
     lambda c: data.CompletionCollator(c.tok)([{"prompt": "1 + 1 =", "answer": None}]), TypeError,
     r"rows\[0\]\['answer'\] must be a string, got NoneType"),
    ("CompletionCollator-prompt-none", lambda c: data.CompletionCollator(c.tok)([{"prompt": None, "answer": "2"}]),
     TypeError, r"rows\[0\]\['prompt'\] must be a string"),
    ("CompletionCollator-end-not-str", lambda c: data.CompletionCollator(c.tok, end=10), TypeError,
     "end must be a string"),
    ("QACollator-one-dict", lambda c: data.QACollator(c.tok)({"question": "Hi?", "response": "Hello."}), TypeError,
     "rows must be a list of dicts with 'question', 'response', got a dict"),
    # --- utils and plots (outside the numeric policy)
    ("eval_mode-not-a-module", lambda c: utils.eval_mode("model").__enter__(), TypeError,
     "model must be a torch.nn.Module, got str"),
    ("time_interleaved-statistic", lambda c: utils.time_interleaved({"a": lambda: None}, statistic="mean"),
     ValueError, "statistic must be"),
    ("time_call-repeat-zero", lambda c: utils.time_call(lambda: None, repeat=0), ValueError, "repeat must be >= 1"),
    ("time_call-repeat-float", lambda c: utils.time_call(lambda: None, repeat=2.5), TypeError,
     "repeat must be an integer"),
    ("time_call-warmup-negative", lambda c: utils.time_call(lambda: None, warmup=-1), ValueError,
     "warmup must be >= 0"),
    ("time_call-fn-not-callable", lambda c: utils.time_call(3), TypeError, "fn must be callable"),
    ("peak_bytes-fn-not-callable", lambda c: utils.peak_bytes(3, "cpu"), TypeError, "fn must be callable"),
    ("answer_probability-temperature-negative",
     lambda c: sampling.answer_probability(c.tiny, c.qa_batch(), temperature=-0.5), ValueError,
     "temperature must be"),
    ("answer_probability-temperature-empty", lambda c: sampling.answer_probability(c.tiny, c.qa_batch(), temperature=[]),
     ValueError, "temperature must be a number or a non-empty list"),
    ("answer_probability-top_p-zero", lambda c: sampling.answer_probability(c.tiny, c.qa_batch(), top_p=0.0),
     ValueError, "top_p must be"),
    ("answer_probability-no-labels", lambda c: sampling.answer_probability(c.tiny, {"input_ids": c.ids}), TypeError,
     "batch must be a dict with 'labels'"),
    ("answer_probability-no-answer", lambda c: sampling.answer_probability(
        c.tiny, c.qa_batch(labels=torch.full((2, 6), -100))), ValueError, "every row of labels needs a labelled position"),
    ("paired_bootstrap-seeds-one-row", lambda c: utils.paired_bootstrap(torch.ones(1, 5), torch.zeros(1, 5), seeds=True),
     ValueError, "seeds=True resamples the rows .* needs at least 2"),
    ("paired_bootstrap-seeds-not-bool", lambda c: utils.paired_bootstrap(torch.ones(2, 5), torch.zeros(2, 5), seeds="yes"),
     TypeError, "seeds must be"),
    ("count_flops-fn-not-callable", lambda c: utils.count_flops(3), TypeError, "fn must be callable"),
    ("count_calls-not-a-module", lambda c: utils.count_calls("model").__enter__(), TypeError,
     "module must be a torch.nn.Module, got str"),
    ("tolerance-int-dtype", lambda c: utils.tolerance(torch.int64), ValueError, "dtype must be one of"),
    ("cpu_has_native_bf16-capability-int", lambda c: utils.cpu_has_native_bf16(3), TypeError,
     "capability must be a string"),
    ("subplots-ncols-zero", lambda c: plots.subplots(0), ValueError, "ncols must be >= 1"),
    ("subplots-width-negative", lambda c: plots.subplots(width=-1), ValueError, r"width must be > 0 \(inches\)"),
    ("plot_history-unknown-key", lambda c: plots.plot_history(c.history(), "acc"), KeyError,
     "key 'acc' is not a metric of this history"),
    ("plot_history-list", lambda c: plots.plot_history([1.0, 2.0]), TypeError, "history must be the History"),
    ("trainable_parameters-str", lambda c: train.trainable_parameters("model"), TypeError,
     "model must be a torch.nn.Module"),
    ("frame_slider-draw-str", lambda c: widgets.frame_slider("draw", beta=[1.0]), TypeError, "draw must be callable"),
    ("frame_slider-no-grid", lambda c: widgets.frame_slider(lambda ax: None), ValueError, "at least one grid"),
    ("frame_slider-start-off-grid", lambda c: widgets.frame_slider(lambda ax, beta: None, beta=[1.0], start={"beta": 2}),
     ValueError, r"start\['beta'\] = 2 is not in its grid \[1.0\]"),
    ("frame_slider-true-and-1", lambda c: widgets.frame_slider(lambda ax, x: None, x=[True, 1]), ValueError,
     "grid 'x' has values that compare equal, True and 1"),
    ("frame_slider-zero-and-minus-zero", lambda c: widgets.frame_slider(lambda ax, x: None, x=[0.0, -0.0]),
     ValueError, "grid 'x' has values that compare equal, 0.0 and -0.0"),
    ("frame_slider-0-and-false", lambda c: widgets.frame_slider(lambda ax, x: None, x=[0, False]), ValueError,
     "compare equal"),
    ("frame_slider-nan", lambda c: widgets.frame_slider(lambda ax, a: None, a=[math.nan, 1.0], start={"a": math.nan}),
     ValueError, "grid 'a' holds NaN"),
    ("frame_slider-colors-zero", lambda c: widgets.frame_slider(lambda ax, x: None, x=[1], colors=0), ValueError,
     r"colors must be in \[2, 256\]"),
    ("frame_slider-colors-1000", lambda c: widgets.frame_slider(lambda ax, x: None, x=[1], colors=1000), ValueError,
     r"colors must be in \[2, 256\]"),
    ("frame_slider-start-list", lambda c: widgets.frame_slider(lambda ax, x: None, x=[1], start=[1]), TypeError,
     "start must be a dict of grid name -> value"),
    ("frame_slider-dpi-zero", lambda c: widgets.frame_slider(lambda ax, x: None, x=[1], dpi=0), ValueError,
     "dpi must be >= 1"),
    ("seed-str", lambda c: utils.seed_everything("a"), TypeError, "seed must be an integer"),
    ("smooth-window-zero", lambda c: plots.smooth([1.0, 2.0], 0), ValueError, "window must be >= 1"),
    ("smooth-window-float", lambda c: plots.smooth([1.0, 2.0], 1.5), TypeError, "window must be an integer"),
    ("launch-module", lambda c: distributed.launch("rm -rf x"), ValueError, "module must be a dotted module name"),
    ("launch-args", lambda c: distributed.launch("llmbook.jobs.crash", 3), TypeError, "args must be strings"),
    ("launch-nproc-zero", lambda c: distributed.launch("llmbook.jobs.crash", nproc=0), ValueError, "nproc must be"),
    ("launch-nproc-100", lambda c: distributed.launch("llmbook.jobs.crash", nproc=100), ValueError, "nproc must be"),
    ("launch-launcher", lambda c: distributed.launch("llmbook.jobs.crash", launcher="mpirun"), ValueError,
     "launcher must be one of"),
    ("launch-config-missing", lambda c: distributed.launch("llmbook.jobs.crash", launcher="accelerate"), ValueError,
     "config: an accelerate config file is needed"),
    ("launch-config-not-a-file", lambda c: distributed.launch("llmbook.jobs.crash", launcher="accelerate",
                                                              config="no/such.yaml"), ValueError,
     "config must be an accelerate config file"),
    ("launch-timeout", lambda c: distributed.launch("llmbook.jobs.crash", timeout=0), ValueError,
     "timeout must be a positive number"),
    ("launch-threads", lambda c: distributed.launch("llmbook.jobs.crash", threads=0), ValueError, "threads must be"),
    ("shard-uneven", lambda c: distributed.shard([1, 2, 3], 0, 2), ValueError, "3 do not split evenly over 2"),
    ("shard-rank", lambda c: distributed.shard([1, 2], 2, 2), ValueError, r"rank must be in \[0, 2\)"),
    ("shard-world", lambda c: distributed.shard([1, 2], 0, 0), ValueError, "world_size must be"),
    ("zero-stage", lambda c: distributed.zero_bytes_per_device(10, 2, 4), ValueError, "stage must be one of"),
    ("zero-params", lambda c: distributed.zero_bytes_per_device(0, 2, 1), ValueError, "n_params must be"),
    ("zero-devices-float", lambda c: distributed.zero_bytes_per_device(10, 2.5, 1), TypeError, "n_devices must be"),
    ("zero-bytes", lambda c: distributed.zero_bytes_per_device(10, 2, 1, {"weights": 2}), ValueError,
     "bytes_per_param must give"),
    ("config_path-name", lambda c: distributed.config_path("zero1"), ValueError, "name must be one of"),
    ("RewardModel-backbone", lambda c: rewards.RewardModel(torch.nn.Linear(2, 2)), TypeError,
     "backbone must be a transformers causal LM"),
    ("RewardModel-init_std", lambda c: rewards.RewardModel(c.tiny, init_std=-1.0), ValueError, "init_std must be >= 0"),
    ("last_token-shapes", lambda c: rewards.last_token(torch.zeros(2, 3), torch.ones(2, 4)), ValueError,
     "scores and attention_mask must both be"),
    ("reward_loss-nan", lambda c: rewards.reward_loss(torch.tensor([math.nan]), torch.zeros(1)), ValueError,
     "rewards_chosen must be finite"),
    ("reward_loss-margin", lambda c: rewards.reward_loss(torch.zeros(2), torch.zeros(2), margin=torch.zeros(3)),
     ValueError, r"margin must be \(B,\)"),
    ("reward_compute_loss-missing", lambda c: rewards.compute_loss(rewards.RewardModel(c.tiny),
                                                                  {"chosen_input_ids": c.ids}),
     ValueError, "batch is missing"),
    ("gae-gamma", lambda c: ppo.gae(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), gamma=1.5), ValueError,
     r"gamma must be in \[0, 1\]"),
    ("gae-left-padded", lambda c: ppo.gae(torch.zeros(1, 3), torch.zeros(1, 3), torch.tensor([[0, 1, 1]])),
     ValueError, "padding on the right"),
    ("kl_penalised_rewards-kl_coef", lambda c: ppo.kl_penalised_rewards(torch.zeros(2), torch.zeros(2, 3),
                                                                        torch.zeros(2, 3), torch.ones(2, 3),
                                                                        kl_coef=-0.1),
     ValueError, "kl_coef must be >= 0"),
    ("whiten-shape", lambda c: ppo.whiten(torch.zeros(2, 3), torch.ones(3, 2)), ValueError, "mask must have values'"),
    ("policy_loss-nan", lambda c: ppo.policy_loss(torch.full((1, 2), math.nan), torch.zeros(1, 2), torch.zeros(1, 2),
                                                  torch.ones(1, 2)), ValueError, "logprobs must be finite"),
    ("value_loss-cliprange", lambda c: ppo.value_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2),
                                                      torch.ones(1, 2), cliprange_value=-1.0), ValueError,
     "cliprange_value must be > 0"),
    ("completion_values-model", lambda c: ppo.completion_values(c.tiny, c.grpo_batch()), TypeError,
     "value_model must be an llmbook.rewards.RewardModel"),
    ("ppo_rollout-max_new_tokens", lambda c: ppo.rollout(c.tiny, c.ids, num_generations=2, max_new_tokens=0,
                                                         top_layers=1), ValueError, "max_new_tokens must be >= 1"),
    ("ppo_compute_loss-models", lambda c: ppo.compute_loss(c.tiny, c.grpo_batch()), TypeError,
     "models must be an nn.ModuleDict"),
    ("ppo_compute_loss-missing", lambda c: ppo.compute_loss(torch.nn.ModuleDict({"policy": c.tiny, "value":
                                                                                 rewards.RewardModel(c.tiny)}),
                                                            c.grpo_batch()), ValueError, "batch is missing"),
]


@pytest.mark.parametrize("call, error, pattern", [row[1:] for row in BAD], ids=[row[0] for row in BAD])
def test_bad_input_is_named(ctx, call, error, pattern):
    with pytest.raises(error, match=pattern):
        call(ctx)


# Public names the table reaches through a helper of Ctx, and those with nothing to refuse.
THROUGH_CTX = {"dpo.dpo_loss": "c.dpo_loss", "lora.LoRALinear": "c.lora_linear", "train.train": "c.train",
               "train.History": "c.history"}
NO_ARGUMENTS = {
    "data.data_dir", "models.cache_dir", "models.pick_device", "models.ModelCacheError",
    "models.ModelNotAvailableError", "plots.use_style", "utils.cpu_capability", "utils.umask", "utils.LiveTensorBytes", "sampling.Answers",
    "sampling.SharedPrefix",  # a record that prefix_cache makes; generate refuses anything else as prefix
    "utils.WorkCounter",  # no arguments: a context manager that counts what runs inside it
    "utils.peak_memory_start", "utils.peak_memory_since",  # a device (torch names a bad one) and a count it returned
    "train.move_to",  # any value: what is not a tensor, dict, list or tuple is returned as it is
    "prefix.prefix_kv_shape",  # a transformers config; tests/test_prefix.py checks its refusals
    "distributed.init", "distributed.device",  # no arguments: they read the launcher's environment
    "distributed.held_bytes",  # a module and an optimiser; tests/test_distributed.py measures them
    "distributed.DistributedJobError",  # an exception class, raised by launch
}


def test_the_table_reaches_every_public_function():
    # A new public function or class must get a row above (or a reason to be listed here).
    import inspect
    import re
    import sys

    table = inspect.getsource(sys.modules[__name__]).split("BAD = [", 1)[1].split("\n]\n", 1)[0]
    aliases = {"data": data, "distributed": distributed, "dpo": dpo, "H": H, "lora": lora, "losses": losses, "models": models, "plots": plots,
               "prefix": prefix, "sampling": sampling, "grpo": grpo, "rewards": rewards, "ppo": ppo, "extraction": extraction, "train": train,
               "utils": utils, "widgets": widgets}
    missing = []
    for alias, module in aliases.items():
        for name in module.__all__:
            if not callable(getattr(module, name)):
                continue
            key = f"{alias}.{name}"
            reached = re.search(rf"\b{re.escape(THROUGH_CTX.get(key, key))}\(", table)
            if not reached and key not in NO_ARGUMENTS:
                missing.append(key)
    assert missing == []


def test_a_failed_apply_lora_leaves_the_model_untouched():
    # A bad rank must be refused before anything is frozen or wrapped.
    model = models.tiny_model()
    with pytest.raises(ValueError, match="r must be >= 1"):
        lora.apply_lora(model, ["q_proj", "v_proj"], r=0, lora_alpha=4)
    assert lora.lora_layers(model) == []
    assert all(p.requires_grad for p in model.parameters())
    # A rank that fits q_proj (64 x 64) but not k_proj (64 -> 32) is refused before q_proj is wrapped.
    with pytest.raises(ValueError, match=r"r must be at most min\(in_features, out_features\) = 32 for .*k_proj"):
        lora.apply_lora(model, ["q_proj", "k_proj"], r=48, lora_alpha=4)
    assert lora.lora_layers(model) == []
    assert all(p.requires_grad for p in model.parameters())


# --- the number forms a reader meets, against the references ----------------------------

def test_numpy_and_0d_tensor_settings_match_transformers_warpers(ctx):
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    x = ctx.x
    assert torch.equal(sampling.apply_temperature(x, np.float32(0.5)), TemperatureLogitsWarper(0.5)(None, x))
    assert torch.equal(sampling.apply_temperature(x, torch.tensor(0.25)), TemperatureLogitsWarper(0.25)(None, x))
    assert torch.equal(sampling.top_k_filter(x, np.int64(3)), TopKLogitsWarper(3)(None, x))
    assert torch.equal(sampling.top_k_filter(x, torch.tensor(5)), TopKLogitsWarper(5)(None, x))
    assert torch.equal(sampling.top_p_filter(x, torch.tensor(0.5, dtype=torch.float64)), TopPLogitsWarper(0.5)(None, x))
    assert torch.equal(sampling.top_p_filter(x, np.array(0.75)), TopPLogitsWarper(0.75)(None, x))
    assert torch.equal(sampling.sample_next_token(x, temperature=np.float64(0.0)), x.argmax(-1))


def test_numpy_settings_in_generate_match_transformers_generate(ctx):
    ours = sampling.generate(ctx.tiny, ctx.ids, max_new_tokens=np.int64(4), temperature=torch.tensor(0.0),
                             eos_token_id=[])
    theirs = ctx.tiny.generate(ctx.ids, attention_mask=torch.ones_like(ctx.ids), max_new_tokens=4, do_sample=False,
                               eos_token_id=None, pad_token_id=2)
    assert torch.equal(ours, theirs)


def test_numpy_rank_and_alpha_give_the_closed_form_lora_layer():
    layer = lora.LoRALinear(torch.nn.Linear(16, 12), r=np.int64(4), lora_alpha=torch.tensor(8.0),
                            lora_dropout=np.float32(0.0))
    assert layer.r == 4 and type(layer.r) is int
    assert layer.scaling == 8.0 / 4 and type(layer.lora_alpha) is float
    assert layer.lora_A.weight.shape == (4, 16) and layer.lora_B.weight.shape == (12, 4)


def test_numpy_counts_give_pefts_prefix_count():
    # DESIGN.md: PEFT gives SmolLM2 (30 layers, 3 KV heads x 64) 230,400 trainable parameters for 20 tokens.
    count = prefix.prefix_parameter_count(np.int64(20), torch.tensor(30), np.int32(3 * 64))
    assert count == 230_400 and type(count) is int
    encoder = prefix.PrefixEncoder(np.int64(2), np.int64(3), torch.tensor(2), np.int16(4), projection_dim=np.int64(5))
    assert encoder.kv_dim == 8 and type(encoder.kv_dim) is int
    assert encoder.embedding.weight.shape == (2, 8) and encoder.transform[2].out_features == 3 * 2 * 8


def test_numpy_beta_gives_the_closed_form_dpo_loss(ctx):
    pc, pr, rc, rr = ctx.logps, ctx.logps - 1, ctx.logps - 0.5, ctx.logps - 0.25
    losses_, chosen, rejected = dpo.dpo_loss(pc, pr, rc, rr, beta=np.float32(0.5))
    expected = -F.logsigmoid(0.5 * ((pc - rc) - (pr - rr)))
    torch.testing.assert_close(losses_, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(chosen, 0.5 * (pc - rc), rtol=0, atol=1e-6)


def test_numpy_chunk_size_and_ignore_index_match_cross_entropy(ctx):
    labels = ctx.labels.clone()
    labels[:, :2] = -100
    reference = F.cross_entropy((ctx.hidden @ ctx.weight.T)[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1))
    got = losses.chunked_sft_loss(ctx.hidden, ctx.weight, labels, chunk_size=np.int64(2), ignore_index=np.int64(-100))
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-6)
    got = losses.sft_loss(ctx.hidden @ ctx.weight.T, labels, ignore_index=torch.tensor(-100))
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-6)


def test_numpy_steps_train_that_many_steps():
    history = train.train(torch.nn.Linear(2, 1), [torch.randn(1, 2)], lambda m, b: m(b).sum(), steps=np.int64(3),
                          lr=np.float32(1e-3), warmup_steps=np.int64(0), progress=False)
    assert history["step"] == [1.0, 2.0, 3.0]


def test_numpy_sizes_give_a_model_whose_config_saves(tmp_path):
    # A NumPy integer left in the config would make save_pretrained's JSON fail.
    model = models.tiny_model(vocab_size=np.int64(64), hidden_size=np.int64(32), num_attention_heads=np.int64(4),
                              num_key_value_heads=torch.tensor(2), num_hidden_layers=np.int32(1))
    model.save_pretrained(tmp_path)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tmp_path)
    assert (config.vocab_size, config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
            config.num_hidden_layers) == (64, 32, 4, 2, 1)


def test_numpy_max_length_truncates_like_a_python_int(tokenizer):
    full = data.encode_sft(tokenizer, "What is 2+2?", "It is four, as two and two make four.")
    n = len(full["input_ids"]) - 3
    cut = data.encode_sft(tokenizer, "What is 2+2?", "It is four, as two and two make four.", max_length=np.int64(n))
    assert cut["input_ids"] == full["input_ids"][:n] and cut["labels"] == full["labels"][:n]


# --- edge cases with a correct result, against the references ---------------------------

def test_lora_on_an_untied_lm_head_merges_without_touching_the_embedding():
    # apply_lora refuses the tied head (table above); untied as its error says, merging is exact.
    model = models.tiny_model(seed=0)
    embedding = model.get_input_embeddings().weight.detach().clone()
    with pytest.raises(ValueError, match="untie it first"):
        lora.apply_lora(model, ["lm_head"], r=2, lora_alpha=4)
    assert lora.lora_layers(model) == [] and model.lm_head.weight is model.get_input_embeddings().weight
    layer = model.get_submodule("lm_head")
    layer.weight = torch.nn.Parameter(layer.weight.detach().clone())
    model.config.tie_word_embeddings = False
    lora.apply_lora(model, ["lm_head"], r=2, lora_alpha=4)
    head = model.lm_head
    torch.nn.init.normal_(head.lora_B.weight)  # a trained-looking, non-zero update
    ids = torch.randint(3, TINY_V, (2, 7))
    with torch.no_grad():
        hidden = model.model(ids).last_hidden_state
        unmerged = model(ids).logits
        # The closed form W h + (alpha / r) B A h, from the layer's own matrices.
        expected = hidden @ head.base.weight.T + (hidden @ head.lora_A.weight.T @ head.lora_B.weight.T) * (4 / 2)
        lora.merge_lora(model)
        merged = model(ids).logits
    torch.testing.assert_close(unmerged, expected, **utils.tolerance(torch.float32, "op"))
    torch.testing.assert_close(merged, unmerged, **utils.tolerance(torch.float32, "op"))
    assert torch.equal(model.get_input_embeddings().weight, embedding)


def test_generate_warns_past_the_context_and_matches_transformers():
    model = models.tiny_model(seed=0)  # max_position_embeddings = 512
    ids = torch.randint(3, TINY_V, (1, 510))
    with pytest.warns(UserWarning, match=r"input_ids \(510 tokens\) plus max_new_tokens \(4\) exceed the model's "
                                         r"context of 512 positions"):
        ours = sampling.generate(model, ids, max_new_tokens=4, temperature=0, eos_token_id=[])
    theirs = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                            eos_token_id=None, pad_token_id=2)
    assert torch.equal(ours, theirs)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # within the context: no warning
        sampling.generate(model, ids[:, :500], max_new_tokens=4, temperature=0, eos_token_id=[])


def test_generate_takes_a_bool_left_padded_mask_like_transformers(ctx):
    mask = torch.tensor([[True] * 5, [False, False, True, True, True]])
    ours = sampling.generate(ctx.tiny, ctx.ids, attention_mask=mask, max_new_tokens=4, temperature=0, eos_token_id=[])
    theirs = ctx.tiny.generate(ctx.ids, attention_mask=mask.long(), max_new_tokens=4, do_sample=False,
                               eos_token_id=None, pad_token_id=2)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dpo_loss_of_half_precision_logps_is_float32_and_the_closed_form(dtype):
    pc, pr, rc, rr = (torch.tensor(v, dtype=dtype) for v in ([-12.5, -30.0], [-14.0, -29.0], [-13.0, -31.0],
                                                             [-13.5, -28.0]))
    losses_, chosen, rejected = dpo.dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert losses_.dtype == chosen.dtype == rejected.dtype == torch.float32
    d = [x.double() for x in (pc, pr, rc, rr)]  # the same (exactly representable) inputs in float64
    margin = 0.1 * ((d[0] - d[2]) - (d[1] - d[3]))
    expected = torch.tensor([math.log1p(math.exp(-m)) for m in margin.tolist()], dtype=torch.float64)
    torch.testing.assert_close(losses_.double(), expected, rtol=1e-6, atol=1e-7)


def test_dpo_loss_at_a_huge_margin_is_plus_zero_and_ln2_at_none():
    zero = torch.tensor([0.0])
    losses_, _, _ = dpo.dpo_loss(zero, torch.tensor([-50_000.0]), zero, zero, beta=0.1)  # margin +5000
    assert losses_.item() == math.log1p(math.exp(-5000)) == 0.0
    assert math.copysign(1.0, losses_.item()) == 1.0  # +0.0, not -0.0
    losses_, _, _ = dpo.dpo_loss(torch.tensor([-50_000.0]), zero, zero, zero, beta=0.1)  # margin -5000
    assert losses_.item() == 5000.0
    losses_, _, _ = dpo.dpo_loss(zero, zero, zero, zero)
    assert losses_.item() == pytest.approx(math.log(2), abs=1e-7)


def test_empty_rows_give_empty_log_probabilities_like_torch():
    x, index = torch.randn(0, V), torch.zeros(0, dtype=torch.long)
    expected = torch.log_softmax(x, dim=-1)
    assert torch.equal(losses.log_softmax(x), expected)
    got = losses.selective_log_softmax(x, index)
    assert got.shape == expected.gather(-1, index[:, None]).squeeze(-1).shape == (0,)
    got = losses.selective_log_softmax(torch.randn(2, 0, V), torch.zeros(2, 0, 3, dtype=torch.long))
    assert got.shape == (2, 0, 3)


def test_history_mean_of_the_last_steps_is_their_mean(ctx):
    h = ctx.history()
    assert h.mean() == (2.0 + 1.0) / 2 and h.mean(last=1) == 1.0 and h.mean("grad_norm", last=np.int64(2)) == 0.75
    assert h.last("grad_norm") == 0.5


def test_write_jsonl_refuses_before_replacing_the_file(tmp_path):
    path = data.write_jsonl(tmp_path / "rows.jsonl", [{"a": 1}])
    with pytest.raises(TypeError, match="row 2 is a str"):
        data.write_jsonl(path, [{"a": 2}, "b"])
    assert path.read_text() == '{"a": 1}\n'  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["rows.jsonl"]  # no temporary file left
