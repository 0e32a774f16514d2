"""llmbook.extraction: the task's data file and its strict scorer."""

import json

import pytest

from llmbook import extraction


def test_splits_are_disjoint_in_words_and_sentences():
    train, test = extraction.load_task("train"), extraction.load_task("test")
    assert len(train) >= 200 and len(test) >= 40
    assert all(set(e) == {"prompt", "response"} for e in train + test)
    for field in extraction.FIELDS:
        seen = {json.loads(e["response"])[field] for e in train}
        held_out = {json.loads(e["response"])[field] for e in test}
        assert not seen & held_out, f"{field}: held-out words must not occur in training"
    # Each answer's words occur in its own prompt: the task is extraction, not recall.
    for e in train + test:
        sentence = e["prompt"].splitlines()[0]
        assert all(word in sentence for word in json.loads(e["response"]).values())
    assert not {e["prompt"] for e in train} & {e["prompt"] for e in test}


@pytest.mark.parametrize("answer, ok", [
    ('{"animal": "owl", "colour": "pink", "place": "zoo"}', True),
    ('  {"place": "zoo", "colour": "Pink", "animal": "owl"}\n', True),      # order, case, spaces
    ('{"animal": "owl", "colour": "pink"}', False),                        # a key missing
    ('{"animal": "owl", "colour": "pink", "place": "zoo", "size": "big"}', False),
    ('{"animal": "owl", "colour": "red", "place": "zoo"}', False),          # a wrong value
    ('```json\n{"animal": "owl", "colour": "pink", "place": "zoo"}\n```', False),
    ('The animal is an owl.', False),
    ('["owl", "pink", "zoo"]', False),
    ('{"animal": ["owl"], "colour": "pink", "place": "zoo"}', False),
    ('', False),
])
def test_score_is_strict_json(answer, ok):
    example = {"prompt": "At the zoo there was a pink owl.", "response": json.dumps(
        {"animal": "owl", "colour": "pink", "place": "zoo"})}
    assert extraction.score(answer, example) is ok


def test_bad_arguments():
    with pytest.raises(ValueError, match="split must be one of"):
        extraction.load_task("validation")
    with pytest.raises(TypeError, match="answer must be a str"):
        extraction.score(None, {"response": "{}"})
    with pytest.raises(ValueError, match="response"):
        extraction.score("{}", {"prompt": "x"})


def test_a_task_row_without_its_response_is_named(tmp_path, monkeypatch):
    from llmbook import extraction

    (tmp_path / "task.jsonl").write_text('{"split": "train", "prompt": "p", "response": "{}"}\n'
                                         '{"split": "train", "prompt": "q", "id": "row-2"}\n')
    monkeypatch.setattr(extraction, "TASK_FILE", str(tmp_path / "task.jsonl"))
    with pytest.raises(ValueError, match=r"the 'train' row 'row-2' has no string \['response'\]"):
        extraction.load_task("train")
