"""Every committed data/*.jsonl is exactly what its builder writes (``make data`` rewrites them all)."""

import importlib.util
from pathlib import Path

import pytest

from llmbook.data import write_jsonl

DATA = Path(__file__).resolve().parents[1] / "data"
NAMES = ["sft", "lora_task", "closed_book_qa", "sampling_task", "preferences", "harmlessness", "arithmetic_rl"]


def _load(stem: str):
    """A module of data/ by its file name (data/ is not a package)."""
    spec = importlib.util.spec_from_file_location(stem, DATA / f"{stem}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model_and_tokenizer():
    """The book's model in float32 on the CPU, where its greedy continuations are deterministic."""
    from llmbook.models import load_model

    return load_model(device="cpu", dtype="float32")


def test_every_builder_is_checked_and_driven():
    assert sorted(p.stem for p in DATA.glob("build_*.py")) == sorted(f"build_{n}" for n in NAMES)
    assert list(_load("build").NAMES) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_committed_file_is_what_the_builder_builds(name, tmp_path, request):
    builder = _load(f"build_{name}")
    assert builder.OUTPUT == f"{name}.jsonl"
    if name == "preferences":  # the rejected answers are the real model's own continuations
        rows = builder.build(*request.getfixturevalue("model_and_tokenizer"))
    else:
        rows = builder.build()
    fresh = write_jsonl(tmp_path / builder.OUTPUT, rows)
    assert fresh.read_bytes() == (DATA / builder.OUTPUT).read_bytes()


def test_driver_writes_the_names_asked_for_once_each(tmp_path, capsys):
    _load("build").main(["sampling_task", "data/build_sampling_task.py", "--out-dir", str(tmp_path)])
    assert [p.name for p in tmp_path.iterdir()] == ["sampling_task.jsonl"]
    assert (tmp_path / "sampling_task.jsonl").read_bytes() == (DATA / "sampling_task.jsonl").read_bytes()
    assert capsys.readouterr().out == f"wrote 48 rows to {tmp_path / 'sampling_task.jsonl'}\n"
    with pytest.raises(SystemExit):
        _load("build").main(["nonsense"])
