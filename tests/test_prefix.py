"""llmbook.prefix against PEFT's prefix tuning, on tiny models (fast) with fixed seeds."""

import copy

import pytest
import torch
from peft import PrefixTuningConfig, get_peft_model

from llmbook import prefix
from llmbook.models import tiny_model

# PEFT 0.21 still passes the cache to transformers 5 under its old name.
pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")

IDS = torch.tensor([[5, 17, 3, 99, 42, 7], [1, 2, 3, 4, 5, 6]])


def peft_prefix(base, n, projection_dim=None):
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n,
                                prefix_projection=projection_dim is not None, encoder_hidden_size=projection_dim)
    return get_peft_model(copy.deepcopy(base), config)


def pair(n=3, projection_dim=None, kv_heads=2, seed=0):
    """PEFT's prefix model and ours on identical base weights and identical (random, non-zero) prefix tensors."""
    base = tiny_model(seed=seed, num_key_value_heads=kv_heads)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        theirs = peft_prefix(base, n, projection_dim)
    ours = prefix.PrefixTuningModel(copy.deepcopy(base), n, projection_dim=projection_dim)
    ours.encoder.load_state_dict(theirs.prompt_encoder["default"].state_dict())  # same names and shapes
    return base, ours, theirs


def logits(model, ids=IDS, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


# --- parameter counts ---------------------------------------------------------------

@pytest.mark.parametrize("kv_heads", [1, 2, 4])  # 4 = plain multi-head attention on the tiny model
@pytest.mark.parametrize("n", [1, 5])
@pytest.mark.parametrize("projection_dim", [None, 7, 48])
def test_count_formula_equals_peft(kv_heads, n, projection_dim):
    base = tiny_model(num_key_value_heads=kv_heads)
    theirs = peft_prefix(base, n, projection_dim)
    layers, heads, head_dim = prefix.prefix_kv_shape(base.config)
    count = prefix.prefix_parameter_count(n, layers, heads * head_dim, projection_dim=projection_dim)
    assert count == theirs.get_nb_trainable_parameters()[0]
    ours = prefix.PrefixTuningModel(base, n, projection_dim=projection_dim)
    assert ours.num_parameters_trainable() == count


def test_kv_width_is_kv_heads_times_head_dim_not_hidden_size():
    base = tiny_model(hidden_size=64, num_attention_heads=4, num_key_value_heads=1)
    assert prefix.prefix_kv_shape(base.config) == (2, 1, 16)
    theirs = peft_prefix(base, 3)
    assert theirs.prompt_encoder["default"].embedding.weight.shape == (3, 2 * 2 * 16)


def test_smollm2_shapes_and_the_count_of_20_virtual_tokens():
    from transformers import LlamaConfig

    # SmolLM2-135M's attention sizes (written out, so the test needs no model files).
    config = LlamaConfig(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3)
    layers, heads, head_dim = prefix.prefix_kv_shape(config)
    assert (layers, heads * head_dim) == (30, 192)
    assert prefix.prefix_parameter_count(20, layers, heads * head_dim) == 20 * 30 * 2 * 192 == 230_400


@pytest.mark.parametrize("token_dim, projection_dim", [(8, 5), (32, 16), (100, 3)])
def test_token_dim_count_equals_the_torch_modules(token_dim, projection_dim):
    n, layers, kv_dim = 4, 3, 12
    reference = [torch.nn.Embedding(n, token_dim), torch.nn.Linear(token_dim, projection_dim),
                 torch.nn.Linear(projection_dim, layers * 2 * kv_dim)]
    expected = sum(p.numel() for m in reference for p in m.parameters())
    assert prefix.prefix_parameter_count(n, layers, kv_dim, projection_dim, token_dim) == expected
    encoder = prefix.PrefixEncoder(n, layers, 3, 4, projection_dim=projection_dim, token_dim=token_dim)
    assert sum(p.numel() for p in encoder.parameters()) == expected
    assert encoder().shape == (layers, 2, 3, n, 4)


# --- same prefix tensors, same outputs ------------------------------------------------

@pytest.mark.parametrize("kv_heads", [2, 4])
@pytest.mark.parametrize("projection_dim", [None, 24])
def test_logits_and_loss_equal_peft(kv_heads, projection_dim):
    base, ours, theirs = pair(projection_dim=projection_dim, kv_heads=kv_heads)
    out = logits(ours)
    assert not torch.allclose(out, logits(base), atol=1e-3), "a random prefix must change the output"
    torch.testing.assert_close(out, logits(theirs), rtol=1e-5, atol=1e-5)
    labels = IDS.clone()
    labels[:, :2] = -100
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS, labels=labels).loss, theirs(IDS, labels=labels).loss)


