"""llmbook.losses against torch (F.log_softmax, F.cross_entropy, autograd), transformers' model loss and TRL."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from llmbook import data, losses, models
from llmbook.utils import tolerance

# Tolerances for a result rounded once to each dtype (a couple of units in the last place).
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
}


def masked_labels(B=3, T=12, V=50, prompt=4, pad=(0, 2, 5), seed=0):
    """Labels with the first ``prompt`` positions and row-wise trailing padding set to -100."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :prompt] = -100
    for row, n in enumerate(pad[:B]):
        if n:
            labels[row, -n:] = -100
    return labels


# ---------------------------------------------------------------- log_softmax

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dim", [-1, 0, 1])
def test_log_softmax_matches_torch(dtype, dim):
    x = (torch.randn(5, 7, 33) * 4).to(dtype)
    ours = losses.log_softmax(x, dim=dim)
    assert ours.dtype == dtype and ours.shape == x.shape
    torch.testing.assert_close(ours, F.log_softmax(x, dim=dim), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_log_softmax_is_stable_for_huge_logits(dtype):
    x = torch.tensor([[1e4, 0.0, -1e4], [1e4, 1e4 - 1, 5.0], [-1e4, -1e4, -1e4]]).to(dtype)
    naive = torch.log(torch.exp(x) / torch.exp(x).sum(-1, keepdim=True))
    assert not torch.isfinite(naive).all(), "the naive formula must overflow here for the test to mean anything"
    ours = losses.log_softmax(x)
    ref = F.log_softmax(x, dim=-1)
    torch.testing.assert_close(ours, ref, **TOL[dtype])
    assert not ours.isnan().any() and (ours <= 0).all()
    # The row maximum's logprob is exactly finite; the far-away token is correctly tiny.
    assert ours[0, 0] == 0 and ours[0, 2] < -1e3


def test_log_softmax_gradient_matches_torch():
    x = torch.randn(4, 40, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(4, 40, dtype=torch.float64)
    (g_ours,) = torch.autograd.grad((losses.log_softmax(x) * weights).sum(), x)
    (g_ref,) = torch.autograd.grad((F.log_softmax(x, -1) * weights).sum(), x)
    torch.testing.assert_close(g_ours, g_ref)


def test_log_softmax_rejects_integers_and_scalars():
    with pytest.raises(TypeError, match="logits must be a floating-point tensor"):
        losses.log_softmax(torch.arange(5))
    with pytest.raises(ValueError, match="at least one dimension"):
        losses.log_softmax(torch.tensor(1.0))
    with pytest.raises(TypeError, match="torch.Tensor"):
        losses.log_softmax([1.0, 2.0])


# ---------------------------------------------------------------- selective_log_softmax

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_selective_log_softmax_equals_gather_of_log_softmax(dtype):
    x = (torch.randn(3, 6, 100) * 3).to(dtype)
    index = torch.randint(0, 100, (3, 6))
    ref = F.log_softmax(x.float(), -1).gather(-1, index[..., None]).squeeze(-1)
    ours = losses.selective_log_softmax(x, index)
    assert ours.shape == index.shape and ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    # K indices per row.
    index_k = torch.randint(0, 100, (3, 6, 4))
    torch.testing.assert_close(losses.selective_log_softmax(x, index_k),
                               F.log_softmax(x.float(), -1).gather(-1, index_k), rtol=1e-5, atol=1e-5)


def test_selective_log_softmax_processes_many_rows_in_blocks(monkeypatch):
    monkeypatch.setattr(losses, "_BLOCK_ELEMENTS", 3 * 50)  # 3 rows per block: 7 blocks for 20 rows
    x = torch.randn(20, 50, requires_grad=True)
    index = torch.randint(0, 50, (20,))
    ours = losses.selective_log_softmax(x, index)
    ref = F.log_softmax(x, -1).gather(-1, index[:, None]).squeeze(-1)
    torch.testing.assert_close(ours, ref)
    g_ours, = torch.autograd.grad(ours.sum(), x)
    g_ref, = torch.autograd.grad(ref.sum(), x)
    torch.testing.assert_close(g_ours, g_ref)


def test_selective_log_softmax_matches_trl():
    trl_utils = pytest.importorskip("trl.trainer.utils")
    if not hasattr(trl_utils, "selective_log_softmax"):
        pytest.skip("this TRL has no selective_log_softmax")
    x = torch.randn(2, 9, 64) * 5
    index = torch.randint(0, 64, (2, 9))
    torch.testing.assert_close(losses.selective_log_softmax(x, index), trl_utils.selective_log_softmax(x, index))


def test_selective_log_softmax_bad_index():
    x = torch.randn(2, 5, 10)
    with pytest.raises(TypeError, match="index must be an integer tensor"):
        losses.selective_log_softmax(x, torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"index must have shape \(2, 5\)"):
        losses.selective_log_softmax(x, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        losses.selective_log_softmax(x, torch.full((2, 5), 10))
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        losses.selective_log_softmax(x, torch.full((2, 5), -100))


# ---------------------------------------------------------------- sft_loss

def test_sft_loss_equals_cross_entropy_on_shifted_labels():
    logits = torch.randn(3, 12, 50, requires_grad=True)
    labels = masked_labels()
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1), ignore_index=-100)
    ours = losses.sft_loss(logits, labels)
    torch.testing.assert_close(ours, ref)
    g_ours, = torch.autograd.grad(ours, logits)
    g_ref, = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(g_ours, g_ref)
    # The closed form: mean over the k response tokens of -log p(label).
    k = (labels[:, 1:] != -100).sum()
    logp = F.log_softmax(logits.detach()[:, :-1], -1)
    keep = labels[:, 1:] != -100
    manual = -logp[keep].gather(-1, labels[:, 1:][keep][:, None]).sum() / k
    torch.testing.assert_close(ours.detach(), manual)


def test_sft_loss_ignore_index_is_configurable():
    logits = torch.randn(2, 8, 30)
    labels = masked_labels(B=2, T=8, V=30, pad=(0, 1))
    custom = labels.masked_fill(labels == -100, 7777)
    torch.testing.assert_close(losses.sft_loss(logits, custom, ignore_index=7777), losses.sft_loss(logits, labels))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sft_loss_in_half_precision_is_float32_and_close(dtype):
    logits = torch.randn(3, 12, 50) * 3
    labels = masked_labels()
    ours = losses.sft_loss(logits.to(dtype), labels)
    ref = F.cross_entropy(logits.to(dtype).float()[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1))
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref)


