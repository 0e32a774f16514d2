"""models.top_layers / top_layer_inputs: the top k layers on cached hidden states compute the full model."""

import pytest
import torch

from llmbook import lora, losses
from llmbook.models import tiny_model, top_layer_inputs, top_layers


@pytest.mark.parametrize("k", [1, 2, 3])
def test_top_layers_on_cached_inputs_give_the_full_models_logits_and_loss(k):
    model = tiny_model(num_hidden_layers=3)
    ids = torch.randint(3, 256, (2, 7), generator=torch.Generator().manual_seed(k))
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    labels = ids.masked_fill(mask == 0, -100)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    top = top_layers(model, k)
    cached = top_layer_inputs(model, batch, k)
    assert len(top.model.layers) == k and len(model.model.layers) == 3
    with torch.no_grad():
        full = model(**batch)
        part = top(**cached)
    real = mask.bool()
    torch.testing.assert_close(part.logits[real], full.logits[real])
    torch.testing.assert_close(part.loss, full.loss)
    torch.testing.assert_close(losses.response_loss(top, cached), full.loss)


@pytest.mark.parametrize("k", [1, 3])
def test_top_layer_inputs_are_the_hidden_states_entering_layer_L_minus_k_and_the_top_layers_do_not_run(k):
    model = tiny_model(num_hidden_layers=3)
    ids = torch.randint(3, 256, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    calls = []
    hooks = [layer.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
             for i, layer in enumerate(model.model.layers)]
    try:
        cached = top_layer_inputs(model, {"input_ids": ids, "attention_mask": mask}, k)
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == list(range(3 - k))  # the layers below ran, once each; the top k did not
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    assert torch.equal(cached["inputs_embeds"], hidden[3 - k])  # what transformers reports entering layer 3 - k
    assert set(cached) == {"inputs_embeds", "attention_mask"}  # no labels in, none out
    # the hook is gone: a second call and a plain forward run every layer as before
    torch.testing.assert_close(top_layer_inputs(model, {"input_ids": ids}, k)["inputs_embeds"],
                               model(input_ids=ids, output_hidden_states=True).hidden_states[3 - k])


def test_top_layers_are_a_copy_and_bad_k_is_named():
    model = tiny_model(num_hidden_layers=2)
    top = top_layers(model, 1)
    assert top.model.layers[0] is not model.model.layers[1]
    for k in (0, 3):
        with pytest.raises(ValueError, match="k must be"):
            top_layers(model, k)
    with pytest.raises(TypeError, match="model must be a transformers decoder"):
        top_layers(torch.nn.Linear(2, 2), 1)


# ---------------------------------------------------------------- share=True: the copy runs model's own layers

def lora_model(num_hidden_layers=3, seed=0, scale=0.2):
    """A tiny model with LoRA on q/v of every layer, B made non-zero so the adapters change the output."""
    model = tiny_model(num_hidden_layers=num_hidden_layers, seed=seed)
    lora.apply_lora(model, ["q_proj", "v_proj"], r=4, lora_alpha=8)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in lora.lora_layers(model):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * scale)
    return model


def a_batch(seed=0):
    ids = torch.randint(3, 256, (2, 7), generator=torch.Generator().manual_seed(seed))
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def top_lora_params(model, k):
    """The LoRA parameters of model's last k layers, by name."""
    n = len(model.model.layers)
    prefixes = tuple(f"model.layers.{i}." for i in range(n - k, n))
    return {name: p for name, p in model.named_parameters() if "lora_" in name and name.startswith(prefixes)}


