"""llmbook.sampling against the transformers library's logits warpers and generate."""

import math

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from llmbook import models
from llmbook.data import chat_prompt
from llmbook.sampling import (
    apply_temperature,
    generate,
    generate_answers,
    left_pad,
    newline_token_ids,
    min_p_filter,
    position_ids,
    prefix_cache,
    sample_next_token,
    top_k_filter,
    top_p_filter,
)
from llmbook.utils import tolerance

V = 64


def logits_with_ties(seed: int, batch: int = 6, vocab: int = V) -> torch.Tensor:
    """Random logits rounded to a coarse grid (many exact ties), one row peaked and one flat."""
    g = torch.Generator().manual_seed(seed)
    x = torch.round(torch.randn(batch, vocab, generator=g) * 2) / 2  # values on a 0.5 grid: ties everywhere
    x[0, 3] = 12.0  # nearly all the mass on one token
    x[1] = 0.25  # all tokens tied
    x[2, :5] = 4.0  # five tied leaders
    return x


SEEDS = [0, 1, 2]
TEMPERATURES = [0.05, 0.5, 1.0, 1.7, 10.0]
TOP_PS = [1e-6, 0.1, 0.5, 0.9, 0.999, 1.0]
TOP_KS = [1, 3, 5, 17, V, V + 10]
MIN_PS = [0.0, 0.01, 0.1, 0.5, 1.0]
KEEPS = [1, 2, 7]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_temperature_equals_warper(seed, temperature):
    x = logits_with_ties(seed)
    assert torch.equal(apply_temperature(x, temperature), TemperatureLogitsWarper(temperature)(None, x))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("top_k", TOP_KS)
@pytest.mark.parametrize("keep", KEEPS)
def test_top_k_equals_warper(seed, top_k, keep):
    x = logits_with_ties(seed)
    ours = top_k_filter(x, top_k, min_tokens_to_keep=keep)
    assert torch.equal(ours, TopKLogitsWarper(top_k, min_tokens_to_keep=keep)(None, x))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("top_p", TOP_PS)
@pytest.mark.parametrize("keep", KEEPS)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_top_p_equals_warper(seed, top_p, keep, temperature):
    x = logits_with_ties(seed) / temperature
    ours = top_p_filter(x, top_p, min_tokens_to_keep=keep)
    assert torch.equal(ours, TopPLogitsWarper(top_p, min_tokens_to_keep=keep)(None, x))
    assert (torch.isfinite(ours).sum(-1) >= min(keep, V)).all()


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("min_p", MIN_PS)
@pytest.mark.parametrize("keep", KEEPS)
def test_min_p_equals_warper(seed, min_p, keep):
    x = logits_with_ties(seed)
    ours = min_p_filter(x, min_p, min_tokens_to_keep=keep)
    assert torch.equal(ours, MinPLogitsWarper(min_p, min_tokens_to_keep=keep)(None, x))


@pytest.mark.parametrize("top_k", [2, 5])
@pytest.mark.parametrize("top_p", [0.3, 0.9])
def test_chained_filters_equal_chained_warpers(top_k, top_p):
    x = logits_with_ties(7)
    ours = top_p_filter(top_k_filter(apply_temperature(x, 0.7), top_k), top_p)
    ref = x
    for warper in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(top_k), TopPLogitsWarper(top_p)):
        ref = warper(None, ref)
    assert torch.equal(ours, ref)