def test_sft_loss_equals_the_transformers_model_loss(tokenizer):
    """Real chat-template batch (prompt masked, right padding), a tiny Llama with SmolLM2's vocabulary."""
    model = models.tiny_model(seed=1, vocab_size=len(tokenizer))
    batch = data.SFTCollator(tokenizer)([
        {"prompt": "What is 3 plus 4?", "response": "Answer: 7."},
        {"prompt": "Write the word 'lemon' in capital letters.", "response": "Answer: LEMON."},
    ])
    out = model(**batch)
    ours = losses.sft_loss(out.logits, batch["labels"])
    torch.testing.assert_close(ours, out.loss)
    params = [p for p in model.parameters()]
    g_ours = torch.autograd.grad(ours, params, retain_graph=True)
    g_ref = torch.autograd.grad(out.loss, params)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b)


def test_per_token_logps_and_mask():
    logits = torch.randn(3, 12, 50)
    labels = masked_labels()
    logps, mask = losses.per_token_logps(logits, labels)
    assert logps.shape == mask.shape == (3, 11)
    torch.testing.assert_close(mask, labels[:, 1:] != -100)
    ref = F.log_softmax(logits[:, :-1], -1).gather(-1, labels[:, 1:].clamp(min=0)[..., None]).squeeze(-1)
    torch.testing.assert_close(logps, ref * mask)
    assert (logps[~mask] == 0).all() and (logps <= 0).all()
    torch.testing.assert_close(-logps.sum() / mask.sum(), losses.sft_loss(logits, labels))