@pytest.mark.parametrize("k", [1, 2, 3])
def test_shared_top_layers_are_the_models_modules_and_compute_its_logits(k):
    model = lora_model()
    batch = a_batch(k)
    with torch.no_grad():
        before = model(**batch).logits
    top = top_layers(model, k, share=True)
    assert len(model.model.layers) == 3 and len(top.model.layers) == k
    for mine, theirs in zip(top.model.layers, model.model.layers[-k:]):
        assert mine is theirs
    # The adapters applied to model before the call are in the copy: the very same LoRA modules.
    assert [id(m) for m in lora.lora_layers(top)] == [id(m) for m in lora.lora_layers(model)[-2 * k:]]
    # model is left as it was: its layers, their KV-cache slots, use_cache, its output.
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2]
    assert model.config.use_cache and model.config.num_hidden_layers == 3
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        full = model(**batch)
        part = top(**top_layer_inputs(model, batch, k))
    torch.testing.assert_close(full.logits, before)
    torch.testing.assert_close(part.logits[real], full.logits[real])
    torch.testing.assert_close(part.loss, full.loss)
    with lora.disable_lora(model), torch.no_grad():  # the adapters matter, so the comparison above can fail
        assert (model(**batch).logits - full.logits).abs().max() > 1e-2


def test_shared_top_layers_leave_the_models_cached_generation_unchanged():
    model = lora_model()
    ids = a_batch()["input_ids"]
    kwargs = {"attention_mask": torch.ones_like(ids), "max_new_tokens": 5, "do_sample": False, "pad_token_id": 2}
    before = model.generate(ids, **kwargs)
    top = top_layers(model, 2, share=True)
    assert torch.equal(model.generate(ids, **kwargs), before)
    with torch.no_grad():  # without a KV cache the copy runs the shared layers at their places in model
        top(**top_layer_inputs(model, a_batch(), 2))
    assert torch.equal(model.generate(ids, **kwargs), before)


@pytest.mark.parametrize("k", [1, 2])
def test_gradients_through_the_shared_copy_are_the_full_models(k):
    model = lora_model()
    batch = a_batch(k)
    mine = top_lora_params(model, k)
    model(**batch).loss.backward()  # the reference: the full model's own gradient
    want = {name: p.grad.clone() for name, p in mine.items()}
    model.zero_grad(set_to_none=True)

    top = top_layers(model, k, share=True)
    top(**top_layer_inputs(model, batch, k)).loss.backward()
    assert len(mine) == 4 * k
    for name, p in mine.items():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, want[name], rtol=1e-4, atol=1e-6)
    assert max(p.grad.abs().max() for p in mine.values()) > 1e-4
    below = {name: p for name, p in model.named_parameters() if "lora_" in name and name not in mine}
    assert all(p.grad is None for p in below.values())  # the cached layers below are not in the graph


def test_an_optimiser_step_through_the_shared_copy_changes_the_model():
    model = lora_model()
    batch = a_batch()
    top = top_layers(model, 1, share=True)
    cached = top_layer_inputs(model, batch, 1)
    with torch.no_grad():
        before = model(**batch)
    params = [p for p in top.parameters() if p.requires_grad]
    assert {id(p) for p in params} == {id(p) for p in top_lora_params(model, 1).values()}
    optimiser = torch.optim.SGD(params, lr=0.5)
    top(**cached).loss.backward()
    optimiser.step()
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        after = model(**batch)
        part = top(**cached)
    assert (after.logits - before.logits).abs().max() > 1e-3
    assert after.loss < before.loss  # the step, taken on the copy's loss, lowered the model's
    torch.testing.assert_close(part.logits[real], after.logits[real])  # the two still compute one thing


def test_an_unshared_copy_is_independent_of_the_model():
    model = lora_model()
    batch = a_batch()
    with torch.no_grad():
        before = model(**batch).logits
    top = top_layers(model, 2)  # share=False, the default
    for mine, theirs in zip(top.model.layers, model.model.layers[-2:]):
        assert mine is not theirs
    model_params = {id(p) for p in model.parameters()}
    assert not any(id(p) in model_params for p in top.parameters())
    assert [layer.self_attn.layer_idx for layer in top.model.layers] == [0, 1]
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2]
    params = [p for p in top.parameters() if p.requires_grad]
    optimiser = torch.optim.SGD(params, lr=0.5)
    top(**top_layer_inputs(model, batch, 2)).loss.backward()
    optimiser.step()
    with torch.no_grad():
        top.model.layers[-1].mlp.down_proj.weight.add_(1.0)
        assert torch.equal(model(**batch).logits, before)
    assert all(p.grad is None for p in model.parameters())
