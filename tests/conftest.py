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
