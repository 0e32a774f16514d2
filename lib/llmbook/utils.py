"""Small helpers shared by chapters and benchmarks: seeding, timing, peak memory, and the
book's numeric policy (which CPUs have native bf16, and how close two computations of one
quantity must be)."""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable

import torch

from llmbook._checks import check_int, check_real

__all__ = [
    "TOLERANCES",
    "cpu_capability",
    "cpu_has_native_bf16",
    "peak_bytes",
    "peak_memory_since",
    "peak_memory_start",
    "seed_everything",
    "time_call",
    "tolerance",
]


# --- the numeric policy ------------------------------------------------------------

def cpu_capability() -> str:
    """The vector instruction set PyTorch's CPU kernels dispatch to: ``"AVX512"``, ``"AVX2"``,
    ``"DEFAULT"`` (no vector kernels), ``"ZVECTOR"``, ``"SVE256"``, ... (honours
    ``ATEN_CPU_CAPABILITY``, which lowers it)."""
    return torch.backends.cpu.get_cpu_capability()


def cpu_has_native_bf16(capability: str | None = None, onednn_bf16: bool | None = None) -> bool:
    """Whether bfloat16 matrix products run at full speed on this CPU.

    PyTorch sends CPU bf16 matrix products to oneDNN, which has fast kernels only where the
    CPU has bf16 instructions (AVX512-BF16 or AMX on x86, BF16 on ARMv8.6+); elsewhere
    they fall back to a scalar loop, 30 to 90 times slower than float32. Both conditions
    are read from PyTorch, never assumed from the CPU's name: the ATen dispatch level must
    be above AVX2 (an AVX2-only x86 CPU, or one told ``ATEN_CPU_CAPABILITY=avx2``, has none)
    and oneDNN must report bf16 support (``ONEDNN_MAX_CPU_ISA=AVX2`` turns it off).

    Args:
        capability: the dispatch level to judge instead of this CPU's (for tests).
        onednn_bf16: oneDNN's answer to judge instead of this CPU's (for tests).
    """
    capability = cpu_capability() if capability is None else capability
    if not isinstance(capability, str):
        raise TypeError(f"capability must be a string such as 'AVX2', got {type(capability).__name__}")
    if capability.upper() in ("DEFAULT", "AVX", "AVX2", "NO AVX"):
        return False
    if onednn_bf16 is None:
        onednn_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return bool(onednn_bf16)


# How close two computations of one quantity must be, by the kind of computation and the
# dtype they ran in. Measured differences are far inside these on every kernel path tried
# (AVX512, AVX2, ATen's scalar "default" path, one thread, CUDA): see chapter 1 and
# docs/portability.md. A real mistake (a missing scale, a shifted label, a wrong mask)
# moves these numbers by 1e-1 or more, far outside them.
TOLERANCES: dict[str, dict[torch.dtype, dict[str, float]]] = {
    # One operation, or one layer, computed two ways on the same inputs: different
    # summation orders and vectorised transcendental functions round differently.
    # float32 keeps ~7 digits; a sum over a 49,152-token vocabulary loses up to ~2 of them.
    "op": {
        torch.float64: dict(rtol=1e-9, atol=1e-9),
        torch.float32: dict(rtol=1e-4, atol=1e-4),
        torch.float16: dict(rtol=5e-3, atol=1e-3),
        torch.bfloat16: dict(rtol=3e-2, atol=1e-2),
    },
    # The outputs (logits, losses) of a whole 30-layer model computed along two paths:
    # cached vs one pass, merged vs unmerged weights, ours vs PEFT/TRL/transformers.
    # Rounding of every layer propagates through the ones above it; logits reach |x| ~ 40.
    "model": {
        torch.float64: dict(rtol=1e-7, atol=1e-7),
        torch.float32: dict(rtol=1e-3, atol=1e-3),
        torch.float16: dict(rtol=5e-2, atol=1e-1),
        torch.bfloat16: dict(rtol=1e-1, atol=1.0),
    },
}


def tolerance(dtype: torch.dtype, kind: str = "model", scale: float = 1.0) -> dict[str, float]:
    """``dict(rtol=..., atol=...)`` for comparing two computations of one quantity.

    Use it as ``torch.testing.assert_close(a, b, **tolerance(a.dtype, "model"))``.
    Comparisons that are exact by construction (B = 0, a mask, a bit-exact warper)
    should use ``rtol=0, atol=0`` instead.

    Args:
        dtype: the dtype the computation ran in (the model's, for model outputs).
        kind: ``"op"`` for one operation or layer computed two ways, ``"model"`` for the
            outputs of a whole model computed along two paths.
        scale: the typical size of the quantity; ``atol`` is set for quantities of order
            one (logits, log-probabilities, losses) and is multiplied by ``scale``, so
            that gradients of size 1e-3 get an ``atol`` 1000 times smaller.
    """
    if kind not in TOLERANCES:
        raise ValueError(f"kind must be one of {sorted(TOLERANCES)}, got {kind!r}")
    if not isinstance(dtype, torch.dtype) or dtype not in TOLERANCES[kind]:
        raise ValueError(f"dtype must be one of {sorted(str(d) for d in TOLERANCES[kind])}, got {dtype!r}")
    scale = check_real(scale, "scale", low=0.0, low_open=True)
    chosen = TOLERANCES[kind][dtype]
    return dict(rtol=chosen["rtol"], atol=chosen["atol"] * scale)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python's, NumPy's and torch's generators; return a fresh seeded ``torch.Generator``."""
    seed = check_int(seed, "seed", minimum=0, maximum=2**32 - 1, hint="(NumPy's range)")
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
    if not callable(fn):
        raise TypeError(f"fn must be callable with no arguments, got {type(fn).__name__}")
    repeat = check_int(repeat, "repeat", minimum=1)
    warmup = check_int(warmup, "warmup", minimum=0)
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
    if not callable(fn):
        raise TypeError(f"fn must be callable with no arguments, got {type(fn).__name__}")
    start = peak_memory_start(device)
    fn()
    return peak_memory_since(device, start)
