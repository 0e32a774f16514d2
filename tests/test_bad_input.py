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

from llmbook import data, dpo, hallucination as H, lora, losses, models, plots, prefix, sampling, tasks, train, utils

V = 16  # vocabulary of the small logits
TINY_V = 256  # vocabulary of models.tiny_model


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models.default_model_path())
    tok.pad_token = tok.pad_token or tok.eos_token
    return tok


@pytest.fixture(scope="module")
def tiny():
    return models.tiny_model(seed=0)


@pytest.fixture(scope="module")
def chat_model(tokenizer):
    return models.tiny_model(seed=0, vocab_size=len(tokenizer))


class Ctx:
    """What the table's calls need: small tensors, a tiny model, the real tokenizer."""

    def __init__(self, tiny, tokenizer, chat_model):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(2, V, generator=g)                      # (B, V) next-token logits
        self.logits = torch.randn(2, 5, V, generator=g)              # (B, T, V)
        self.labels = torch.randint(0, V, (2, 5), generator=g)       # (B, T)
        self.hidden = torch.randn(2, 5, 8, generator=g)              # (B, T, H)
        self.weight = torch.randn(V, 8, generator=g)                 # (V, H)
        self.ids = torch.randint(3, TINY_V, (2, 5), generator=g)     # prompts for the tiny model
        self.logps = torch.randn(3, generator=g) - 5                 # (B,) log-probabilities
        self.tiny, self.tok, self.chat_model = tiny, tokenizer, chat_model

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

    def train(self, **kwargs):
        args = dict(steps=1, progress=False)
        return train.train(torch.nn.Linear(2, 1), [torch.randn(1, 2)], kwargs.pop("loss_fn", lambda m, b: m(b).sum()),
                           **{**args, **kwargs})

    def lora_linear(self, **kwargs):
        return lora.LoRALinear(torch.nn.Linear(16, 16), **{"r": 2, "lora_alpha": 4, **kwargs})

    def qa_batch(self, **overrides):
        ids = torch.randint(3, TINY_V, (2, 6))
        labels = ids.clone()
        labels[:, :3] = -100
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
                "unknown": torch.tensor([True, False]), **overrides}


