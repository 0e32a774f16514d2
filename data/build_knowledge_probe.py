"""Build ``data/knowledge_probe.jsonl``: what SmolLM2-135M-Instruct knows of ``closed_book_qa.jsonl``.

Chapter 5 sorts its questions into the categories of Gekhman et al. (2024, section 3)
by probing the model before any fine-tuning: every question is asked under
``len(PROMPTS)`` four-shot prompts, each answered greedily and ``NUM_SAMPLES`` times at
temperature ``TEMPERATURE`` (``llmbook.hallucination.probe``). A prompt is a system
message holding an instruction and four worked examples, one line each, so an answer
ends at its first line break. The examples are true facts of the question set's kinds
(the capital of a region, the country of a city) that are not among its questions; no
example's place is a question's subject or a question's answer.

Each row is ``{"id", "greedy", "samples", "category"}``: the model's answers as written
(one greedy answer per prompt; ``NUM_SAMPLES`` samples per prompt, prompt after prompt)
and the category they give (``llmbook.hallucination.knowledge_category``, with
``is_correct`` and the question's aliases). ``tests/test_data_builders.py`` checks the
categories against the stored answers and draws the first batch again; chapter 5 does
the same on its sample.

Run ``python data/build_knowledge_probe.py`` to rewrite the file (about nine minutes on a
2-core CPU; it needs the book's model, see ``llmbook.models.load_model``).
"""

from __future__ import annotations

OUTPUT = "knowledge_probe.jsonl"
SEED = 0  # prompt k samples with a generator seeded SEED + k
NUM_SAMPLES = 4  # sampled answers per question and prompt
TEMPERATURE = 0.5  # the paper's
MAX_NEW_TOKENS = 12  # long enough for every gold answer after its stem, and a few words more
BATCH_SIZE = 16  # chapter 5 draws the first batch again: a small one is cheap

# (question, answer sentence): true facts of the question set's kinds, none of them a question
# of closed_book_qa.jsonl; the places they name are neither its subjects nor its answers (the
# countries are: they are the format of the city questions' answers).
EXAMPLES = [
    ("What is the capital of Manitoba?", "The capital of Manitoba is Winnipeg."),
    ("What is the capital of Tasmania?", "The capital of Tasmania is Hobart."),
    ("In which country is the city of Leipzig?", "Leipzig is in Germany."),
    ("In which country is the city of Nagasaki?", "Nagasaki is in Japan."),
    ("What is the capital of Saskatchewan?", "The capital of Saskatchewan is Regina."),
    ("What is the capital of Sicily?", "The capital of Sicily is Palermo."),
    ("In which country is the city of Mendoza?", "Mendoza is in Argentina."),
    ("In which country is the city of Tampere?", "Tampere is in Finland."),
    ("What is the capital of Nova Scotia?", "The capital of Nova Scotia is Halifax."),
    ("What is the capital of Sardinia?", "The capital of Sardinia is Cagliari."),
    ("In which country is the city of Eindhoven?", "Eindhoven is in the Netherlands."),
    ("In which country is the city of Aarhus?", "Aarhus is in Denmark."),
    ("What is the capital of Alberta?", "The capital of Alberta is Edmonton."),
    ("What is the capital of South Australia?", "The capital of South Australia is Adelaide."),
    ("In which country is the city of Puebla?", "Puebla is in Mexico."),
    ("In which country is the city of Graz?", "Graz is in Austria."),
    ("What is the capital of Corsica?", "The capital of Corsica is Ajaccio."),
    ("What is the capital of Prince Edward Island?", "The capital of Prince Edward Island is Charlottetown."),
    ("In which country is the city of Arequipa?", "Arequipa is in Peru."),
    ("In which country is the city of Daegu?", "Daegu is in South Korea."),
]
INSTRUCTIONS = [
    "Answer briefly.",
    "Reply in one short sentence.",
    "You are a geography quiz expert. Answer in a few words.",
    "Answer the question with a short sentence, as in the examples.",
    "Give the answer, nothing more.",
]


def prompts() -> list[str]:
    """The probe's system messages: instruction k and worked examples 4k to 4k + 3."""
    messages = []
    for k, instruction in enumerate(INSTRUCTIONS):
        shots = EXAMPLES[4 * k: 4 * k + 4]
        worked = "\n\n".join(f"Question: {q}\nAnswer: {a}" for q, a in shots)
        messages.append(f"{instruction} For example:\n\n{worked}")
    return messages


PROMPTS = prompts()


def probe(model, tokenizer, rows: list[dict]) -> list[dict]:
    """The rows of the file for ``rows`` (``closed_book_qa.jsonl`` rows), in their order."""
    from llmbook.hallucination import probe as run_probe

    probed = run_probe(model, tokenizer, rows, systems=PROMPTS, num_samples=NUM_SAMPLES,
                       temperature=TEMPERATURE, max_new_tokens=MAX_NEW_TOKENS, batch_size=BATCH_SIZE,
                       seed=SEED, stop_at_newline=True)
    return [{"id": r["id"], "greedy": r["greedy"], "samples": r["samples"], "category": r["category"]}
            for r in probed]


def build(model=None, tokenizer=None) -> list[dict]:
    """The probe of every question of ``closed_book_qa.jsonl``."""
    from llmbook.data import read_jsonl

    if model is None:
        from llmbook.models import load_model

        model, tokenizer = load_model(device="cpu", dtype="float32")
    return probe(model, tokenizer, read_jsonl("closed_book_qa.jsonl"))


if __name__ == "__main__":  # data/build.py writes the file
    from build import main

    main([__file__])
