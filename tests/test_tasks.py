"""llmbook.tasks: the data file, the scorer, and batched greedy answers against transformers."""

import json

import pytest
import torch

from llmbook import models, tasks


def test_splits_are_disjoint_in_words_and_sentences():
    train, test = tasks.load_task("train"), tasks.load_task("test")
    assert len(train) >= 200 and len(test) >= 40
    assert all(set(e) == {"prompt", "response"} for e in train + test)
    for field in tasks.FIELDS:
        seen = {json.loads(e["response"])[field] for e in train}
        held_out = {json.loads(e["response"])[field] for e in test}
        assert not seen & held_out, f"{field}: held-out words must not occur in training"
    # Each answer's words occur in its own prompt: the task is extraction, not recall.
    for e in train + test:
        sentence = e["prompt"].splitlines()[0]
        assert all(word in sentence for word in json.loads(e["response"]).values())
    assert not {e["prompt"] for e in train} & {e["prompt"] for e in test}


def test_file_is_what_the_generator_writes(tmp_path):
    import importlib.util

    from llmbook.data import data_dir

    spec = importlib.util.spec_from_file_location("build_lora_task", data_dir() / "build_lora_task.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fresh = module.build(tmp_path / "task.jsonl")
    assert fresh.read_text() == (data_dir() / tasks.TASK_FILE).read_text()


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
    assert tasks.score(answer, example) is ok


def test_bad_arguments(tokenizer):
    with pytest.raises(ValueError, match="split must be one of"):
        tasks.load_task("validation")
    with pytest.raises(TypeError, match="answer must be a str"):
        tasks.score(None, {"response": "{}"})
    with pytest.raises(ValueError, match="response"):
        tasks.score("{}", {"prompt": "x"})
    model = models.tiny_model(vocab_size=tokenizer.vocab_size + 64)
    with pytest.raises(ValueError, match="examples is empty"):
        tasks.accuracy(model, tokenizer, [])
    with pytest.raises(ValueError, match="max_new_tokens"):
        tasks.generate_answers(model, tokenizer, ["hi"], max_new_tokens=0)
    with pytest.raises(TypeError, match="sequence of strings"):
        tasks.generate_answers(model, tokenizer, "hi")


def test_batched_answers_equal_one_by_one_generate(tokenizer):
    # A tiny random model with the real tokenizer: batching with left padding must not change greedy answers.
    model = models.tiny_model(seed=3, vocab_size=len(tokenizer))
    prompts = [e["prompt"] for e in tasks.load_task("test")[:3]] + ["Hi"]
    side = tokenizer.padding_side
    batched = tasks.generate_answers(model, tokenizer, prompts, max_new_tokens=6, batch_size=4)
    assert tokenizer.padding_side == side, "the tokenizer's padding side is restored"
    for prompt, answer in zip(prompts, batched):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        assert answer == tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_accuracy_counts_scored_answers(tokenizer, monkeypatch):
    examples = tasks.load_task("test")[:4]
    canned = [examples[0]["response"], "nope", examples[2]["response"], examples[3]["response"] + " and more"]
    monkeypatch.setattr(tasks, "generate_answers", lambda *a, **k: canned)
    assert tasks.accuracy(None, tokenizer, examples) == 0.5