def test_filters_equal_warpers_on_fp16_and_a_real_vocabulary_size():
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(3, 49152, generator=g) * 3).half()
    assert torch.equal(top_p_filter(x, 0.9), TopPLogitsWarper(0.9)(None, x))
    assert torch.equal(top_k_filter(x, 50), TopKLogitsWarper(50)(None, x))
    assert torch.equal(min_p_filter(x, 0.05), MinPLogitsWarper(0.05)(None, x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("top_p", [1e-6, 0.3, 0.9, 0.99, 1.0])
def test_top_p_equals_warper_on_continuous_logits(dtype, top_p):
    """No ties, so the cut is a plain threshold on the logit (the path without a second sort)."""
    x = (torch.randn(4, 5000, generator=torch.Generator().manual_seed(0)) * 4).to(dtype)
    x[0, :10] = -math.inf  # tokens already removed by an earlier filter (probability 0)
    assert torch.equal(top_p_filter(x, top_p), TopPLogitsWarper(top_p)(None, x))


def test_top_p_with_a_tie_across_the_cut_follows_the_sort_order():
    x = torch.zeros(3, 8)  # all tied: the tail sums are 1/8, 2/8, ...; p = 0.5 cuts inside the tie
    ours = top_p_filter(x, 0.5)
    assert torch.equal(ours, TopPLogitsWarper(0.5)(None, x))
    assert (torch.isfinite(ours).sum(-1) == 4).all()


def test_top_p_keeps_the_token_where_the_sum_first_reaches_p():
    # p = (0.5, 0.3, 0.15, 0.05): the sums are 0.5, 0.8, 0.95, 1.0.
    x = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    kept = lambda p: torch.isfinite(top_p_filter(x, p)).nonzero().flatten().tolist()  # noqa: E731
    assert kept(0.4) == [0]
    assert kept(0.7) == [0, 1]
    assert kept(0.9) == [0, 1, 2]
    assert kept(0.99) == [0, 1, 2, 3]
    torch.testing.assert_close(top_p_filter(x, 0.7).softmax(-1), torch.tensor([0.625, 0.375, 0.0, 0.0]))


def test_filters_work_on_one_dimensional_logits():
    x = logits_with_ties(3)[3]
    assert torch.equal(top_p_filter(x, 0.5), TopPLogitsWarper(0.5)(None, x[None])[0])
    assert torch.equal(top_k_filter(x, 4), TopKLogitsWarper(4)(None, x[None])[0])


def test_temperature_scales_log_probability_gaps():
    x = torch.randn(10)
    for t in (0.3, 3.0):
        logp = torch.log_softmax(apply_temperature(x, t), -1)
        torch.testing.assert_close(logp - logp[0], (x - x[0]) / t)


@pytest.mark.parametrize("settings", [dict(), dict(temperature=0.7, top_p=0.9), dict(top_k=5, temperature=1.5),
                                      dict(min_p=0.1)])
def test_sample_next_token_draws_like_transformers(settings):
    """Same warpers in the same order, then softmax and torch.multinomial with the global generator."""
    x = logits_with_ties(11, batch=8)
    torch.manual_seed(123)
    ours = torch.stack([sample_next_token(x, **settings) for _ in range(20)])
    ref_scores = x
    if settings.get("temperature", 1.0) != 1.0:
        ref_scores = TemperatureLogitsWarper(settings["temperature"])(None, ref_scores)
    if "top_k" in settings:
        ref_scores = TopKLogitsWarper(settings["top_k"])(None, ref_scores)
    if settings.get("top_p", 1.0) < 1.0:
        ref_scores = TopPLogitsWarper(settings["top_p"])(None, ref_scores)
    if "min_p" in settings:
        ref_scores = MinPLogitsWarper(settings["min_p"])(None, ref_scores)
    torch.manual_seed(123)
    probs = ref_scores.softmax(-1)
    ref = torch.stack([torch.multinomial(probs, 1).squeeze(1) for _ in range(20)])
    assert torch.equal(ours, ref)


def test_sampling_is_reproducible_with_a_seed_or_a_generator():
    x = torch.randn(4, V)
    a = [sample_next_token(x, 1.2, generator=torch.Generator().manual_seed(9)) for _ in range(2)]
    assert torch.equal(a[0], a[1])
    torch.manual_seed(9)
    b = sample_next_token(x, 1.2)
    torch.manual_seed(9)
    assert torch.equal(b, sample_next_token(x, 1.2))
    g = torch.Generator().manual_seed(1)
    draws = torch.stack([sample_next_token(x, 1.2, generator=g) for _ in range(30)])
    assert len(set(draws[:, 0].tolist())) > 1, "successive draws from one generator differ"


def test_temperature_zero_is_greedy_and_filtered_tokens_are_never_drawn():
    x = torch.randn(5, V)
    assert torch.equal(sample_next_token(x, temperature=0), x.argmax(-1))
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_next_token(x, top_k=3, generator=g) for _ in range(200)])  # (200, 5)
    top3 = x.topk(3).indices
    assert all(d in top3[row] for row in range(5) for d in draws[:, row].tolist())
    assert sample_next_token(x[0], temperature=0).ndim == 0


