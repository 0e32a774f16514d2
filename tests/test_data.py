import json
import re

import pytest
import torch

from llmbook import data
from llmbook.dpo import is_refusal


def test_sft_labels_are_exactly_the_response_and_end_of_turn(tokenizer):
    enc = data.encode_sft(tokenizer, "What is 2+2?", "4")
    ids, labels = enc["input_ids"], enc["labels"]
    n_masked = labels.count(data.IGNORE_INDEX)
    assert labels[:n_masked] == [-100] * n_masked and -100 not in labels[n_masked:]
    assert labels[n_masked:] == ids[n_masked:]
    # The masked part is the chat prompt as the template writes it; the rest is the answer.
    assert tokenizer.decode(ids[:n_masked]) == data.chat_prompt(tokenizer, "What is 2+2?")
    assert tokenizer.decode(ids[n_masked:]) == "4<|im_end|>\n"
    full = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+2?"},
                                          {"role": "assistant", "content": "4"}], tokenize=False)
    assert tokenizer.decode(ids) == full


def test_unmasked_sft_keeps_every_label(tokenizer):
    enc = data.encode_sft(tokenizer, "Hi", "Hello!", mask_prompt=False)
    assert enc["labels"] == enc["input_ids"]


def test_sft_collator_pads_right_and_masks_padding(tokenizer):
    batch = data.SFTCollator(tokenizer)([{"prompt": "Name a colour.", "response": "Blue."},
                                         {"prompt": "Name a colour, please, a warm one.", "response": "Red, a warm colour."}])
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == mask.shape == labels.shape and ids.dtype == torch.long
    lengths = mask.sum(1)
    for row in range(2):
        n = lengths[row]
        assert mask[row, :n].all() and not mask[row, n:].any()
        assert (labels[row, n:] == -100).all() and (ids[row, n:] == tokenizer.pad_token_id).all()
    # The model's own loss over this batch is finite: there are response tokens to learn.
    assert (labels != -100).sum() > 0


def test_preference_collator_shapes_and_masks(tokenizer):
    batch = data.PreferenceCollator(tokenizer)([
        {"prompt": "Say hi.", "chosen": "Hi there, friend!", "rejected": "No."},
        {"prompt": "Count to three.", "chosen": "1, 2, 3.", "rejected": "1, 2, 3, 4, 5, 6, 7."},
    ])
    shapes = {k: tuple(v.shape) for k, v in batch.items()}
    assert len(set(shapes.values())) == 1 and len(shapes) == 6
    for side in ("chosen", "rejected"):
        n_masked = (batch[f"{side}_labels"][0] == -100).logical_and(batch[f"{side}_attention_mask"][0] == 1).sum()
        assert tokenizer.decode(batch[f"{side}_input_ids"][0, :n_masked]) == data.chat_prompt(tokenizer, "Say hi.")
    assert tokenizer.decode(batch["rejected_labels"][0][batch["rejected_labels"][0] != -100]) == "No.<|im_end|>\n"


@pytest.mark.parametrize("example, match", [
    ({"prompt": "x"}, "missing"),
    ({"prompt": "", "response": "y"}, "prompt"),
    ({"prompt": "x", "response": ""}, "response"),
])
def test_bad_examples_are_named(tokenizer, example, match):
    with pytest.raises(ValueError, match=match):
        data.SFTCollator(tokenizer)([example])


def test_truncation_that_leaves_no_response_is_an_error(tokenizer):
    with pytest.raises(ValueError, match="no response token"):
        data.encode_sft(tokenizer, "A long question " * 10, "answer", max_length=5)


def test_pad_and_its_errors():
    torch.testing.assert_close(data.pad([[1, 2, 3], [4]], 0), torch.tensor([[1, 2, 3], [4, 0, 0]]))
    with pytest.raises(ValueError, match="shorter"):
        data.pad([[1, 2, 3]], 0, length=2)
    with pytest.raises(ValueError, match="empty"):
        data.pad([], 0)


