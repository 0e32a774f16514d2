import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def device():
    """Unit tests run on the best device present (CUDA on a GPU runner, else the CPU)."""
    from llmbook.models import pick_device

    return pick_device()


@pytest.fixture(scope="module")
def tokenizer():
    """The default model's tokenizer (from the offline cache), with a pad token; one per test module."""
    from transformers import AutoTokenizer

    from llmbook.models import default_model_path

    tok = AutoTokenizer.from_pretrained(default_model_path())
    tok.pad_token = tok.pad_token or tok.eos_token
    return tok


@pytest.fixture(scope="module")
def chat_model(tokenizer):
    """A tiny random model with the real tokenizer's vocabulary: real chat prompts, millisecond forwards."""
    from llmbook.models import tiny_model

    return tiny_model(seed=0, vocab_size=len(tokenizer))


class _HidesItsHead(torch.nn.Module):
    """A causal LM behind a forward with no ``get_output_embeddings`` and no ``logits_to_keep``."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


@pytest.fixture
def hide_head():
    """``hide_head(model)``: the model as a library sees one that hides its output layer (full logits only)."""
    return _HidesItsHead