def test_sampling_frequencies_follow_the_filtered_distribution():
    x = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_next_token(x, temperature=0.8, top_p=0.8, generator=g) for _ in range(4000)])
    freq = torch.bincount(draws.flatten(), minlength=5).float() / draws.numel()
    expected = top_p_filter(x / 0.8, 0.8).softmax(-1)[0]
    torch.testing.assert_close(freq, expected, atol=0.03, rtol=0)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda x: apply_temperature(x, 0.0), "temperature"),
        (lambda x: apply_temperature(x, -1.0), "temperature"),
        (lambda x: apply_temperature(x, math.inf), "temperature"),
        (lambda x: sample_next_token(x, temperature=-0.5), "temperature"),
        (lambda x: sample_next_token(x, temperature=math.nan), "temperature"),
        (lambda x: top_p_filter(x, 0.0), r"top_p must be in \(0, 1\]"),
        (lambda x: top_p_filter(x, 1.5), r"top_p must be in \(0, 1\]"),
        (lambda x: top_p_filter(x, -0.1), r"top_p must be in \(0, 1\]"),
        (lambda x: sample_next_token(x, top_p=0.0), r"top_p must be in \(0, 1\]"),
        (lambda x: top_p_filter(x, 0.5, min_tokens_to_keep=0), "min_tokens_to_keep"),
        (lambda x: top_k_filter(x, 0), "top_k must be >= 1"),
        (lambda x: top_k_filter(x, -3), "top_k must be >= 1"),
        (lambda x: sample_next_token(x, top_k=0), "top_k must be >= 1"),
        (lambda x: min_p_filter(x, 1.5), r"min_p must be in \[0, 1\]"),
        (lambda x: min_p_filter(x, -0.1), r"min_p must be in \[0, 1\]"),
    ],
)
def test_bad_settings_raise_value_errors_naming_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call(torch.randn(2, V))


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda x: top_k_filter(x, 2.5), TypeError),
        (lambda x: sample_next_token(x, temperature="hot"), TypeError),
        (lambda x: top_p_filter(x, True), TypeError),
        (lambda x: sample_next_token(x.long()), TypeError),
        (lambda x: sample_next_token(x.tolist()), TypeError),
        (lambda x: sample_next_token(x, generator=0), TypeError),
        (lambda x: sample_next_token(x[None]), ValueError),
    ],
)
def test_bad_types_raise(call, error):
    with pytest.raises(error):
        call(torch.randn(2, V))


@pytest.mark.parametrize("fn", [
    lambda x: apply_temperature(x, 0.7), lambda x: top_k_filter(x, 3), lambda x: top_p_filter(x, 0.9),
    lambda x: min_p_filter(x, 0.1), lambda x: sample_next_token(x), lambda x: sample_next_token(x, temperature=0),
])
def test_nan_and_positive_infinite_logits_are_rejected(fn):
    x = torch.randn(2, V)
    x[1, 5] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        fn(x)
    x[1, 5] = math.inf
    with pytest.raises(ValueError, match=r"\+inf"):
        fn(x)


def test_a_row_of_only_minus_infinity_is_rejected():
    x = torch.randn(2, V)
    x[0] = -math.inf
    with pytest.raises(ValueError, match="-inf"):
        sample_next_token(x)


# --- generate against transformers' generate, on a tiny random model --------------------------------

@pytest.fixture(scope="module")
def tiny():
    return models.tiny_model(seed=0, vocab_size=128)


def hf_generate(model, ids, n, temperature, top_p, top_k, **kw):
    if temperature == 0:
        sampling_kw = dict(do_sample=False)
    else:
        sampling_kw = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k or 0)
    return model.generate(ids, max_new_tokens=n, **sampling_kw, **kw)


SETTINGS = [(1.0, 1.0, None), (0.7, 0.9, None), (1.5, 1.0, 20), (0.9, 0.5, 10), (0.0, 1.0, None)]


