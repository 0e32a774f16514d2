"""models.top_layers / top_layer_inputs: the top k layers on cached hidden states compute the full model."""

import pytest
import torch

from llmbook import losses
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


def test_top_layers_are_a_copy_and_bad_k_is_named():
    model = tiny_model(num_hidden_layers=2)
    top = top_layers(model, 1)
    assert top.model.layers[0] is not model.model.layers[1]
    for k in (0, 3):
        with pytest.raises(ValueError, match="k must be"):
            top_layers(model, k)
    with pytest.raises(TypeError, match="model must be a transformers decoder"):
        top_layers(torch.nn.Linear(2, 2), 1)
