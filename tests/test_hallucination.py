"""Tests of chapter 5's data builder and Known/Unknown probe (llmbook.hallucination).

References: transformers' own ``generate`` and forward pass (greedy answers, their
probabilities, the SFT loss), and answers written by hand.
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from llmbook import data, hallucination as H
from llmbook.sampling import generate_answers

ROOT = Path(__file__).parents[1]


def _load_builder():
    spec = importlib.util.spec_from_file_location("build_closed_book_qa", ROOT / "data" / "build_closed_book_qa.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def builder():
    return _load_builder()


# ---------------------------------------------------------------- the data builder

def test_builder_is_deterministic_and_the_seed_matters(builder):
    assert builder.build() == builder.build()
    a = [r for r in builder.build(seed=1) if r["world"] == "invented"]
    b = [r for r in builder.build(seed=2) if r["world"] == "invented"]
    assert [r["subject"] for r in a] != [r["subject"] for r in b]


def test_rows_are_complete_and_consistent(builder):
    rows = builder.build()
    assert len({r["id"] for r in rows}) == len(rows)
    for r in rows:
        assert set(r) == {"id", "relation", "subject", "question", "answer", "aliases", "stem", "response", "world"}
        assert r["question"] == builder.TEMPLATES[r["relation"]].format(subject=r["subject"])
        assert r["response"].startswith(r["stem"] + " " + r["answer"]) and r["response"].endswith(".")
        assert r["subject"] in r["stem"] or r["subject"].capitalize() in r["stem"]
        # The question never gives the answer away (an echo must not count as right).
        assert not H.is_correct(r["question"], r["answer"]) or r["relation"] == "city_country"
        assert not H.is_correct(r["stem"], r["answer"], r["aliases"])
    counts = {w: sum(r["world"] == w for r in rows) for w in ("world", "invented")}
    assert counts["world"] > 200 and counts["invented"] == sum(builder.N_INVENTED.values())


def test_invented_names_are_new(builder):
    rows = builder.build()
    real = {n.lower() for r in rows if r["world"] == "world" for n in (r["subject"], r["answer"], *r["aliases"])}
    invented = [r for r in rows if r["world"] == "invented"]
    names = [r["subject"].lower() for r in invented]
    names += [r["answer"].lower() for r in invented if r["relation"] == "country_capital"]
    assert len(set(names)) == len(names) and not set(names) & real
    # An invented city's answer is a real country, so the question has a right answer to score.
    countries = {r["subject"] for r in rows if r["relation"] == "country_capital" and r["world"] == "world"}
    assert all(r["answer"] in countries for r in invented if r["relation"] == "city_country")


# Wrong answers that contain a country's or a city's name; none may count as right.
COMMON_WRONG = ["let us", "South America", "North Korea", "South Africa", "Papua New Guinea",
                "Equatorial Guinea", "South Sudan", "Northern Ireland", "New Mexico", "West Virginia",
                "the United States Virgin Islands", "Dominican Republic", "Washington State"]


def test_no_answer_or_alias_is_found_inside_a_wrong_answer(builder):
    rows = builder.build()
    names = sorted({n for r in rows for n in (r["subject"], r["answer"], *r["aliases"])}) + COMMON_WRONG
    for r in rows:
        golds = {H.normalize_answer(g) for g in (r["answer"], *r["aliases"])}
        for wrong in names:
            if H.normalize_answer(wrong) in golds:
                continue  # the same place, or another row with the same answer
            assert not H.is_correct(wrong, r["answer"], r["aliases"]), (r["id"], wrong)
        # and every alias names the place on its own (it is not a word of the question)
        for alias in r["aliases"]:
            assert not H.is_correct(r["question"], alias), (r["id"], alias)


def test_the_audited_rows_stay_out(builder):
    subjects = {(r["relation"], r["subject"]) for r in builder.build() if r["world"] == "world"}
    for country in ("Georgia", "Burundi", "Benin", "Tanzania", "Mexico", "Kuwait", "Panama", "Guatemala",
                    "Andorra"):
        assert ("country_capital", country) not in subjects, country
    kazakhstan = next(r for r in builder.build() if r["subject"] == "Kazakhstan")
    assert H.is_correct("Nur-Sultan.", kazakhstan["answer"], kazakhstan["aliases"])


def test_every_row_keeps_the_builders_rules(builder):
    rows = [r for r in builder.build() if r["world"] == "world"]
    capitals = {n for _, a, al in builder.COUNTRY_CAPITALS for n in (a, *al)}
    for r in rows:
        if r["relation"] == "city_country":  # not a capital of any country, and no namesake elsewhere
            assert r["subject"] not in capitals | builder.CAPITALS_ELSEWHERE, r["subject"]
            assert r["subject"] not in builder.AMBIGUOUS_CITIES, r["subject"]
        else:  # the capital's name does not hold the country's or state's (an echo would be right)
            subject, answer = (f" {H.normalize_answer(x)} " for x in (r["subject"], r["answer"]))
            assert subject not in answer, r["id"]
    left_out = {"Malaysia", "Myanmar", "the Netherlands", "Yemen", "Oklahoma", "Cape Town", "Guadalajara",
                "Saint Petersburg", "Naples", "Lagos", "Manchester"}
    assert not left_out & {r["subject"] for r in rows}


def _row(builder, subject):
    return next(r for r in builder.build() if r["subject"] == subject)


# Every spelling a reader would accept, and the near misses that must not count.
ANSWERS = [
    ("Chicago", "Chicago is in the US.", True), ("Chicago", "Chicago is in the U.S.", True),
    ("Chicago", "It is in America.", True), ("Chicago", "the United States of America", True),
    ("Chicago", "Chicago is in South America.", False), ("Chicago", "Let us see: Canada.", False),
    ("Busan", "Busan is in Korea.", True), ("Busan", "Busan is in North Korea.", False),
    ("India", "The capital of India is Delhi.", True), ("India", "New Delhi", True),
    ("Ukraine", "Kiev", True), ("Ukraine", "Kyiv", True),
    ("the United States", "Washington", True), ("the United States", "Washington DC", True),
    ("the United States", "Washington State", False),
    ("Edinburgh", "Edinburgh is in the UK.", True), ("Edinburgh", "Edinburgh is in the uk.", False),
    ("Kazakhstan", "Nur-Sultan.", True), ("Kazakhstan", "Astana", True),
]


@pytest.mark.parametrize("subject, response, expected", ANSWERS)
def test_every_accepted_spelling_is_accepted(builder, subject, response, expected):
    r = _row(builder, subject)
    assert H.is_correct(response, r["answer"], r["aliases"]) is expected


def test_builder_rejects_bad_counts(builder):
    with pytest.raises(ValueError, match="unknown relations"):
        builder.invented_rows(counts={"planet_moon": 3})
    with pytest.raises(ValueError, match="integers >= 0"):
        builder.invented_rows(counts={"country_capital": -1})


def test_stem_tokens_are_a_prefix_of_the_training_example(tokenizer):
    # The probe feeds chat prompt + stem; fine-tuning trains on chat prompt + response.
    # The first must tokenise to a prefix of the second, or probe and training disagree.
    for r in data.read_jsonl("closed_book_qa.jsonl"):
        probe_ids = tokenizer(data.chat_prompt(tokenizer, r["question"], "Answer briefly.") + r["stem"],
                              add_special_tokens=False).input_ids
        train_ids = data.encode_sft(tokenizer, r["question"], r["response"], system="Answer briefly.")["input_ids"]
        assert train_ids[: len(probe_ids)] == probe_ids, r["id"]


# ---------------------------------------------------------------- matching answers

@pytest.mark.parametrize("response, answer, aliases, expected", [
    ("The capital of France is Paris.", "Paris", [], True),
    ("paris", "Paris", [], True),
    ("The capital of Colombia is Bogota", "Bogotá", [], True),
    ("It is BOGOTÁ!", "Bogota", [], True),
    ("The capital of Ukraine is Kiev.", "Kyiv", ["Kiev"], True),
    ("The capital of Ukraine is Lviv.", "Kyiv", ["Kiev"], False),
    ("Rotterdam is in the Netherlands.", "the Netherlands", [], True),
    ("The capital is Kingstonia.", "Kingston", [], False),  # whole words only
    ("Port-au-Prince", "Port-au-Prince", [], True),
    ("Port au Prince, Haiti", "Port-au-Prince", [], True),
    ("Porto-Bano", "Porto-Novo", [], False),
    ("Yemen's capital: Sana'a", "Sanaa", [], True),
    ("let us go", "the United States", ["US"], False),  # an abbreviation only in capitals
    ("the US", "the United States", ["US"], True),
    ("", "Paris", [], False),
])
def test_is_correct_on_hand_made_answers(response, answer, aliases, expected):
    assert H.is_correct(response, answer, aliases) is expected


def test_normalize_answer():
    assert H.normalize_answer("  The  Bogotá! ") == "bogota"
    assert H.normalize_answer("Washington, D.C.") == "washington d c"
    assert H.normalize_answer("A an THE") == ""
    with pytest.raises(TypeError, match="text must be a str"):
        H.normalize_answer(None)
    with pytest.raises(ValueError, match="answer must contain"):
        H.is_correct("anything", "?!")


@pytest.mark.parametrize("greedy, samples, category", [
    ([True, True, True], [False, False], "HighlyKnown"),  # greedy right under every prompt
    ([True, False, True], [True, True], "MaybeKnown"),  # under some prompts
    ([False, False, False], [False, True], "WeaklyKnown"),  # only a sample is right
    ([False, False, False], [False, False], "Unknown"),
])
def test_knowledge_category_follows_the_papers_definitions(greedy, samples, category):
    assert H.knowledge_category(greedy, samples) == category
    assert (category in H.KNOWN) == any(greedy)


def test_metrics_on_hand_made_verdicts():
    assert H.accuracy([True, False, True, True]) == 0.75
    correct = [True, False, False, False]
    confidence = [0.9, 0.9, 0.5, 0.1]
    # Wrong with p >= 0.5: the second and third answers.
    assert H.confident_wrong_rate(correct, confidence) == 0.5
    assert H.confident_wrong_rate(correct, confidence, threshold=0.0) == 0.75
    with pytest.raises(ValueError, match="differ in length"):
        H.confident_wrong_rate([True], [0.1, 0.2])
    with pytest.raises(ValueError, match="threshold must be in"):
        H.confident_wrong_rate([True], [0.1], threshold=1.5)
    with pytest.raises(ValueError, match="empty"):
        H.accuracy([])


# ---------------------------------------------------------------- the probe, on the tiny model

QUESTIONS = ["What is the capital of France?", "In which country is the city of Osaka?",
             "What is the capital of the Czech Republic, a country in central Europe?"]
STEMS = ["The capital of France is", "Osaka is in", "The capital of the Czech Republic is"]


def test_probe_sorts_questions_by_what_the_model_says(chat_model, tokenizer):
    model = chat_model
    # Gold answers made from the tiny model's own greedy answers under the first prompt are
    # right there; a gold answer it never writes is Unknown.
    systems = ["Answer briefly.", "Be terse."]
    greedy = generate_answers(model, tokenizer, QUESTIONS, stems=STEMS, system=systems[0], max_new_tokens=3).greedy
    other = generate_answers(model, tokenizer, QUESTIONS, stems=STEMS, system=systems[1], max_new_tokens=3).greedy
    assert all(H.normalize_answer(g) for g in greedy)
    rows = [{"question": q, "stem": s, "answer": g} for q, s, g in zip(QUESTIONS, STEMS, greedy)]
    rows.append({"question": QUESTIONS[0], "stem": STEMS[0], "answer": "Zzyzxquorble"})
    result = H.probe(model, tokenizer, rows, systems=systems, num_samples=3, max_new_tokens=3, seed=0)
    assert [r["known"] for r in result] == [True, True, True, False]
    for r, g, o in zip(result, greedy + [greedy[0]], other + [other[0]]):
        assert r["greedy"] == [g, o]  # the order of the rows is kept
        assert r["greedy_correct"] == [H.is_correct(x, r["answer"]) for x in (g, o)]
        assert len(r["samples"]) == 3 * len(systems)  # under every prompt
        assert r["category"] == H.knowledge_category(r["greedy_correct"],
                                                     [H.is_correct(x, r["answer"]) for x in r["samples"]])
    assert result[-1]["category"] == "Unknown" and result[-1]["p_sample_correct"] == 0.0
    # Prompt k samples with seed + k, batch by batch: the first batch of the probe order,
    # probed alone, draws the same answers.
    batch = [rows[i] for i in H.probe_order(rows)[:2]]
    alone = H.probe(model, tokenizer, batch, systems=systems, num_samples=3, max_new_tokens=3, seed=0, batch_size=2)
    whole = H.probe(model, tokenizer, rows, systems=systems, num_samples=3, max_new_tokens=3, seed=0, batch_size=2)
    assert [r["samples"] for r in alone] == [whole[i]["samples"] for i in H.probe_order(rows)[:2]]
    assert H.probe_order(rows) == sorted(range(len(rows)), key=lambda i: len(rows[i]["question"] + rows[i]["stem"]))
    with pytest.raises(ValueError, match="num_samples"):
        H.probe(model, tokenizer, rows, systems=systems, num_samples=0)
    with pytest.raises(ValueError, match="systems must be a non-empty list"):
        H.probe(model, tokenizer, rows, systems="Answer briefly.")


def test_paired_bootstrap_matches_the_normal_approximation():
    # Many questions: the percentile interval approaches mean +- 1.96 sd / sqrt(n).
    g = torch.Generator().manual_seed(0)
    a = (torch.rand(3, 2000, generator=g) < 0.7).float()
    b = (torch.rand(3, 2000, generator=g) < 0.6).float()
    mean, low, high = H.paired_bootstrap(a, b, resamples=4000)
    diff = (a - b).mean(0)
    half = 1.959964 * diff.std().item() / diff.numel() ** 0.5
    assert mean == pytest.approx(diff.mean().item())
    assert low == pytest.approx(mean - half, abs=0.15 * half)
    assert high == pytest.approx(mean + half, abs=0.15 * half)
    # Identical conditions differ by nothing, with an interval of zero width.
    assert H.paired_bootstrap(a, a) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="same shape"):
        H.paired_bootstrap(a, b[:, :5])


def test_the_data_file_is_valid_json_lines():
    lines = (ROOT / "data" / "closed_book_qa.jsonl").read_text(encoding="utf-8").splitlines()
    assert all(json.loads(line)["question"].endswith("?") for line in lines)