@pytest.mark.parametrize("temperature, top_p, top_k", SETTINGS)
def test_generate_equals_transformers_with_the_same_seed(tiny, temperature, top_p, top_k):
    ids = torch.randint(3, 128, (3, 7), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(42)
    ours = generate(tiny, ids, max_new_tokens=12, temperature=temperature, top_p=top_p, top_k=top_k,
                    eos_token_id=None)
    torch.manual_seed(42)
    ref = hf_generate(tiny, ids, 12, temperature, top_p, top_k, attention_mask=torch.ones_like(ids),
                      eos_token_id=None, pad_token_id=2)
    assert torch.equal(ours, ref)


def test_generate_with_min_p_equals_transformers(tiny):
    ids = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(4))
    torch.manual_seed(7)
    ours = generate(tiny, ids, max_new_tokens=10, temperature=1.2, top_k=30, min_p=0.1)
    torch.manual_seed(7)
    ref = tiny.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=True,
                        temperature=1.2, top_k=30, min_p=0.1, pad_token_id=2)
    assert torch.equal(ours, ref)


def test_generate_equals_transformers_with_left_padding_and_eos():
    model = models.tiny_model(seed=1, vocab_size=16)  # a small vocabulary, so eos (2) comes up soon
    ids = torch.randint(3, 16, (4, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    mask[3, :4] = 0
    ids = ids.masked_fill(mask == 0, 2)
    lengths = []
    for seed in range(4):
        torch.manual_seed(seed)
        ours = generate(model, ids, attention_mask=mask, max_new_tokens=40, temperature=3.0, eos_token_id=2,
                        pad_token_id=0)
        torch.manual_seed(seed)
        ref = hf_generate(model, ids, 40, 3.0, 1.0, None, attention_mask=mask, eos_token_id=2, pad_token_id=0)
        assert torch.equal(ours, ref)
        lengths.append(ours.shape[1])
    assert min(lengths) < 6 + 40, "in some run every row ended early at eos"
    new = ours[:, 6:]
    ended = [row for row in new.tolist() if 2 in row[:-1]]
    assert ended, "some row ended before the last step"
    assert all(set(row[row.index(2) + 1:]) == {0} for row in ended), "after eos a row holds only padding"


def test_generate_with_a_generator_is_reproducible_and_leaves_the_global_generator_alone(tiny):
    ids = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a = generate(tiny, ids, max_new_tokens=8, generator=torch.Generator().manual_seed(5), eos_token_id=[])
    assert torch.equal(torch.get_rng_state(), before)
    b = generate(tiny, ids, max_new_tokens=8, generator=torch.Generator().manual_seed(5), eos_token_id=[])
    assert torch.equal(a, b) and a.shape == (2, 13)


def test_generate_rejects_bad_input(tiny):
    ids = torch.randint(3, 128, (2, 5))
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(tiny, ids, max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        generate(tiny, ids, max_new_tokens=2, temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        generate(tiny, ids, max_new_tokens=2, top_p=0)
    with pytest.raises(TypeError, match="input_ids must be an integer tensor"):
        generate(tiny, ids.float(), max_new_tokens=2)
    with pytest.raises(ValueError, match="attention_mask"):
        generate(tiny, ids, max_new_tokens=2, attention_mask=torch.ones(2, 4))



# --- a prefix shared by every prompt, encoded once ----------------------------------------------

def _rows_after_a_prefix(seed):
    """A 6-token prefix and three rows of 2-5 tokens after it (left-padded), and the whole prompts."""
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(3, 128, (6,), generator=g)
    rows = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (5, 2, 4)]
    ids, mask = left_pad(rows, 2)
    full_ids, full_mask = left_pad([prefix.tolist() + r for r in rows], 2)
    return prefix, ids, mask, full_ids, full_mask


@pytest.mark.parametrize("temperature, top_p, copies, greedy_first", [
    (0.0, 1.0, 1, False), (1.3, 1.0, 1, False), (0.8, 0.9, 3, True)])
def test_generate_after_a_shared_prefix_equals_transformers_on_the_whole_prompts(temperature, top_p, copies,
                                                                                 greedy_first):
    model = models.tiny_model(seed=3, vocab_size=128, dtype=torch.float64)  # float64: no rounding near-ties
    prefix, ids, mask, full_ids, full_mask = _rows_after_a_prefix(0)
    shared = prefix_cache(model, prefix)
    kw = dict(max_new_tokens=9, temperature=temperature, top_p=top_p, eos_token_id=2, pad_token_id=0,
              output_logps=True, num_return_sequences=copies, greedy_first=greedy_first)
    torch.manual_seed(5)
    ours, ours_logps = generate(model, ids, attention_mask=mask, prefix=shared, **kw)
    torch.manual_seed(5)
    whole, whole_logps = generate(model, full_ids, attention_mask=full_mask, **kw)
    assert torch.equal(ours[:, ids.shape[1]:], whole[:, full_ids.shape[1]:])
    assert torch.equal(ours[:, :ids.shape[1]], ids.repeat_interleave(copies, 0)), "rows start with input_ids"
    torch.testing.assert_close(ours_logps, whole_logps, rtol=1e-10, atol=1e-10)
    if not greedy_first:  # transformers' generate on the whole prompts, under the same seed
        torch.manual_seed(5)
        ref = hf_generate(model, full_ids, 9, temperature, top_p, None, attention_mask=full_mask,
                          num_return_sequences=copies, eos_token_id=2, pad_token_id=0)
        assert torch.equal(ours[:, ids.shape[1]:], ref[:, full_ids.shape[1]:])
    # the same prefix serves a second call, and a batch without padding
    again = generate(model, ids[:1, -5:], prefix=shared, max_new_tokens=9, temperature=0, eos_token_id=[])
    alone = generate(model, full_ids[:1, -11:], max_new_tokens=9, temperature=0, eos_token_id=[])
    assert torch.equal(again[:, 5:], alone[:, 11:])


def test_generate_answers_encodes_the_shared_prefix_once_with_the_same_answers(chat_model, tokenizer):
    prompts = QUESTIONS + ["Hi"]
    fed = []
    handle = chat_model.model.embed_tokens.register_forward_hook(lambda m, args, out: fed.append(args[0].numel()))

    def run(share):
        fed.clear()
        answers = generate_answers(chat_model, tokenizer, prompts, system="Answer briefly.", max_new_tokens=5,
                                   num_samples=3, batch_size=2, share_prefix=share,
                                   generator=torch.Generator().manual_seed(0))
        return answers, fed[:]

    try:
        shared, shared_fed = run(True)
        whole, whole_fed = run(False)
    finally:
        handle.remove()
    assert shared.greedy == whole.greedy and shared.samples == whole.samples
    for a, b in zip(shared.greedy_logps, whole.greedy_logps):
        assert a == pytest.approx(b, abs=1e-4)
    texts = [tokenizer(chat_prompt(tokenizer, p, "Answer briefly."), add_special_tokens=False).input_ids
             for p in prompts]
    common = next(i for i in range(min(map(len, texts))) if len({t[i] for t in texts}) > 1)
    assert common > 10, "the template's header and the system message are shared"
    # the prefix is encoded once (one row); each prompt pass then feeds every row without it
    assert shared_fed[0] == common and whole_fed[0] == 2 * max(len(t) for t in texts[:2])
    assert sum(whole_fed) - sum(shared_fed) == common * len(prompts) - common, (shared_fed, whole_fed)


def test_a_prefix_encoded_by_another_model_is_refused(tiny):
    # (the other refusals are rows of tests/test_bad_input.py)
    other = models.tiny_model(seed=1, vocab_size=128)
    with pytest.raises(ValueError, match="prefix was encoded by another model"):
        generate(tiny, torch.randint(3, 128, (2, 4)), max_new_tokens=2, prefix=prefix_cache(other, [5, 6]))

# --- answering a batch of prompts (the book's one generation path) ----------------------------

QUESTIONS = ["What is the capital of France?", "In which country is the city of Osaka?",
             "What is the capital of the Czech Republic, a country in central Europe?"]
STEMS = ["The capital of France is", "Osaka is in", "The capital of the Czech Republic is"]


def _reference_greedy(model, tokenizer, question, stem, max_new_tokens):
    """transformers' generate on one unpadded prompt: the reference for our batched loop."""
    text = chat_prompt(tokenizer, question, "Answer briefly.") + stem
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         output_scores=True, return_dict_in_generate=True)
    new = out.sequences[0, ids.shape[1]:]
    logp = [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(out.scores, new)]
    stop = next((i + 1 for i, t in enumerate(new.tolist()) if t == tokenizer.eos_token_id), len(new))
    return tokenizer.decode(new, skip_special_tokens=True).strip(), math.exp(sum(logp[:stop])), math.exp(logp[0])


@pytest.mark.parametrize("batch_size", [1, 3])
def test_greedy_answers_match_transformers_generate(chat_model, tokenizer, batch_size):
    model = chat_model
    answers = generate_answers(model, tokenizer, QUESTIONS, stems=STEMS, system="Answer briefly.",
                                 max_new_tokens=5, batch_size=batch_size)
    for q, s, g, p, p1 in zip(QUESTIONS, STEMS, answers.greedy, answers.greedy_prob, answers.first_prob):
        ref, ref_p, ref_p1 = _reference_greedy(model, tokenizer, q, s, 5)
        assert g == ref
        assert p == pytest.approx(ref_p, rel=1e-4) and p1 == pytest.approx(ref_p1, rel=1e-4)
    assert answers.samples == []


def test_samples_are_reproducible_and_follow_the_temperature(chat_model, tokenizer):
    model = chat_model
    def run(seed, temperature):
        return generate_answers(model, tokenizer, QUESTIONS, stems=STEMS, num_samples=4, temperature=temperature,
                                  max_new_tokens=4, generator=torch.Generator().manual_seed(seed)).samples

    first = run(0, 1.0)
    assert first == run(0, 1.0) and first != run(1, 1.0)
    assert all(len(s) == 4 for s in first)
    # A temperature near 0 makes every sample the greedy answer.
    greedy = generate_answers(model, tokenizer, QUESTIONS, stems=STEMS, max_new_tokens=4).greedy
    assert [set(s) for s in run(0, 1e-4)] == [{g} for g in greedy]


def test_batched_answers_equal_one_by_one_generate_and_leave_the_tokenizer_alone(chat_model, tokenizer):
    prompts = QUESTIONS + ["Hi"]
    side = tokenizer.padding_side
    chat_model.train()
    answers = generate_answers(chat_model, tokenizer, prompts, max_new_tokens=6, batch_size=4)
    assert chat_model.training, "the model is back in the mode it was in"
    chat_model.eval()
    assert tokenizer.padding_side == side
    for prompt, answer, stopped in zip(prompts, answers.greedy, answers.stopped):
        ids = tokenizer(chat_prompt(tokenizer, prompt), return_tensors="pt", add_special_tokens=False).input_ids
        out = chat_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id)
        assert answer == tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
        assert stopped == (tokenizer.eos_token_id in out[0, ids.shape[1]:].tolist())


def test_num_return_sequences_copies_the_prompt_pass_like_transformers(tiny):
    ids = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(8))
    ours = generate(tiny, ids, max_new_tokens=6, temperature=0, num_return_sequences=3, eos_token_id=[])
    repeated = ids.repeat_interleave(3, dim=0)  # transformers repeats greedy prompts only through the input
    ref = tiny.generate(repeated, attention_mask=torch.ones_like(repeated), max_new_tokens=6, do_sample=False,
                        pad_token_id=2)
    assert torch.equal(ours, ref)
    torch.manual_seed(3)
    ours = generate(tiny, ids, max_new_tokens=6, temperature=1.3, num_return_sequences=3, eos_token_id=[])
    torch.manual_seed(3)
    ref = hf_generate(tiny, ids, 6, 1.3, 1.0, None, attention_mask=torch.ones_like(ids), num_return_sequences=3,
                      pad_token_id=2)
    assert torch.equal(ours, ref)