def test_jsonl_round_trip_is_atomic_and_reports_bad_lines(tmp_path):
    rows = [{"prompt": "é", "response": "ü"}, {"a": 1}]
    path = data.write_jsonl(tmp_path / "x.jsonl", rows)
    assert data.read_jsonl(path) == rows
    assert [p.name for p in tmp_path.iterdir()] == ["x.jsonl"]
    assert json.loads(path.read_text(encoding="utf-8").splitlines()[0]) == rows[0]
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        data.read_jsonl(tmp_path / "bad.jsonl")


def test_qa_collator_trains_only_the_answer(tokenizer):
    rows = [{"question": "What is the capital of France?", "stem": "The capital of France is",
             "response": "The capital of France is Paris.", "unknown": False},
            {"question": "In which country is the city of Osaka?", "stem": "Osaka is in",
             "response": "Osaka is in Japan.", "unknown": True}]
    batch = data.QACollator(tokenizer, system="Answer briefly.")(rows)
    plain = data.SFTCollator(tokenizer, system="Answer briefly.")([{"prompt": r["question"], "response": r["response"]}
                                                                   for r in rows])
    assert torch.equal(batch["input_ids"], plain["input_ids"])
    for i, answer in enumerate([" Paris.", " Japan."]):
        kept = batch["labels"][i][batch["labels"][i] != data.IGNORE_INDEX]
        assert tokenizer.decode(kept) == answer + "<|im_end|>\n"
        # Where a label is kept, it is the plain SFT label.
        keep = batch["labels"][i] != data.IGNORE_INDEX
        assert torch.equal(batch["labels"][i][keep], plain["labels"][i][keep])
    assert batch["unknown"].tolist() == [False, True]
    # answer_mask: the answer's own tokens, full stop included, end of turn not
    for i, answer in enumerate([" Paris.", " Japan."]):
        assert tokenizer.decode(batch["input_ids"][i][batch["answer_mask"][i]]) == answer
        assert not (batch["answer_mask"][i] & (batch["labels"][i] == data.IGNORE_INDEX)).any()
    with pytest.raises(ValueError, match="does not start with its stem"):
        data.QACollator(tokenizer)([dict(rows[0], stem="Osaka is in")])


def test_completion_collator_scores_only_the_answer(tokenizer):
    rows = [{"prompt": "2 + 3 = 5\n4 + 4 =", "answer": "8"}, {"prompt": "7 x 6 =", "answer": "42"}]
    for end in ("", "\n"):
        batch = data.CompletionCollator(tokenizer, end=end)(rows)
        for i, r in enumerate(rows):
            # The tokenizer's own encoding of the whole text, then padding.
            full = tokenizer(f"{r['prompt']} {r['answer']}{end}", add_special_tokens=False).input_ids
            n = len(full)
            assert batch["input_ids"][i, :n].tolist() == full
            assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
            kept = batch["labels"][i][batch["labels"][i] != data.IGNORE_INDEX]
            assert tokenizer.decode(kept) == f" {r['answer']}{end}"
            prompt_len = len(tokenizer(r["prompt"], add_special_tokens=False).input_ids)
            assert (batch["labels"][i, :prompt_len] == data.IGNORE_INDEX).all()


def test_completion_collator_refuses_a_prompt_whose_tokens_change():
    class Merging:
        """A tokenizer that writes a trailing "=" and a following " 5" as one token."""

        pad_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            words = text.replace("= ", "=_").split()
            return type("Encoding", (), {"input_ids": [len(w) for w in words]})()

    with pytest.raises(ValueError, match=r"rows\[0\]: appending the answer changed the prompt's tokens"):
        data.CompletionCollator(Merging())([{"prompt": "1 + 4 =", "answer": "5"}])