@pytest.mark.parametrize("fn", ["sft_loss", "per_token_logps"])
def test_sft_loss_bad_inputs_are_named(fn):
    loss = getattr(losses, fn)
    logits = torch.randn(2, 6, 20)
    labels = torch.randint(0, 20, (2, 6))
    with pytest.raises(ValueError, match="no response token"):
        loss(logits, torch.full((2, 6), -100))
    only_first = torch.full((2, 6), -100)
    only_first[:, 0] = 3  # position 0 is never predicted: after the shift nothing is left
    with pytest.raises(ValueError, match="no response token"):
        loss(logits, only_first)
    with pytest.raises(ValueError, match=r"labels must have shape \(2, 6\)"):
        loss(logits, labels[:, :5])
    with pytest.raises(TypeError, match="logits must be a floating-point tensor"):
        loss(logits.long(), labels)
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        loss(logits, labels.float())
    with pytest.raises(ValueError, match=r"labels must hold token ids in \[0, 20\)"):
        loss(logits, labels.masked_fill(labels == labels[0, 3], 20).index_fill(1, torch.tensor([3]), 20))
    with pytest.raises(ValueError, match="T >= 2"):
        loss(logits[:, :1], labels[:, :1])
    with pytest.raises(ValueError, match=r"\(\.\.\., T, V\)"):
        loss(torch.randn(20), labels[0])


# ---------------------------------------------------------------- chunked_sft_loss

def naive_head_loss(hidden, weight, labels):
    """The reference: full logits, then torch's cross-entropy on the shifted labels."""
    logits = hidden[:, :-1] @ weight.T
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # upcast half, keep float64
    return F.cross_entropy(logits.reshape(-1, weight.shape[0]), labels[:, 1:].reshape(-1), ignore_index=-100)


@pytest.mark.parametrize("chunk_size", [1, 7, 16, 1000])
def test_chunked_loss_value_and_gradients_equal_full_logits(chunk_size):
    V, H = 120, 24
    hidden = torch.randn(3, 12, H, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, dtype=torch.float64, requires_grad=True)
    labels = masked_labels(V=V)
    ours = losses.chunked_sft_loss(hidden, weight, labels, chunk_size=chunk_size)
    ref = naive_head_loss(hidden, weight, labels)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    # Scale the loss so the gradient must carry backward's incoming gradient too.
    g_ours = torch.autograd.grad(2.5 * ours, [hidden, weight])
    g_ref = torch.autograd.grad(2.5 * ref, [hidden, weight])
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # Prompt and padding positions get no gradient at all.
    assert (g_ours[0][:, :3] == 0).all()