def test_greedy_first_decodes_one_row_greedily_without_changing_the_samples(tiny):
    ids = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(9))
    mixed = generate(tiny, ids, max_new_tokens=6, num_return_sequences=4, greedy_first=True, eos_token_id=[],
                     generator=torch.Generator().manual_seed(1))
    sampled = generate(tiny, ids, max_new_tokens=6, num_return_sequences=4, eos_token_id=[],
                       generator=torch.Generator().manual_seed(1))
    greedy = tiny.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=2)
    assert torch.equal(mixed[0::4], greedy)
    # the other rows are drawn as if no row were greedy, as long as the rows' draws do not depend on each other
    keep = torch.arange(8) % 4 != 0
    assert torch.equal(mixed[keep], sampled[keep])


def test_output_logps_are_the_models_log_probabilities_of_the_new_tokens(tiny):
    # The reference: one teacher-forced forward over prompt + continuation, torch's log_softmax.
    ids = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(10))
    out, logps = generate(tiny, ids, max_new_tokens=7, temperature=1.5, eos_token_id=[], output_logps=True,
                          generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = torch.log_softmax(tiny(out).logits[:, 4:-1].float(), -1)
    want = full.gather(-1, out[:, 5:, None]).squeeze(-1)
    torch.testing.assert_close(logps, want, **tolerance(torch.float32, "model"))


def test_suppress_tokens_equal_transformers(tiny):
    ids = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(11))
    greedy = generate(tiny, ids, max_new_tokens=5, temperature=0, eos_token_id=[])
    banned = sorted(set(greedy[:, 5:].flatten().tolist()))
    ours = generate(tiny, ids, max_new_tokens=5, temperature=0, eos_token_id=[], suppress_tokens=banned)
    ref = tiny.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                        suppress_tokens=banned, pad_token_id=2)
    assert torch.equal(ours, ref)
    assert not set(ours[:, 5:].flatten().tolist()) & set(banned)


