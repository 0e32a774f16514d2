"""Every committed data/*.jsonl is exactly what its builder writes (``make data`` rewrites them all)."""

import importlib.util
from pathlib import Path

import pytest

from llmbook.data import write_jsonl

DATA = Path(__file__).resolve().parents[1] / "data"
NAMES = ["sft", "lora_task", "closed_book_qa", "knowledge_probe", "sampling_task", "preferences", "harmlessness", "arithmetic_rl"]


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


@pytest.mark.parametrize("name", [n for n in NAMES if n != "knowledge_probe"])  # the probe: below
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


def test_the_committed_probe_is_what_its_answers_say_and_its_first_batch_is_drawn_again(model_and_tokenizer):
    # The whole probe takes minutes; its first batch under every prompt is drawn again here
    # (chapter 5 does the same), and every row's category is checked against its answers.
    from llmbook import hallucination as H
    from llmbook.data import read_jsonl

    builder = _load("build_knowledge_probe")
    questions = read_jsonl(DATA / "closed_book_qa.jsonl")
    probed = read_jsonl(DATA / builder.OUTPUT)
    assert [p["id"] for p in probed] == [q["id"] for q in questions]
    per_prompt = builder.NUM_SAMPLES * len(builder.PROMPTS)
    for q, p in zip(questions, probed):
        assert len(p["greedy"]) == len(builder.PROMPTS) and len(p["samples"]) == per_prompt
        assert not any("\n" in a for a in p["greedy"] + p["samples"])  # each answer is its first line
        verdict = [H.is_correct(a, q["answer"], q["aliases"]) for a in p["greedy"] + p["samples"]]
        assert p["category"] == H.knowledge_category(verdict[: len(p["greedy"])], verdict[len(p["greedy"]):])
    assert {p["category"] for q, p in zip(questions, probed) if q["world"] == "invented"} == {"Unknown"}
    first = H.probe_order(questions)[: builder.BATCH_SIZE]
    again = builder.probe(*model_and_tokenizer, [questions[i] for i in first])
    assert again == [probed[i] for i in first]


def test_the_probes_worked_examples_are_not_questions_and_name_no_question_place():
    builder = _load("build_knowledge_probe")
    from llmbook.data import read_jsonl

    questions = read_jsonl(DATA / "closed_book_qa.jsonl")
    asked = {q["question"] for q in questions}
    places = {q["subject"] for q in questions} | {q["answer"] for q in questions if q["relation"] != "city_country"}
    assert len(builder.EXAMPLES) == 4 * len(builder.PROMPTS)
    for question, answer in builder.EXAMPLES:
        assert question not in asked
        named = question.removeprefix("What is the capital of ").removeprefix("In which country is the city of ")
        assert named.rstrip("?") not in places and answer.split(" is ")[-1].rstrip(".") not in places
    for prompt in builder.PROMPTS:  # one worked example a line pair, as the answers are cut at a line break
        assert prompt.count("Question: ") == 4 and prompt.count("Answer: ") == 4
