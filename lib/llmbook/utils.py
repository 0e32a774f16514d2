"""Small helpers shared by chapters and benchmarks: seeding, timing, peak memory, and the
book's numeric policy (which CPUs have native bf16, and how close two computations of one
quantity must be)."""

from __future__ import annotations

import contextlib
import os
import random
import statistics
import time
from collections.abc import Callable, Mapping

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from llmbook._checks import check_bool, check_int, check_real

__all__ = [
    "LiveTensorBytes",
    "TOLERANCES",
    "WorkCounter",
    "cpu_capability",
    "cpu_has_native_bf16",
    "count_calls",
    "count_flops",
    "eval_mode",
    "paired_bootstrap",
    "peak_bytes",
    "peak_memory_since",
    "peak_memory_start",
    "progress",
    "seed_everything",
    "time_call",
    "time_interleaved",
    "tolerance",
    "umask",
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


def progress(iterable, *, desc: str, disable: bool = False):
    """A text progress bar over ``iterable``, written to standard error.

    Plain text rather than a notebook widget: it updates in place in JupyterLab and in a
    terminal, for the person watching the cell. The book (``nb_output_stderr: remove`` in
    ``_config.yml``) and nbval (``chapters/conftest.py``) leave standard error out, and
    ``scripts/clean_notebooks.py`` (run by ``make execute``) takes the saved bar out of the
    committed notebook. It redraws at most every 2 s.
    """
    import sys

    from tqdm.std import tqdm

    if not isinstance(desc, str):
        raise TypeError(f"desc must be a str (the bar's label), got {type(desc).__name__}")
    return tqdm(iterable, desc=desc, disable=disable, file=sys.stderr, mininterval=2.0,
                ncols=88, leave=True)


def umask() -> int:
    """The process's umask (the permission bits new files lose), read without changing it where Linux allows.

    Files written atomically (a temporary file renamed into place) get ``0o666 & ~umask()``,
    the permissions ``open()`` would have given them; ``tempfile.mkstemp`` alone gives 0600.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere the only way to read it is to set it, and set it back
    os.umask(mask)
    return mask


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Put ``model`` in eval mode (dropout off) inside the block, and back in its previous mode after.

    Generation and evaluation run inside it, so calling them in the middle of training leaves
    the model training, and calling them on an evaluating model leaves it evaluating.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _sync(device: torch.device | None) -> None:
    """Wait for the work queued on ``device`` (CUDA, MPS); nothing to wait for on the CPU."""
    if device is None:
        return
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


_STATISTICS = {"median": statistics.median, "min": min}


def time_interleaved(fns: Mapping[str, Callable[[], object]], *, repeat: int = 5, warmup: int = 1,
                     device=None, statistic: str = "median",
                     setup: Mapping[str, Callable[[], object]] | None = None) -> dict[str, float]:
    """Wall-clock seconds of each labelled callable, timed in turns so that all see the same machine.

    Runs ``warmup + repeat`` rounds; in each round every ``fns[label]()`` runs once, in the
    mapping's order in even rounds and in reverse order in odd ones, so that no callable
    always runs right after the same other one. The first ``warmup`` rounds are not timed.
    Because the callables alternate, a change in the machine's load (another job starting,
    the CPU's clock dropping) hits all of them alike and cancels in their ratio, which
    timing one callable's runs after the other's does not.

    This is the one timer of the book and its benchmarks (:func:`time_call` is its case of
    one callable). What is done once and must not be timed (building a batch, an
    optimiser) belongs outside the callables; what must be redone, untimed, before every
    run (waiting for a trainer to reach its next step, resetting a cache) goes in
    ``setup``. Each callable is called exactly ``warmup + repeat`` times, so one can stand
    for the next step of a training run of that many steps.

    Args:
        fns: ``{label: fn}``, each ``fn`` callable with no arguments; its result is dropped.
        repeat: timed runs of each callable (>= 1).
        warmup: untimed rounds before them (>= 0), for caches, lazy allocation and
            kernel selection.
        device: a ``torch.device`` or string; on CUDA (and MPS) the device is synchronised
            before and after each run, so the time covers the kernels it queued.
            ``None`` or a CPU device: no synchronisation.
        statistic: ``"median"`` (the default: robust to a few disturbed runs) or ``"min"``
            (the least disturbed run, for long runs on a shared machine).
        setup: ``{label: prepare}`` for some of the labels: ``prepare()`` runs, untimed,
            right before every run (warm-up or timed) of ``fns[label]``.

    Returns:
        ``{label: seconds}``, in the order of ``fns``: the ``statistic`` of each callable's
        ``repeat`` timed runs.
    """
    if not isinstance(fns, Mapping):
        raise TypeError(f"fns must be a dict of label -> callable, got {type(fns).__name__}")
    if not fns:
        raise ValueError("fns is empty: pass at least one label -> callable")
    for label, fn in fns.items():
        if not isinstance(label, str):
            raise TypeError(f"fns' labels must be strings, got {type(label).__name__} ({label!r})")
        if not callable(fn):
            raise TypeError(f"fns[{label!r}] must be callable with no arguments, got {type(fn).__name__}")
    repeat = check_int(repeat, "repeat", minimum=1)
    warmup = check_int(warmup, "warmup", minimum=0)
    if statistic not in _STATISTICS:
        raise ValueError(f"statistic must be one of {sorted(_STATISTICS)}, got {statistic!r}")
    if setup is None:
        setup = {}
    if not isinstance(setup, Mapping):
        raise TypeError(f"setup must be a dict of label -> callable or None, got {type(setup).__name__}")
    unknown = [label for label in setup if label not in fns]
    if unknown:
        raise ValueError(f"setup's labels must be labels of fns {list(fns)}, got {unknown}")
    for label, prepare in setup.items():
        if not callable(prepare):
            raise TypeError(f"setup[{label!r}] must be callable with no arguments, got {type(prepare).__name__}")
    device = torch.device(device) if device is not None else None
    labels = list(fns)
    times: dict[str, list[float]] = {label: [] for label in labels}
    for round_ in range(warmup + repeat):
        for label in labels if round_ % 2 == 0 else reversed(labels):
            if label in setup:
                setup[label]()
            _sync(device)
            start = time.perf_counter()
            fns[label]()
            _sync(device)
            if round_ >= warmup:
                times[label].append(time.perf_counter() - start)
    return {label: _STATISTICS[statistic](times[label]) for label in labels}


def time_call(fn: Callable[[], object], *, repeat: int = 5, warmup: int = 1, device=None) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeat`` runs, after ``warmup`` runs.

    On CUDA the device is synchronised around each run so the time covers the kernels.
    The case of one callable of :func:`time_interleaved`; to compare two computations,
    time them together with that instead.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable with no arguments, got {type(fn).__name__}")
    return time_interleaved({"fn": fn}, repeat=repeat, warmup=warmup, device=device)["fn"]


# --- intervals ------------------------------------------------------------------------

def paired_bootstrap(a, b, *, seeds: bool = False, resamples: int = 10_000, level: float = 0.95,
                     seed: int = 0) -> tuple[float, float, float]:
    """The mean of ``a - b`` and a percentile bootstrap interval for it.

    ``a`` and ``b`` are two conditions measured on the same questions (0/1 verdicts, or
    probabilities such as an exact expected reward), paired question by question. Each
    resample draws the questions with replacement; with ``seeds=True`` it also draws the
    seeds (the rows) with replacement, independently, so the interval carries the spread
    between training runs as well as between questions. Without it, a question's difference
    is averaged over the seeds first (the seeds stay fixed).

    Args:
        a, b: shape ``(seeds, questions)`` or ``(questions,)``, the same for both.
        seeds: resample the seeds too (needs 2 or more rows).
        resamples: bootstrap resamples (>= 100).
        level: the interval's coverage, in (0, 1).
        seed: seeds the resampling.

    Returns:
        ``(mean, low, high)``. Chapters 5 and 8 use it.
    """
    named = {}
    for name, value in (("a", a), ("b", b)):
        try:
            named[name] = torch.as_tensor(value, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"{name} must be numbers (a list or array of per-question scores), got {value!r:.60}") \
                from None
        if not torch.isfinite(named[name]).all():
            raise ValueError(f"{name} holds NaN or infinite scores; every question needs a finite score")
    a, b = named["a"], named["b"]
    if a.shape != b.shape or a.dim() not in (1, 2) or a.shape[-1] < 2:
        raise ValueError(f"a and b must have the same shape, (seeds, questions) or (questions,) with at least "
                         f"2 questions; got {tuple(a.shape)} and {tuple(b.shape)}")
    seeds = check_bool(seeds, "seeds")
    resamples = check_int(resamples, "resamples", minimum=100)
    level = check_real(level, "level", low=0.0, high=1.0, low_open=True, high_open=True)
    diff = (a - b).reshape(-1, a.shape[-1])  # (seeds, questions)
    S, Q = diff.shape
    if seeds and S < 2:
        raise ValueError(f"seeds=True resamples the rows (seeds) and needs at least 2 of them, got {S}")
    g = torch.Generator().manual_seed(check_int(seed, "seed"))
    questions = torch.randint(Q, (resamples, Q), generator=g)
    if seeds:
        rows = torch.randint(S, (resamples, S), generator=g)
        # resample r: mean over the drawn seeds of the mean over the drawn questions
        means = diff[rows[:, :, None], questions[:, None, :]].mean(dim=(1, 2))
    else:
        means = diff.mean(dim=0)[questions].mean(dim=1)
    tail = (1 - level) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return float(diff.mean()), low, high


# --- counting work: what a cost claim is asserted on (a clock depends on the machine's load) ---

def count_flops(fn: Callable[[], object]) -> int:
    """Floating-point operations of ``fn()``, counted as PyTorch's ``FlopCounterMode`` counts them.

    Matrix products and attention are counted, 2 per multiply-add ($2mnk$ for an
    $(m \\times k)(k \\times n)$ product), in the forward pass and in any backward pass that
    ``fn`` runs; elementwise work (softmax, norms, activations) is not. The count depends
    only on the shapes ``fn`` computes with, never on how busy the machine is, so a chapter
    asserts a cost claim on it and shows the measured time beside it (chapters 1, 3 and 4).

    It uses PyTorch's own table of per-operator counts (``torch.utils.flop_counter``), plus
    the attention kernel PyTorch runs on a CPU, which that table leaves out, counted with
    the table's formulas for the CUDA kernels: $2 b h s_q s_k (d_q + d_v)$ forward, five
    products backward, with $h$ the query heads (grouped-query attention shares keys, but
    each query head does its own products). As in PyTorch's count, attention is charged for
    the whole $s_q \\times s_k$ rectangle, the causally masked half included.
    ``FlopCounterMode`` itself is not used: its per-module tracking fails on a module that
    returns a trainable parameter as it is (a prefix's keys and values, chapter 4).
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable with no arguments, got {type(fn).__name__}")
    with WorkCounter() as counter:
        fn()
    return counter.flops


def _cpu_attention_flops(query, key, value, *args, **kwargs) -> int:
    """PyTorch's count for its CUDA attention kernels, $2 b h s_q s_k (d_q + d_v)$ ($Q K^T$, $P V$)."""
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query.shape, key.shape, value.shape)


def _cpu_attention_backward_flops(grad_out, query, key, value, *args, **kwargs) -> int:
    """PyTorch's count for the CUDA kernels' backward: five products (the scores recomputed, then
    the gradients of $P$, $V$, $Q$ and $K$), $2 b h s_q s_k (3 d_q + 2 d_v)$."""
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)