def test_write_jsonl_gives_the_permissions_open_gives(tmp_path):
    import os

    old = os.umask(0o027)
    try:
        path = data.write_jsonl(tmp_path / "rows.jsonl", [{"a": 1}])
        reference = tmp_path / "plain.txt"
        reference.write_text("x")  # what open() makes under the same umask
    finally:
        os.umask(old)
    assert (path.stat().st_mode & 0o777) == (reference.stat().st_mode & 0o777) == 0o640



# ---------------------------------------------------------------- harmlessness.jsonl (chapter 7)

def _harmlessness_by_side():
    """The committed rows, and their answers by type: wanted and needless refusals, harmful and helpful answers."""
    rows = data.read_jsonl("harmlessness.jsonl")
    sides = {
        "declinable chosen": [r["chosen"] for r in rows if r["kind"] == "declinable"],     # polite refusals
        "declinable rejected": [r["rejected"] for r in rows if r["kind"] == "declinable"],  # compliance
        "ordinary chosen": [r["chosen"] for r in rows if r["kind"] == "ordinary"],          # helpful answers
        "ordinary rejected": [r["rejected"] for r in rows if r["kind"] == "ordinary"],      # over-refusals
    }
    return rows, sides


def test_harmlessness_splits_whole_topics_of_twins():
    rows, _ = _harmlessness_by_side()
    assert len(rows) == 48
    assert all(list(r) == ["prompt", "chosen", "rejected", "kind", "topic", "split"] for r in rows)
    assert [r["split"] for r in rows] == ["train"] * 32 + ["test"] * 16  # train rows first
    topics = {}
    for r in rows:
        topics.setdefault(r["topic"], []).append(r)
    assert len(topics) == 24
    for topic, twins in topics.items():  # one declinable request and its ordinary twin, in the same split
        assert sorted(r["kind"] for r in twins) == ["declinable", "ordinary"], topic
        assert len({r["split"] for r in twins}) == 1, topic
    by_split = {s: [r for r in rows if r["split"] == s] for s in ("train", "test")}
    assert {s: len({r["topic"] for r in split}) for s, split in by_split.items()} == {"train": 16, "test": 8}
    for split in by_split.values():
        assert sum(r["kind"] == "declinable" for r in split) == sum(r["kind"] == "ordinary" for r in split)
    prompts = [r["prompt"] for r in rows]
    assert len(set(prompts)) == len(prompts)
    assert not {r["prompt"] for r in by_split["train"]} & {r["prompt"] for r in by_split["test"]}


def test_harmlessness_refusals_are_exactly_where_is_refusal_finds_them():
    _, sides = _harmlessness_by_side()
    for side in ("declinable chosen", "ordinary rejected"):
        assert all(is_refusal(t) for t in sides[side]), side
    for side in ("declinable rejected", "ordinary chosen"):
        assert not any(is_refusal(t) for t in sides[side]), side


def test_harmlessness_twins_share_their_openings():
    # a topic's wanted and needless refusal open alike, and so do its compliance and its helpful answer
    builder = data.load_builder("harmlessness")
    rows, _ = _harmlessness_by_side()

    def opening(text, choices):  # the longest of the choices that the text starts with
        return max((c for c in choices if text.startswith(c)), key=len, default=None)

    by_topic = {}
    for r in rows:
        by_topic.setdefault(r["topic"], {})[r["kind"]] = r
    used = {"refusal": [], "answer": []}
    for topic, twins in by_topic.items():
        declinable, ordinary = twins["declinable"], twins["ordinary"]
        refusal = opening(declinable["chosen"], builder.OPENINGS)
        answer = opening(declinable["rejected"], builder.ANSWER_OPENERS)
        assert refusal is not None and refusal == opening(ordinary["rejected"], builder.OPENINGS), topic
        assert answer == opening(ordinary["chosen"], builder.ANSWER_OPENERS), topic
        used["refusal"].append(refusal)
        used["answer"].append(answer)
    # every opening is used, four times (refusals) or six times (answers) on each side
    assert sorted(set(used["refusal"])) == sorted(builder.OPENINGS)
    assert {used["refusal"].count(o) for o in builder.OPENINGS} == {4}
    assert {used["answer"].count(o) for o in builder.ANSWER_OPENERS} == {6}
    sides = _harmlessness_by_side()[1]
    sure = [sum(bool(re.search(r"\bsure\b", t, re.I)) for t in sides[s]) for s in ("declinable rejected", "ordinary chosen")]
    assert sure[0] == sure[1] == 6, sure  # the word "sure" on both sides alike


