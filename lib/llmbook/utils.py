"""Small helpers shared by chapters and benchmarks: seeding and timing."""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable

import torch

__all__ = ["seed_everything", "time_call"]


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python's, NumPy's and torch's generators; return a fresh seeded ``torch.Generator``."""
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # numpy is optional for the package itself
        pass
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], *, repeat: int = 5, warmup: int = 1, device=None) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeat`` runs, after ``warmup`` runs.

    On CUDA the device is synchronised around each run so the time covers the kernels.
    """
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    device = torch.device(device) if device is not None else None
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)