class WorkCounter(TorchDispatchMode):
    """Counts the work PyTorch does while it is active (a context manager, or ``__enter__`` /
    ``__exit__`` around code that is not one block, such as a notebook cell).

    ``flops``: floating-point operations, as :func:`count_flops` counts them; ``products``:
    the operator calls that have such a count (matrix products, attention); ``ops``: every
    operator call PyTorch dispatches (elementwise work, views and copies included), the
    number that grows with small steps such as decoding one token at a time, whatever
    their size. Counters nest: an inner one sees its block, an outer one sees it too.
    """

    def __init__(self) -> None:
        from torch.utils.flop_counter import flop_registry

        super().__init__()
        aten = torch.ops.aten
        self.registry = {
            **flop_registry,
            aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flops,
        }
        self.flops = self.products = self.ops = 0

    def __repr__(self) -> str:
        return f"WorkCounter(flops={self.flops}, products={self.products}, ops={self.ops})"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops += 1
        count = self.registry.get(func._overloadpacket)
        if count is not None:
            self.products += 1
            self.flops += int(count(*args, **kwargs, out_val=out))
        return out


class _Calls:
    """The number of forward calls :func:`count_calls` has seen so far (``.n``)."""

    def __init__(self) -> None:
        self.n = 0

    def __repr__(self) -> str:
        return f"{self.n} call(s)"


