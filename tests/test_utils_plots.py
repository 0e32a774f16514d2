import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from llmbook import plots
from llmbook.utils import seed_everything, time_call


def test_smooth_equals_a_trailing_mean():
    values = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0]
    expected = [np.mean(values[max(0, i - 2): i + 1]) for i in range(len(values))]
    np.testing.assert_allclose(plots.smooth(values, 3), expected)
    with pytest.raises(ValueError, match="window"):
        plots.smooth(values, 0)


def test_plot_history_refuses_gaps():
    with pytest.raises(ValueError, match="missing"):
        plots.plot_history({"step": [1, 2], "loss": [1.0, float("nan")]})


def test_seed_everything_matches_torch_manual_seed():
    seed_everything(123)
    ours = torch.rand(3)
    torch.manual_seed(123)
    torch.testing.assert_close(ours, torch.rand(3))
    g = seed_everything(5)
    torch.testing.assert_close(torch.rand(2, generator=g), torch.rand(2, generator=torch.Generator().manual_seed(5)))


def test_time_call_counts_runs_and_measures_sleep():
    import time

    calls = []
    seconds = time_call(lambda: (calls.append(1), time.sleep(0.01)), repeat=3, warmup=2)
    assert len(calls) == 5 and 0.009 < seconds < 0.5
    with pytest.raises(ValueError, match="repeat"):
        time_call(lambda: None, repeat=0)


_PEAK_CHILD = """
import json, sys, torch
from llmbook.utils import peak_bytes
device, size = sys.argv[1], 64 * 2**20

def allocate():
    block = torch.ones(size // 4, dtype=torch.float32, device=device)  # written, so resident
    assert block.sum().item() == size // 4

print(json.dumps({"peak": peak_bytes(allocate, device), "idle": peak_bytes(lambda: None, device)}))
"""


def test_peak_bytes_sees_a_freed_allocation(device):
    """A 64 MiB tensor made and dropped inside fn shows in the peak; an empty fn adds next to nothing.

    Measured in a fresh process, as the benchmarks do: in a long-lived one the allocator
    may hand back memory that earlier work left resident, which no peak can see.
    """
    size = 64 * 2**20
    out = subprocess.run([sys.executable, "-c", _PEAK_CHILD, device.type], capture_output=True, text=True,
                         check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert size <= result["peak"] < 2 * size
    assert result["idle"] < size // 4