@pytest.fixture(scope="module")
def ctx(tiny, tokenizer, chat_model):
    return Ctx(tiny, tokenizer, chat_model)


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
     ValueError, "pad_token_id must be >= 0"),
    ("generate-eos-str", lambda c: sampling.generate(c.tiny, c.ids, max_new_tokens=2, eos_token_id=["a"]), TypeError,
     "eos_token_id"),
    # --- losses
    ("log_softmax-int", lambda c: losses.log_softmax(torch.arange(3)), TypeError, "logits must be a floating-point"),
    ("sft_loss-ignore_index-float", lambda c: losses.sft_loss(c.logits, c.labels, ignore_index=-100.5), TypeError,
     "ignore_index must be an integer"),
    ("sft_loss-no-response", lambda c: losses.sft_loss(c.logits, torch.full((2, 5), -100)), ValueError,
     "no response token"),
    ("sft_loss-labels-shape", lambda c: losses.sft_loss(c.logits, c.labels[:1]), ValueError,
     r"labels must have shape \(2, 5\)"),
    ("selective-index-float", lambda c: losses.selective_log_softmax(c.x, torch.zeros(2)), TypeError,
     "index must be an integer tensor"),
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
    ("batch-pad_token_id-float", lambda c: dpo.concatenated_inputs(c.pref_batch(), pad_token_id=1.5), TypeError,
     "pad_token_id must be an integer"),
    ("batch-mismatched", lambda c: dpo.concatenated_inputs(c.pref_batch(**{
        f"rejected_{n}": c.pref_batch()[f"rejected_{n}"][:1] for n in ("input_ids", "attention_mask", "labels")})),
     ValueError, "mismatched batch sizes"),
    ("compute_loss-beta-negative", lambda c: dpo.compute_loss(c.tiny, c.pref_batch(), beta=-1), ValueError,
     "beta must be .*> 0"),
    # --- lora
    ("r-float", lambda c: c.lora_linear(r=2.5), TypeError, "r must be an integer"),
    ("r-np-zero", lambda c: c.lora_linear(r=np.int64(0)), ValueError, "r must be >= 1"),
    ("r-too-large", lambda c: c.lora_linear(r=100), ValueError, r"r must be at most min\(in_features, out_features\) = 16"),
    ("lora_alpha-inf", lambda c: c.lora_linear(lora_alpha=math.inf), ValueError, "lora_alpha must be finite and > 0"),
    ("lora_alpha-str", lambda c: c.lora_linear(lora_alpha="8"), TypeError, "lora_alpha must be a real number"),
    ("lora_alpha-zero", lambda c: c.lora_linear(lora_alpha=0), ValueError, "lora_alpha must be .*> 0"),
    ("lora_dropout-str", lambda c: c.lora_linear(lora_dropout="0.1"), TypeError, "lora_dropout must be a real number"),
    ("lora_dropout-one", lambda c: c.lora_linear(lora_dropout=1.0), ValueError, r"lora_dropout must be in \[0, 1\)"),
    ("target_modules-int", lambda c: lora.apply_lora(models.tiny_model(), 5, r=2, lora_alpha=4), TypeError,
     "target_modules must be"),
    ("apply_lora-r-zero", lambda c: lora.apply_lora(models.tiny_model(), ["q_proj"], r=0, lora_alpha=4), ValueError,
     "r must be >= 1"),
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
    ("weight_decay-negative", lambda c: c.train(weight_decay=-0.1), ValueError, "weight_decay must be .*>= 0"),
    ("loss_fn-none", lambda c: c.train(loss_fn=None), TypeError, "loss_fn must be callable"),
    # --- models
    ("tiny-kv-heads-zero", lambda c: models.tiny_model(num_key_value_heads=0), ValueError,
     "num_key_value_heads must be >= 1"),
    ("tiny-hidden-indivisible", lambda c: models.tiny_model(hidden_size=30, num_attention_heads=4), ValueError,
     r"hidden_size \(30\) must be a multiple of num_attention_heads \(4\)"),
    ("tiny-vocab-float", lambda c: models.tiny_model(vocab_size=2.5), TypeError, "vocab_size must be an integer"),
    ("tiny-dtype-int", lambda c: models.tiny_model(dtype=torch.int64), TypeError, "dtype must be a floating"),
    ("chat-max_new_tokens-zero", lambda c: models.chat(c.chat_model, c.tok, "Hi", max_new_tokens=0), ValueError,
     "max_new_tokens must be >= 1"),
    ("load_model-name-int", lambda c: models.load_model(123), TypeError, "name must be a model id or a path"),
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
    # --- tasks
    ("tasks-max_new_tokens-np-zero", lambda c: tasks.generate_answers(c.chat_model, c.tok, ["hi"],
                                                                      max_new_tokens=np.int64(0)),
     ValueError, "max_new_tokens must be >= 1"),
    ("tasks-batch_size-float", lambda c: tasks.generate_answers(c.chat_model, c.tok, ["hi"], batch_size=1.5), TypeError,
     "batch_size must be an integer"),
    # --- hallucination
    ("halluc-temperature-inf", lambda c: H.generate_answers(c.chat_model, c.tok, ["Hi?"], num_samples=1,
                                                            temperature=math.inf),
     ValueError, "temperature must be finite and > 0"),
    ("halluc-temperature-str", lambda c: H.generate_answers(c.chat_model, c.tok, ["Hi?"], temperature="hot"), TypeError,
     "temperature must be a real number"),
    ("halluc-num_samples-float", lambda c: H.generate_answers(c.chat_model, c.tok, ["Hi?"], num_samples=1.5), TypeError,
     "num_samples must be an integer"),
    ("halluc-generator-int", lambda c: H.generate_answers(c.chat_model, c.tok, ["Hi?"], num_samples=1, generator=0),
     TypeError, "generator must be a torch.Generator"),
    ("probe-num_samples-zero", lambda c: H.probe(c.chat_model, c.tok, [{"question": "Hi?", "answer": "x"}],
                                                 num_samples=0),
     ValueError, "num_samples must be >= 1"),
    ("threshold-str", lambda c: H.confident_wrong_rate([True], [0.5], threshold="high"), TypeError,
     "threshold must be a real number"),
    ("threshold-above-1", lambda c: H.confident_wrong_rate([True], [0.5], threshold=1.5), ValueError,
     r"threshold must be in \[0, 1\]"),
    ("group-unknown-shape", lambda c: H.sft_loss_by_group(c.tiny, c.qa_batch(unknown=torch.tensor([True]))), ValueError,
     r"unknown must have shape \(2,\)"),
    # --- utils and plots (outside the numeric policy)
    ("time_call-repeat-zero", lambda c: utils.time_call(lambda: None, repeat=0), ValueError, "repeat must be >= 1"),
    ("time_call-repeat-float", lambda c: utils.time_call(lambda: None, repeat=2.5), TypeError,
     "repeat must be an integer"),
    ("time_call-warmup-negative", lambda c: utils.time_call(lambda: None, warmup=-1), ValueError,
     "warmup must be >= 0"),
    ("seed-str", lambda c: utils.seed_everything("a"), TypeError, "seed must be an integer"),
    ("smooth-window-zero", lambda c: plots.smooth([1.0, 2.0], 0), ValueError, "window must be >= 1"),
    ("smooth-window-float", lambda c: plots.smooth([1.0, 2.0], 1.5), TypeError, "window must be an integer"),
]


@pytest.mark.parametrize("call, error, pattern", [row[1:] for row in BAD], ids=[row[0] for row in BAD])
def test_bad_input_is_named(ctx, call, error, pattern):
    with pytest.raises(error, match=pattern):
        call(ctx)


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