def test_chunked_loss_float32_meets_the_books_tolerances():
    V, H = 2000, 64
    hidden = torch.randn(2, 65, H, requires_grad=True)
    weight = (torch.randn(V, H) * 0.1).requires_grad_()
    labels = torch.randint(0, V, (2, 65))
    ours = losses.chunked_sft_loss(hidden, weight, labels, chunk_size=32)
    ref = naive_head_loss(hidden, weight, labels)
    assert ((ours - ref).abs() / ref.abs()).item() <= 1e-6
    for a, b in zip(torch.autograd.grad(ours, [hidden, weight]), torch.autograd.grad(ref, [hidden, weight])):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_chunked_loss_equals_the_model_loss_with_tied_head():
    """On a tiny Llama whose LM head is tied to the embedding: loss and every parameter's gradient."""
    model = models.tiny_model(seed=2, vocab_size=300)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(0, 300, (2, 10))
    labels = ids.clone()
    labels[:, :4] = -100
    out = model(input_ids=ids, labels=labels)
    hidden = model.model(input_ids=ids).last_hidden_state
    ours = losses.chunked_sft_loss(hidden, model.lm_head.weight, labels, chunk_size=5)
    torch.testing.assert_close(ours, out.loss)
    params = list(model.parameters())
    for a, b in zip(torch.autograd.grad(ours, params), torch.autograd.grad(out.loss, params)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_chunked_loss_half_precision_close_to_full_logits(dtype):
    V, H = 300, 32
    hidden = (torch.randn(2, 20, H)).to(dtype).requires_grad_()
    weight = (torch.randn(V, H) * 0.2).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (2, 20))
    ours = losses.chunked_sft_loss(hidden, weight, labels, chunk_size=8)
    ref = naive_head_loss(hidden, weight, labels)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-2, atol=1e-2)
    for a, b in zip(torch.autograd.grad(ours, [hidden, weight]), torch.autograd.grad(ref, [hidden, weight])):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-3)


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor (elements) any operation creates while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_chunked_loss_never_creates_the_full_logits():
    N, V, H, chunk = 64, 1000, 16, 8
    hidden = torch.randn(1, N + 1, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    labels = torch.randint(0, V, (1, N + 1))
    with LargestTensor() as naive:
        naive_head_loss(hidden, weight, labels).backward()
    with LargestTensor() as ours:
        losses.chunked_sft_loss(hidden, weight, labels, chunk_size=chunk).backward()
    assert naive.largest == N * V                  # the full logits exist in the reference
    assert ours.largest == max(chunk * V, V * H)   # one chunk of logits, or the weight's gradient


def test_chunked_loss_without_grad_and_single_backward():
    hidden = torch.randn(1, 9, 8, requires_grad=True)
    weight = torch.randn(40, 8, requires_grad=True)
    labels = torch.randint(0, 40, (1, 9))
    with torch.no_grad():
        value = losses.chunked_sft_loss(hidden, weight, labels)
    torch.testing.assert_close(value, naive_head_loss(hidden, weight, labels).detach())
    loss = losses.chunked_sft_loss(hidden, weight, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        loss.backward()


def test_chunked_loss_bad_inputs_are_named():
    hidden = torch.randn(2, 6, 8)
    weight = torch.randn(40, 8)
    labels = torch.randint(0, 40, (2, 6))
    with pytest.raises(ValueError, match="no response token"):
        losses.chunked_sft_loss(hidden, weight, torch.full((2, 6), -100))
    with pytest.raises(ValueError, match=r"labels must have shape \(2, 6\)"):
        losses.chunked_sft_loss(hidden, weight, labels[:1])
    with pytest.raises(ValueError, match="H = 8"):
        losses.chunked_sft_loss(torch.randn(2, 6, 9), weight, labels)
    with pytest.raises(ValueError, match=r"lm_head_weight must have shape \(V, H\)"):
        losses.chunked_sft_loss(hidden, weight[0], labels)
    with pytest.raises(TypeError, match="share one dtype"):
        losses.chunked_sft_loss(hidden, weight.double(), labels)
    with pytest.raises(TypeError, match="hidden must be a floating-point tensor"):
        losses.chunked_sft_loss(hidden.long(), weight, labels)
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        losses.chunked_sft_loss(hidden, weight, labels.float())
    with pytest.raises(ValueError, match=r"\[0, 40\)"):
        losses.chunked_sft_loss(hidden, weight, labels + 40)
    for bad in (0, -3):
        with pytest.raises(ValueError, match="chunk_size must be >= 1"):
            losses.chunked_sft_loss(hidden, weight, labels, chunk_size=bad)
    for bad in (2.5, True):
        with pytest.raises(TypeError, match="chunk_size must be an integer"):
            losses.chunked_sft_loss(hidden, weight, labels, chunk_size=bad)


def test_ignore_index_agrees_with_the_data_module():
    assert losses.IGNORE_INDEX == data.IGNORE_INDEX == -100


# --- logits at the answer positions only ------------------------------------------------------

QUESTIONS = ["What is the capital of France?", "In which country is the city of Osaka?",
             "What is the capital of the Czech Republic, a country in central Europe?"]
STEMS = ["The capital of France is", "Osaka is in", "The capital of the Czech Republic is"]


@pytest.mark.parametrize("first, expected", [(0, 6), (1, 6), (2, 5), (5, 2)])
def test_logits_to_keep_starts_one_before_the_earliest_answer_token(first, expected):
    labels = torch.full((2, 6), data.IGNORE_INDEX)
    labels[1, first:] = 7            # row 1 has the earliest answer token, at column `first`
    labels[0, 5] = 7
    assert losses.logits_to_keep(labels) == expected


def test_answer_logps_equal_torch_log_softmax_of_the_full_logits(chat_model, tokenizer):
    # The reference: every position's logits, torch's log_softmax, the label gathered where it counts.
    batch = data.SFTCollator(tokenizer)([{"prompt": q, "response": s + " X."} for q, s in zip(QUESTIONS, STEMS)])
    logps, mask = losses.answer_logps(chat_model, batch)
    with torch.no_grad():
        full = torch.log_softmax(chat_model(input_ids=batch["input_ids"],
                                            attention_mask=batch["attention_mask"]).logits[:, :-1], -1)
    target = batch["labels"][:, 1:]
    counted = target != data.IGNORE_INDEX
    want = full.gather(-1, target.clamp(min=0)[..., None]).squeeze(-1)[counted]
    kept = logps.shape[1]
    assert kept < target.shape[1], "the prompt's positions were not projected to the vocabulary"
    assert torch.equal(mask, counted[:, -kept:]) and not counted[:, :-kept].any()
    torch.testing.assert_close(logps[mask].detach(), want, **tolerance(torch.float32, "model"))


def test_sft_loss_by_group_equals_the_models_own_loss(chat_model, tokenizer):
    model = chat_model
    examples = [{"prompt": q, "response": s + " X."} for q, s in zip(QUESTIONS, STEMS)]
    examples.append({"prompt": "Hi", "response": "Hello there, how can I help you today?"})
    batch = data.SFTCollator(tokenizer)(examples)
    batch["unknown"] = torch.tensor([False, True, False, True])
    loss, metrics = losses.sft_loss_by_group(model, batch)
    reference = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    torch.testing.assert_close(loss, reference)
    for name, rows in (("known", [0, 2]), ("unknown", [1, 3])):
        sub = {k: v[rows] for k, v in batch.items()}
        ref = model(input_ids=sub["input_ids"], attention_mask=sub["attention_mask"], labels=sub["labels"]).loss
        assert metrics[f"loss/{name}"] == pytest.approx(ref.item(), rel=1e-5)
    # The gradient is the model's own loss's gradient, too.
    weight = model.model.layers[0].self_attn.q_proj.weight
    g_ours = torch.autograd.grad(losses.sft_loss_by_group(model, batch)[0], weight)[0]
    g_ref = torch.autograd.grad(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                      labels=batch["labels"]).loss, weight)[0]
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-4, atol=1e-6)