def test_gradients_equal_peft_and_reach_only_the_prefix():
    _, ours, theirs = pair(projection_dim=16)
    for model in (ours, theirs):
        model(IDS, labels=IDS).loss.backward()
    trainable = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith("encoder.") for name in trainable)
    reference = dict(theirs.prompt_encoder["default"].named_parameters())
    for name, grad in trainable.items():
        torch.testing.assert_close(grad, reference[name.removeprefix("encoder.")].grad, rtol=1e-4, atol=1e-6)


def test_works_on_gpt2_too():
    # A decoder of another family: learned absolute positions, fused QKV, no GQA.
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                      bos_token_id=1, eos_token_id=2)).eval()
    theirs = peft_prefix(base, 4)
    ours = prefix.PrefixTuningModel(copy.deepcopy(base), 4)
    ours.encoder.load_state_dict(theirs.prompt_encoder["default"].state_dict())
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-5, atol=1e-5)


# --- attention mask and positions with padding -----------------------------------------

def pad_rows(rows, side, pad_id=0):
    """Pad token lists to one length on the given side; returns ids and mask."""
    length = max(map(len, rows))
    ids, mask = [], []
    for row in rows:
        fill = [pad_id] * (length - len(row))
        ids.append(fill + row if side == "left" else row + fill)
        mask.append([0] * len(fill) + [1] * len(row) if side == "left" else [1] * len(row) + [0] * len(fill))
    return torch.tensor(ids), torch.tensor(mask)


ROWS = [[5, 17, 3, 99, 42, 7, 8], [11, 12, 13], [40, 41, 42, 43, 44]]


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_rows_equal_each_row_alone_and_peft_alone(side):
    _, ours, theirs = pair(n=4)
    ids, mask = pad_rows(ROWS, side)
    batch = logits(ours, ids, attention_mask=mask)
    assert torch.isfinite(batch).all(), "padding must not create NaN anywhere, even at padded positions"
    for b, row in enumerate(ROWS):
        alone = torch.tensor([row])
        real = batch[b][mask[b].bool()]                    # (len(row), V)
        torch.testing.assert_close(real, logits(theirs, alone)[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(real, logits(ours, alone)[0], rtol=1e-5, atol=1e-5)


def test_left_padding_equals_peft_given_positions_from_the_mask():
    _, ours, theirs = pair(n=3, kv_heads=4)
    ids, mask = pad_rows(ROWS, "left")
    positions = (mask.cumsum(-1) - 1).clamp_min(0)        # PEFT adds num_virtual_tokens itself
    ours_out = logits(ours, ids, attention_mask=mask)
    theirs_out = logits(theirs, ids, attention_mask=mask, position_ids=positions)
    torch.testing.assert_close(ours_out[mask.bool()], theirs_out[mask.bool()], rtol=1e-5, atol=1e-5)


def test_explicit_position_ids_are_shifted_like_peft():
    _, ours, theirs = pair()
    positions = torch.tensor([[0, 1, 2, 3, 4, 5], [3, 4, 5, 6, 7, 8]])
    torch.testing.assert_close(logits(ours, position_ids=positions), logits(theirs, position_ids=positions),
                               rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits(ours, position_ids=positions)[1], logits(ours)[1], atol=1e-4)


def test_the_virtual_tokens_are_attended_with_an_all_zero_mask_row():
    _, ours, _ = pair()
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]])
    assert torch.isfinite(logits(ours, attention_mask=mask)).all()


def test_continuing_from_the_returned_cache_equals_one_pass():
    _, ours, _ = pair(projection_dim=8)
    full = logits(ours)
    with torch.no_grad():
        first = ours(IDS[:, :4], use_cache=True)
        assert first.cache.get_seq_length() == ours.num_virtual_tokens + 4
        rest = ours(IDS[:, 4:], cache=first.cache).logits
    torch.testing.assert_close(torch.cat([first.logits, rest], 1), full, rtol=1e-5, atol=1e-5)


# --- generate ---------------------------------------------------------------------------

def greedy_by_full_forward(model, ids, steps):
    """Greedy decoding that re-runs the whole sequence each step (no cache): the plain definition."""
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def test_generate_equals_greedy_decoding_with_peft_forward():
    _, ours, theirs = pair(n=5, kv_heads=2)
    out = ours.generate(IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=6, do_sample=False)
    torch.testing.assert_close(out, greedy_by_full_forward(theirs, IDS, 6), rtol=0, atol=0)