def test_left_pad_and_position_ids():
    ids, mask = left_pad([[5, 6, 7], [8]], 0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert position_ids(mask).tolist() == [[0, 1, 2], [0, 0, 0]]


# --- answer_probability: exact, against transformers' warpers and against sampling -------------------

def _answer_batch(prompt_len=5, answer_len=3, rows=3, seed=0, vocab=128):
    """Rows of prompt + answer with the answer labelled; left padding on row 1 (2 pads)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (rows, prompt_len + answer_len), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0
    labels = torch.full_like(ids, -100)
    labels[:, prompt_len:] = ids[:, prompt_len:]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _reference_probability(model, batch, warpers):
    """prod_t softmax(warpers(logits_t))[y_t], with transformers' warpers on the full logits."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    out = []
    for b in range(logits.shape[0]):
        total = 0.0
        for t in range(logits.shape[1] - 1):
            y = batch["labels"][b, t + 1]
            if y == -100:
                continue
            scores = logits[b, t][None].float()
            for warp in warpers:
                scores = warp(batch["input_ids"][b, : t + 1][None], scores)
            total += torch.log_softmax(scores, -1)[0, y].item()
        out.append(math.exp(total))
    return torch.tensor(out)


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, None, 1.0), (0.7, None, 1.0), (1.3, 20, 0.9),
                                                       (0.5, None, 0.8)])