def test_sft_loss_by_group_leaves_out_an_absent_group_and_checks_its_input(chat_model, tokenizer):
    model = chat_model
    batch = data.SFTCollator(tokenizer)([{"prompt": q, "response": "Paris."} for q in QUESTIONS[:3]])
    with pytest.raises(ValueError, match="unknown"):
        losses.sft_loss_by_group(model, batch)
    batch["unknown"] = torch.zeros(3, dtype=torch.bool)
    _, metrics = losses.sft_loss_by_group(model, batch)
    assert set(metrics) == {"loss/known", "fitted/known"}
    batch["labels"] = torch.full_like(batch["labels"], data.IGNORE_INDEX)
    with pytest.raises(ValueError, match="needs a labelled position"):
        losses.sft_loss_by_group(model, batch)


def _greedy_batch(model, tokenizer, n_new=3):
    """Prompts whose labels are transformers' own greedy continuation (rows 0, 2) or not (rows 1, 3)."""
    prompts = [data.chat_prompt(tokenizer, q) for q in QUESTIONS[:2]] * 2
    ids = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    rows = []
    for i, p in enumerate(ids):
        x = torch.tensor([p])
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n_new, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        new = out[0, len(p):].tolist()
        if i % 2:  # change the last greedy token: no longer what decoding writes
            new[-1] = (new[-1] + 1) % len(tokenizer)
        rows.append((p, new))
    T = max(len(p) + len(n) for p, n in rows)
    batch = {"input_ids": torch.full((4, T), tokenizer.pad_token_id), "attention_mask": torch.zeros(4, T, dtype=torch.long),
             "labels": torch.full((4, T), data.IGNORE_INDEX)}
    for i, (p, n) in enumerate(rows):
        batch["input_ids"][i, :len(p) + len(n)] = torch.tensor(p + n)
        batch["attention_mask"][i, :len(p) + len(n)] = 1
        batch["labels"][i, len(p):len(p) + len(n)] = torch.tensor(n)
    return batch


