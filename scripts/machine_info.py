"""Describe the machine a measurement ran on, in one line a reader can compare with their own.

Used by scripts/run_benchmarks.py and scripts/chapter_times.py.
"""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return " ".join(line.split(":", 1)[1].split())
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    return None


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def load_average() -> float | None:
    """The 1-minute load average (other work on the machine inflates timings), or None."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def describe() -> dict:
    """A dict: date, cpu, cores, memory_gib, gpu, os, python, torch."""
    import torch

    gpu = None
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        gpu = "Apple MPS"
    memory = _memory_gib()
    return {
        "date": datetime.date.today().isoformat(),
        "cpu": _cpu_model(),
        "cores": _cores(),
        "memory_gib": round(memory) if memory else None,
        "gpu": gpu,
        "os": f"{platform.system()} {platform.machine()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


# The environment variables that lower the kernels torch uses (see docs/portability.md).
KERNEL_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "OMP_NUM_THREADS")


def kernel_path() -> dict:
    """Which CPU kernels torch uses in this process: its vector level, native bf16, threads and
    the environment variables that lower them (``ATEN_CPU_CAPABILITY`` and friends)."""
    import torch

    from llmbook.utils import cpu_capability, cpu_has_native_bf16

    env = {k: os.environ[k] for k in KERNEL_VARIABLES if os.environ.get(k)}
    return {"capability": cpu_capability(), "native_bf16": cpu_has_native_bf16(),
            "threads": torch.get_num_threads(), "env": env}


def kernel_label(kernels: dict | None) -> str:
    """``AVX2, no native bf16 (emulated)`` for a table cell."""
    if not kernels:
        return "n/a"
    label = f"{kernels['capability']}, {'native' if kernels['native_bf16'] else 'no native'} bf16"
    if kernels.get("env", {}).get("ATEN_CPU_CAPABILITY"):
        label += " (emulated)"
    if kernels.get("env", {}).get("OMP_NUM_THREADS"):
        label += f", {kernels['threads']} thread{'s' if kernels['threads'] != 1 else ''}"
    return label


def one_line(info: dict) -> str:
    """``2 cores of an Intel Xeon ..., 24 GiB, no GPU, Linux x86_64, Python 3.11.2, torch 2.13.0``."""
    memory = f", {info['memory_gib']} GiB" if info.get("memory_gib") else ""
    gpu = f"GPU {info['gpu']}" if info.get("gpu") else "no GPU"
    return (f"{info['cores']} cores of {info['cpu']}{memory}, {gpu}, {info['os']}, "
            f"Python {info['python']}, torch {info['torch']}")