def test_answer_probability_equals_transformers_warpers(tiny, temperature, top_k, top_p):
    from llmbook.sampling import answer_probability

    batch = _answer_batch()
    # make one answer the likeliest continuation, so that the filters keep its tokens
    greedy = hf_generate(tiny, batch["input_ids"][:1, :5], 3, 0.0, 1.0, None, pad_token_id=2)
    batch["input_ids"][0, 5:] = batch["labels"][0, 5:] = greedy[0, 5:]
    warpers = [TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []
    warpers += [TopKLogitsWarper(top_k)] if top_k else []
    warpers += [TopPLogitsWarper(top_p)] if top_p < 1.0 else []
    ours = answer_probability(tiny, batch, temperature=temperature, top_k=top_k, top_p=top_p)
    ref = _reference_probability(tiny, batch, warpers)
    torch.testing.assert_close(ours, ref, **tolerance(torch.float32, "model"))
    assert ours[0] > 0  # the greedy answer survives every filter
    if top_p < 1.0 or top_k:
        assert (ref[1:] == 0).all() == (ours[1:] == 0).all()  # filtered tokens: probability 0 in both


def test_answer_probability_at_temperature_zero_is_greedy_decodings_verdict(tiny):
    from llmbook.sampling import answer_probability

    batch = _answer_batch(rows=2)
    batch["attention_mask"][:] = 1
    greedy = hf_generate(tiny, batch["input_ids"][:, :5], 3, 0.0, 1.0, None, pad_token_id=2)
    batch["input_ids"][0, 5:] = batch["labels"][0, 5:] = greedy[0, 5:]
    batch["input_ids"][1, 5:] = batch["labels"][1, 5:] = greedy[1, 5:]
    batch["input_ids"][1, 7] = batch["labels"][1, 7] = (greedy[1, 7] + 1) % 128  # last token not greedy's
    assert answer_probability(tiny, batch, temperature=0.0).tolist() == [1.0, 0.0]


def test_answer_probability_of_a_list_of_temperatures_equals_one_call_each(tiny):
    from llmbook.sampling import answer_probability

    batch = _answer_batch()
    sweep = answer_probability(tiny, batch, temperature=[0.5, 1.0, 2.0], top_p=0.95)
    assert sweep.shape == (3, 3)
    for row, T in zip(sweep, [0.5, 1.0, 2.0]):
        assert torch.equal(row, answer_probability(tiny, batch, temperature=T, top_p=0.95))


def test_answer_probability_is_the_frequency_at_which_generate_writes_the_answer(tiny):
    from llmbook.sampling import answer_probability

    prompt = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(3))
    n, settings = 4000, dict(temperature=0.6, top_k=8, top_p=0.9)
    samples = generate(tiny, prompt.expand(n, -1), max_new_tokens=2, eos_token_id=[],
                       generator=torch.Generator().manual_seed(0), **settings)[:, 6:]
    answers, counts = samples.unique(dim=0, return_counts=True)
    top = counts.argsort(descending=True)[:4]  # the four most frequent two-token answers
    ids = torch.cat([prompt.expand(len(top), -1), answers[top]], dim=1)
    labels = torch.full_like(ids, -100)
    labels[:, 6:] = ids[:, 6:]
    p = answer_probability(tiny, {"input_ids": ids, "labels": labels}, **settings)
    freq = counts[top] / n
    se = (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() < 4 * se).all(), (freq, p)
    assert p.sum() > 0.2  # the check compares answers the sampler really writes often