def test_labelled_logits_are_the_full_logits_at_the_labelled_positions(hide_head):
    model = models.tiny_model(seed=0, vocab_size=50)
    ids = torch.randint(0, 50, (3, 12), generator=torch.Generator().manual_seed(1))
    labels = masked_labels()
    batch = {"input_ids": ids, "attention_mask": (labels != -100) | (torch.arange(12) < 4), "labels": labels}
    logits, scored = losses.labelled_logits(model, batch)
    full = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits  # torch's whole (B, T, V)
    assert torch.equal(scored, labels[:, 1:] != -100) and logits.shape == (int(scored.sum()), 50)
    torch.testing.assert_close(logits, full[:, :-1][scored], **TOL[torch.float32])
    logits.sum().backward()  # differentiable: the gradient reaches the weights below the head
    assert model.model.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0
    with torch.no_grad():  # a model that hides its head: the full logits are indexed
        plain, _ = losses.labelled_logits(hide_head(model), batch)
    torch.testing.assert_close(plain, full[:, :-1][scored].detach(), **TOL[torch.float32])


def test_answer_scores_agree_with_greedy_decoding_and_torch(chat_model, tokenizer):
    model = chat_model
    batch = _greedy_batch(model, tokenizer)
    scores = losses.answer_scores(model, batch)
    assert scores["correct"].tolist() == [True, False, True, False]
    # log-probs and first-token probabilities from the full logits, by torch
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    target = batch["labels"][:, 1:]
    scored = target != data.IGNORE_INDEX
    want = torch.log_softmax(logits.float(), -1)[scored].gather(1, target[scored][:, None])[:, 0]
    torch.testing.assert_close(scores["token_logps"].detach(), want, **tolerance(torch.float32, "model"))
    assert scores["example"].tolist() == scored.nonzero()[:, 0].tolist()
    first = scored.long().argmax(1)
    p_first = torch.softmax(logits[torch.arange(4), first].float(), -1).max(-1).values
    torch.testing.assert_close(scores["first_prob"], p_first, **tolerance(torch.float32, "model"))
    # answer_mask narrows what "correct" checks: without the changed last token, all rows pass
    mask = batch["labels"] != data.IGNORE_INDEX
    last = mask.long().cumsum(1) == mask.sum(1, keepdim=True)
    assert losses.answer_scores(model, batch | {"answer_mask": mask & ~last})["correct"].all()
    with pytest.raises(ValueError, match="answer_mask must be a bool tensor"):
        losses.answer_scores(model, batch | {"answer_mask": mask[:, 1:]})


def test_sft_loss_by_group_logs_the_share_fitted(chat_model, tokenizer):
    batch = _greedy_batch(chat_model, tokenizer)
    batch["unknown"] = torch.tensor([False, False, True, True])  # fitted: rows 0 and 2 only
    _, metrics = losses.sft_loss_by_group(chat_model, batch)
    assert metrics["fitted/known"] == 0.5 and metrics["fitted/unknown"] == 0.5
    batch["unknown"] = torch.tensor([False, True, False, True])
    _, metrics = losses.sft_loss_by_group(chat_model, batch)
    assert metrics["fitted/known"] == 1.0 and metrics["fitted/unknown"] == 0.0


def test_response_loss_is_the_models_own_loss_with_and_without_adapters():
    from llmbook import lora, prefix
    from llmbook.models import tiny_model
    torch.manual_seed(0)
    base = tiny_model()
    ids = torch.randint(3, 256, (2, 9))
    labels = ids.clone()
    labels[0, :4] = -100
    labels[1, :6] = -100                                    # answers start at different columns
    mask = torch.ones_like(ids)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    wrapped = lora.apply_lora(copy.deepcopy(base), ["q_proj", "v_proj"], r=2, lora_alpha=4)
    with torch.no_grad():
        for layer in lora.lora_layers(wrapped):
            layer.lora_B.weight.normal_()
    with_prefix = prefix.PrefixTuningModel(base, 3)
    for model in (base, wrapped, with_prefix):
        torch.testing.assert_close(losses.response_loss(model, batch), model(**batch).loss)