def test_generate_with_left_padding_equals_each_row_alone():
    _, ours, _ = pair(n=4, projection_dim=12)
    ids, mask = pad_rows(ROWS, "left")
    out = ours.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    for b, row in enumerate(ROWS):
        alone = ours.generate(torch.tensor([row]), max_new_tokens=5, do_sample=False, pad_token_id=0)
        torch.testing.assert_close(out[b, ids.shape[1]:], alone[0, len(row):], rtol=0, atol=0)


def test_generate_samples_several_sequences_per_prompt():
    _, ours, _ = pair()
    torch.manual_seed(0)
    out = ours.generate(IDS, max_new_tokens=4, do_sample=True, num_return_sequences=3, top_k=0)
    assert out.shape == (6, IDS.shape[1] + 4)


# --- folding the MLP away, training mode, dtypes ----------------------------------------

def test_fold_keeps_the_prefix_and_the_logits():
    _, ours, theirs = pair(n=3, projection_dim=10)
    before = logits(ours)
    encoder = ours.encoder
    folded = encoder.fold()
    torch.testing.assert_close(folded(), encoder(), rtol=0, atol=0)
    layers, kv = encoder.num_layers, encoder.kv_dim
    assert sum(p.numel() for p in folded.parameters()) == prefix.prefix_parameter_count(3, layers, kv)
    assert folded.transform is None and encoder.transform is not None   # the original is unchanged
    ours.fold()
    torch.testing.assert_close(logits(ours), before, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-5, atol=1e-5)


def test_base_model_is_frozen_and_unchanged_by_training():
    base = tiny_model()
    ours = prefix.PrefixTuningModel(copy.deepcopy(base), 3)
    optimizer = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.1)
    before = ours.encoder.embedding.weight.detach().clone()
    ours(IDS, labels=IDS).loss.backward()
    optimizer.step()
    assert not torch.equal(ours.encoder.embedding.weight, before)
    for p, q in zip(ours.model.parameters(), base.parameters()):
        assert not p.requires_grad and torch.equal(p, q)


def test_bf16_model_keeps_an_fp32_prefix(device):
    model = prefix.PrefixTuningModel(tiny_model(device=device, dtype=torch.bfloat16), 3, projection_dim=8)
    assert model.encoder.embedding.weight.dtype == torch.float32
    ids = IDS.to(device)
    out = model(ids, labels=ids)
    out.loss.backward()
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    assert model.encoder.embedding.weight.grad.dtype == torch.float32


# --- bad input --------------------------------------------------------------------------

@pytest.mark.parametrize("args, kwargs, error, match", [
    ((0, 2, 8), {}, ValueError, "num_virtual_tokens"),
    ((True, 2, 8), {}, TypeError, "num_virtual_tokens"),
    ((3, 0, 8), {}, ValueError, "num_layers"),
    ((3, 2, 2.5), {}, TypeError, "kv_dim"),
    ((3, 2, 8), {"projection_dim": 0}, ValueError, "projection_dim"),
    ((3, 2, 8), {"projection_dim": 4, "token_dim": -1}, ValueError, "token_dim"),
    ((3, 2, 8), {"token_dim": 4}, ValueError, "token_dim only applies with projection_dim"),
])
def test_bad_counts_are_named(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        prefix.prefix_parameter_count(*args, **kwargs)


def test_bad_encoders_are_named():
    with pytest.raises(ValueError, match="num_kv_heads"):
        prefix.PrefixEncoder(3, 2, 0, 16)
    with pytest.raises(ValueError, match="token_dim only applies"):
        prefix.PrefixEncoder(3, 2, 2, 16, token_dim=8)
    with pytest.raises(ValueError, match=r"\(layers, kv_heads, head_dim\) = \(2, 4, 16\)"):
        prefix.PrefixTuningModel(tiny_model(num_key_value_heads=2), encoder=prefix.PrefixEncoder(3, 2, 4, 16))
    with pytest.raises(TypeError, match="PrefixEncoder"):
        prefix.PrefixTuningModel(tiny_model(), encoder=torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="transformers model"):
        prefix.PrefixTuningModel(torch.nn.Linear(2, 2), 3)
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        prefix.PrefixTuningModel(tiny_model())


def test_sliding_window_layers_are_refused():
    from transformers import Qwen2Config

    config = Qwen2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         use_sliding_window=True, sliding_window=8, max_window_layers=1)
    with pytest.raises(ValueError, match="full attention"):
        prefix.prefix_kv_shape(config)