def test_stop_at_newline_cuts_each_answer_after_its_first_line_break(chat_model, tokenizer):
    newline = set(newline_token_ids(tokenizer))
    assert tokenizer("\n", add_special_tokens=False).input_ids[0] in newline
    assert tokenizer(" Paris", add_special_tokens=False).input_ids[0] not in newline
    assert all("\n" in tokenizer.decode([i]) for i in newline)

    def run(stop):  # the tiny random model at a high temperature writes line breaks now and then
        return generate_answers(chat_model, tokenizer, QUESTIONS, stems=STEMS, greedy=False, num_samples=40,
                                temperature=3.0, max_new_tokens=16, strip=False, stop_at_newline=stop,
                                generator=torch.Generator().manual_seed(0))
    cut, whole = run(True), run(False)
    pairs = [(c, w, ended) for cs, ws, ends in zip(cut.samples, whole.samples, cut.samples_stopped)
             for c, w, ended in zip(cs, ws, ends)]
    shortened = 0
    for c, w, ended in pairs:
        assert w.startswith(c)  # the same draws, up to the stop
        if c != w:  # cut: right after the token that holds the first line break
            shortened += 1
            assert "\n" in c and c.split("\n")[0] == w.split("\n")[0]
            assert ended  # and samples_stopped says it ended
    assert shortened >= 3


def test_samples_stopped_at_a_vanishing_temperature_is_the_greedy_answers_stopped(chat_model, tokenizer):
    # the greedy answers' stopped is checked against transformers' generate above
    greedy = generate_answers(chat_model, tokenizer, QUESTIONS + ["Hi"], max_new_tokens=6)
    cold = generate_answers(chat_model, tokenizer, QUESTIONS + ["Hi"], max_new_tokens=6, greedy=False,
                            num_samples=2, temperature=1e-5, generator=torch.Generator().manual_seed(0))
    assert cold.samples == [[g, g] for g in greedy.greedy]
    assert cold.samples_stopped == [[s, s] for s in greedy.stopped]
    assert greedy.samples_stopped == []