def test_response_loss_without_an_exposed_head_takes_the_answer_logps_path():
    from llmbook.models import tiny_model

    class Opaque(torch.nn.Module):  # a causal LM that hides its output layer
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids=None, attention_mask=None, logits_to_keep=0, use_cache=False):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep)

    torch.manual_seed(1)
    base = tiny_model()
    ids = torch.randint(3, 256, (2, 8))
    labels = ids.clone()
    labels[:, :5] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    torch.testing.assert_close(losses.response_loss(Opaque(base), batch), base(**batch).loss)


# --- a prefix shared by the rows of a batch, run once ------------------------------------------

def _rows_with_a_common_start(seed, rows=4, start=7, pad_left=False):
    """Token rows that share their first ``start`` tokens, right-padded (or with a left-padded start)."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randint(3, 200, (start,), generator=g).tolist()
    ids, labels = [], []
    for n in range(rows):
        rest = torch.randint(3, 200, (3 + n,), generator=g).tolist()
        ids.append(common + rest)
        labels.append([-100] * (start + 1) + rest[1:])
    T = max(map(len, ids))
    mask = [[1] * len(r) + [0] * (T - len(r)) for r in ids]
    ids = [r + [0] * (T - len(r)) for r in ids]
    labels = [r + [-100] * (T - len(r)) for r in labels]
    batch = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask), "labels": torch.tensor(labels)}
    if pad_left:  # a padded start, as a left-padded prompt of GRPO
        batch["attention_mask"][:, :2] = 0
    return batch


# The shared prefix's gradient is the sum over its rows, taken before the norms' float32
# backward instead of after: equal to float32 rounding, far tighter than a lost
# contribution (of the order of the gradient).
GRAD_THROUGH_NORMS = {"rtol": 1e-5, "atol": 1e-8}


def _logits_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    logits, scored = losses.labelled_logits(model, batch)
    logits.float().logsumexp(-1).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), scored, grads


@pytest.mark.parametrize("pad_left", [False, True])
def test_a_shared_prefix_gives_the_logits_and_gradients_of_the_whole_rows(pad_left):
    from llmbook import lora

    model = models.tiny_model(seed=2, vocab_size=256, dtype=torch.float64, num_hidden_layers=3)
    lora.apply_lora(model, ["model.layers.2.self_attn.q_proj", "model.layers.2.self_attn.v_proj",
                            "model.layers.1.mlp.up_proj"], r=4, lora_alpha=8)
    for layer in lora.lora_layers(model):  # B != 0: the adapters change what the model computes
        torch.nn.init.normal_(layer.lora_B.weight, std=0.3)
    batch = _rows_with_a_common_start(0, pad_left=pad_left)
    assert losses.shared_prefix(batch) == 7
    with torch.no_grad():
        for whole, shared in zip(losses.answer_logps(model, batch),
                                 losses.answer_logps(model, batch | {"shared_prefix": (7, 4)})):
            torch.testing.assert_close(shared, whole, rtol=1e-10, atol=1e-10)
    whole = _logits_and_grads(model, batch)
    shared = _logits_and_grads(model, batch | {"shared_prefix": (7, 4)})
    assert torch.equal(whole[1], shared[1])
    torch.testing.assert_close(shared[0], whole[0], rtol=1e-10, atol=1e-10)
    assert whole[2].keys() == shared[2].keys() and whole[2]
    for name in whole[2]:  # RMSNorm computes in float32 even in a float64 model: its backward rounds so
        torch.testing.assert_close(shared[2][name], whole[2][name], **GRAD_THROUGH_NORMS)


def test_a_shared_prefix_in_groups_on_a_top_layers_copy_that_shares_the_models_layers():
    # GRPO's case: a prompt repeated for each completion of its group; the copy's layers
    # keep their slots (1 and 2) in the full model's cache.
    from llmbook import lora

    model = models.tiny_model(seed=4, vocab_size=256, dtype=torch.float64, num_hidden_layers=3)
    lora.apply_lora(model, ["model.layers.1.self_attn.q_proj", "model.layers.2.mlp.down_proj"], r=4, lora_alpha=8)
    for layer in lora.lora_layers(model):
        torch.nn.init.normal_(layer.lora_B.weight, std=0.3)
    top = models.top_layers(model, 2, share=True)
    a, b = _rows_with_a_common_start(1, rows=2, start=9), _rows_with_a_common_start(2, rows=2, start=9)
    batch = {k: torch.cat([a[k], b[k]]) for k in a}  # groups of two: rows 0-1 and rows 2-3
    inputs = models.top_layer_inputs(model, batch, 2)
    assert losses.shared_prefix(inputs, 2) == 9 and losses.shared_prefix(inputs) < 9
    whole = _logits_and_grads(top, inputs)
    shared = _logits_and_grads(top, inputs | {"shared_prefix": (9, 2)})
    torch.testing.assert_close(shared[0], whole[0], rtol=1e-10, atol=1e-10)
    for name in whole[2]:
        torch.testing.assert_close(shared[2][name], whole[2][name], **GRAD_THROUGH_NORMS)
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2], "the slots are restored"
    # the full model through its own answers, the same
    full = losses.labelled_logits(model, batch | {"shared_prefix": (9, 2)})[0]
    torch.testing.assert_close(full.detach(), whole[0], rtol=1e-10, atol=1e-10)


def test_a_shared_prefix_that_does_not_hold_is_refused():
    model = models.tiny_model(seed=2, vocab_size=256)
    batch = _rows_with_a_common_start(0)
    with pytest.raises(ValueError, match="share their first 8 positions, but they differ there"):
        losses.labelled_logits(model, batch | {"shared_prefix": (8, 4)})
    with pytest.raises(TypeError, match="shared_prefix must be a pair"):
        losses.labelled_logits(model, batch | {"shared_prefix": 7})
    with pytest.raises(ValueError, match="group_size .3. must divide the batch's 4 rows"):
        losses.shared_prefix(batch, 3)


def test_the_head_multiplies_contiguous_rows_and_only_those_asked_for():
    """A count, never a slice, would hand the head strided rows (hidden[:, -n:]); without
    autograd PyTorch multiplies those as a batched product that reads the head once per
    row. Every scoring path must give it contiguous rows, and no row it does not need."""
    from llmbook import sampling

    model = models.tiny_model(seed=0, vocab_size=50)
    seen = []
    model.lm_head.register_forward_pre_hook(
        lambda module, args: seen.append((args[0].is_contiguous(), args[0].shape[:-1].numel())))
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 50, (4, 10), generator=g)
    labels = ids.clone()
    labels[:, :6] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    shared = batch | {"input_ids": torch.cat([ids[:1, :5].expand(4, 5), ids[:, 5:]], 1)}
    shared["shared_prefix"] = (losses.shared_prefix(shared), 4)
    expected = {"labelled_logits": 4 * 4, "labelled_logits, shared prefix": 4 * 4,
                "answer_logps": 4 * losses.logits_to_keep(labels), "generate": 4 * 3}
    expected["answer_logps, shared prefix"] = expected["answer_logps"]
    with torch.no_grad():
        for name, call in {
            "labelled_logits": lambda: losses.labelled_logits(model, batch),
            "labelled_logits, shared prefix": lambda: losses.labelled_logits(model, shared),
            "answer_logps": lambda: losses.answer_logps(model, batch),
            "answer_logps, shared prefix": lambda: losses.answer_logps(model, shared),
            "generate": lambda: sampling.generate(model, ids, max_new_tokens=3, temperature=0.0),
        }.items():
            seen.clear()
            call()
            assert all(contiguous for contiguous, _ in seen), f"{name}: strided rows reached the head"
            assert sum(rows for _, rows in seen) == expected[name], (name, seen)