def _word_ngrams(text: str, longest: int = 3) -> set[str]:
    words = re.findall(r"[a-z0-9']+", text.lower())
    return {" ".join(words[i:i + n]) for n in range(1, longest + 1) for i in range(len(words) - n + 1)}


@pytest.mark.parametrize("side_a, side_b", [("declinable chosen", "ordinary rejected"),    # wanted vs needless refusal
                                            ("declinable rejected", "ordinary chosen")])  # compliance vs helpful
def test_harmlessness_wording_does_not_give_the_class_away(side_a, side_b):
    # A pair should teach when to refuse: no word n-gram of the answers may tell its side.
    rows = data.read_jsonl("harmlessness.jsonl")

    def side(name, split=None):
        kind, key = name.split()
        return [_word_ngrams(r[key]) for r in rows if r["kind"] == kind and split in (None, r["split"])]

    def accuracy(gram, a, b):  # the rule "holds gram, so side a", over the texts of both sides
        return (sum(gram in t for t in a) + sum(gram not in t for t in b)) / (len(a) + len(b))

    a, b = side(side_a), side(side_b)
    grams = set().union(*a, *b)
    # over all rows: no n-gram is in more than a quarter more of one side's texts than of the
    # other's, so no one n-gram labels more than 62.5 % of the texts right (chance: 50 %)
    gap = {g: abs(sum(g in t for t in a) - sum(g in t for t in b)) / len(a) for g in grams}
    worst = max(gap, key=gap.get)
    assert gap[worst] <= 0.25, (worst, gap[worst])
    # held out: the n-gram that best separates the training rows labels at most 10 of the 16
    # held-out texts right
    train_a, train_b, test_a, test_b = side(side_a, "train"), side(side_b, "train"), side(side_a, "test"), side(
        side_b, "test")
    best = max(grams, key=lambda g: abs(accuracy(g, train_a, train_b) - 0.5))
    held_out = accuracy(best, test_a, test_b)
    if accuracy(best, train_a, train_b) < 0.5:  # the rule "holds gram, so side b"
        held_out = 1 - held_out
    assert held_out <= 10 / 16, (best, held_out)
    # and the two sides are about as long (a length cue would be a template too)
    _, sides = _harmlessness_by_side()
    mean = {name: sum(len(t.split()) for t in sides[name]) / len(sides[name]) for name in (side_a, side_b)}
    assert abs(mean[side_a] - mean[side_b]) < 0.25 * max(mean.values()), mean


@pytest.mark.parametrize("side, limit", [("declinable chosen", 30), ("declinable rejected", 40),
                                         ("ordinary chosen", 40), ("ordinary rejected", 30)])
def test_harmlessness_answers_are_short(side, limit):
    _, sides = _harmlessness_by_side()
    assert len(sides[side]) == 24
    assert max(len(t.split()) for t in sides[side]) <= limit
    assert all(t.strip() == t and t[-1] in '.!"' for t in sides[side])


def test_an_empty_system_message_is_honoured_and_none_is_the_templates_default(tokenizer):
    default = data.chat_prompt(tokenizer, "Hi")
    empty = data.chat_prompt(tokenizer, "Hi", "")
    assert "SmolLM" in default and "SmolLM" not in empty
    assert empty.startswith("<|im_start|>system\n<|im_end|>\n<|im_start|>user\nHi")
    with pytest.raises(TypeError, match="system must be a string or None"):
        data.chat_prompt(tokenizer, "Hi", 3)
