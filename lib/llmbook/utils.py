"""Small helpers shared by chapters and benchmarks: seeding, timing and peak memory."""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable

import torch

__all__ = ["seed_everything", "time_call", "peak_memory_start", "peak_memory_since", "peak_bytes"]


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


def _proc_status(field: str) -> int:
    """A byte count from ``/proc/self/status`` (Linux), e.g. ``VmRSS`` or ``VmHWM``."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_start(device) -> int:
    """Start measuring peak memory on ``device``; returns what :func:`peak_memory_since` needs.

    On CUDA it resets the allocator's peak; on the CPU (Linux) it resets the process's
    resident-set high-water mark (``VmHWM``) to its current size.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/clear_refs", "w") as handle:  # "5" resets VmHWM to the current VmRSS
        handle.write("5")
    return _proc_status("VmRSS")


def peak_memory_since(device, start: int) -> int:
    """Bytes by which memory grew at its peak since :func:`peak_memory_start` returned ``start``."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    return _proc_status("VmHWM") - start


def peak_bytes(fn: Callable[[], object], device) -> int:
    """Bytes by which memory grows at its peak while ``fn()`` runs (see :func:`peak_memory_start`)."""
    start = peak_memory_start(device)
    fn()
    return peak_memory_since(device, start)