@contextlib.contextmanager
def count_calls(module: torch.nn.Module):
    """Count the forward calls of ``module`` inside the ``with`` block.

    ``with count_calls(model) as calls: ...`` then ``calls.n``: e.g. one call for a
    parallel pass over $T$ tokens against $T$ calls for decoding them one by one (chapter 1).
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    calls = _Calls()

    def hook(*_):
        calls.n += 1

    handle = module.register_forward_pre_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()


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


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of the tensors created inside the ``with`` block that are alive after each operation.

    A ``TorchDispatchMode`` sees every operation PyTorch runs, forward and backward. After
    each one it adds up the storage of every tensor created since the block began that is
    still referenced; ``curve`` is that sum after each operation (starting at 0), so
    ``max(curve)`` is the peak of live tensor memory, counted the same way on any device.
    A view shares its input's storage and adds nothing; a storage is dropped from the
    count at the first operation after it was freed. Chapter 2 draws the curve of a loss's
    forward and backward with it.
    """

    def __init__(self):
        super().__init__()
        self.alive, self.curve = {}, [0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.multiprocessing.reductions import StorageWeakRef
        from torch.utils._pytree import tree_leaves

        out = func(*args, **(kwargs or {}))
        inputs = {StorageWeakRef(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if torch.is_tensor(t)}
        for ref in [r for r in self.alive if r.expired()]:
            del self.alive[ref]  # freed since the last operation
        for t in tree_leaves(out):
            if torch.is_tensor(t) and StorageWeakRef(t.untyped_storage()) not in inputs:  # views are not new memory
                self.alive.setdefault(StorageWeakRef(t.untyped_storage()), t.untyped_storage().nbytes())
        self.curve.append(sum(self.alive.values()))
        return out