@pytest.mark.parametrize("kwargs, match", [
    ({}, "exactly one of input_ids and inputs_embeds"),
    ({"input_ids": IDS, "inputs_embeds": torch.zeros(2, 6, 64)}, "exactly one"),
    ({"input_ids": IDS.float()}, "integer tensor"),
    ({"input_ids": IDS[0]}, r"shape \(batch, seq_len\)"),
    ({"input_ids": IDS[:, :0]}, "no tokens"),
    ({"input_ids": IDS, "attention_mask": torch.ones(3, 6)}, "attention_mask must be a tensor of shape"),
    ({"input_ids": IDS, "attention_mask": torch.ones(2, 5)}, "must cover"),
    ({"input_ids": IDS, "attention_mask": torch.full((2, 6), 2)}, "only 0"),
    ({"input_ids": IDS, "position_ids": torch.zeros(2, 4, dtype=torch.long)}, "position_ids must have shape"),
    ({"input_ids": IDS, "past_key_values": ()}, "cache="),
    ({"input_ids": IDS, "cache": object()}, "earlier output's cache"),
])
def test_bad_forward_inputs_are_named(kwargs, match):
    _, ours, _ = pair()
    with pytest.raises(ValueError, match=match):
        ours(**kwargs)


def test_bad_generate_inputs_are_named():
    _, ours, _ = pair()
    with pytest.raises(ValueError, match="builds the prefix cache"):
        ours.generate(IDS, cache=ours.prefix_cache(2))
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        ours.generate(IDS, attention_mask=torch.ones(2, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="batch_size"):
        ours.prefix_cache(0)


# --- initialising from real tokens ------------------------------------------------------

def test_prefix_from_real_tokens_equals_prepending_them():
    base = tiny_model(seed=3)
    text = torch.tensor([9, 8, 7, 6, 5])
    ours = prefix.PrefixTuningModel(copy.deepcopy(base), 5).init_from_tokens(text)
    prepended = logits(base, torch.cat([text.expand(2, -1), IDS], 1))[:, 5:]
    torch.testing.assert_close(logits(ours), prepended, rtol=1e-5, atol=1e-5)
    ids, mask = pad_rows(ROWS, "left")
    out = logits(ours, ids, attention_mask=mask)[1][mask[1].bool()]     # a left-padded row
    alone = logits(base, torch.cat([text, torch.tensor(ROWS[1])])[None])[0, 5:]
    torch.testing.assert_close(out, alone, rtol=1e-5, atol=1e-5)


def test_bad_initialisations_are_named():
    ours = prefix.PrefixTuningModel(tiny_model(), 3, projection_dim=4)
    with pytest.raises(ValueError, match="fold"):
        ours.init_from_tokens(torch.tensor([1, 2, 3]))
    ours = prefix.PrefixTuningModel(tiny_model(), 3)
    with pytest.raises(ValueError, match="num_virtual_tokens = 3"):
        ours.init_from_tokens(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="integer"):
        ours.init_from_tokens(torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="shape"):
        ours.encoder.load_prefix(torch.zeros(2, 2, 2, 4, 16))
    with pytest.raises(ValueError, match="NaN"):
        ours.encoder.load_prefix(torch.full((2, 2, 2, 3, 16), float("nan")))


def test_a_shared_prompt_prefix_is_encoded_after_the_virtual_tokens():
    # sampling.generate(prefix=...) continues from a cache that already holds the virtual
    # tokens and the shared prompt tokens: the same tokens as the whole prompts, and the
    # same as PEFT's model generating from the whole prompts.
    from llmbook.sampling import generate, prefix_cache

    _, ours, theirs = pair(n=4, projection_dim=12)
    shared = [5, 9, 17, 3]
    ids, mask = pad_rows(ROWS, "left")
    whole_ids, whole_mask = pad_rows([shared + row for row in ROWS], "left")
    after = generate(ours, ids, attention_mask=mask, prefix=prefix_cache(ours, shared), max_new_tokens=5,
                     temperature=0, eos_token_id=[])
    whole = generate(ours, whole_ids, attention_mask=whole_mask, max_new_tokens=5, temperature=0, eos_token_id=[])
    ref = theirs.generate(input_ids=whole_ids, attention_mask=whole_mask, max_new_tokens=5, do_sample=False,
                          pad_token_id=0)
    assert torch.equal(after[:, ids.shape[1]:], whole[:, whole_ids.shape[1]:])
    assert torch.equal(after[:, ids.shape[1]:], ref[:, whole_ids.shape[1]:])
