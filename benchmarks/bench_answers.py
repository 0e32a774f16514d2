"""Time llmbook.sampling.generate_answers with its shared prefix against encoding every prompt whole.

The real model (SmolLM2-135M-Instruct) answers 32 short questions, 16 per batch, with the
chat template's own system message, greedily and 8 new tokens at most, as the chapters ask
for short answers. Every prompt starts with the same tokens (the template's header and
the system message); ``generate_answers`` encodes them once and continues every row from
that cache (``share_prefix=True``), where the reference encodes each prompt whole
(``share_prefix=False``, and transformers' ``generate`` on the same left-padded batches).
All three give the same answers (checked first, which also warms them up). Then REPEAT
rounds time one run of each in turns (``llmbook.utils.time_interleaved``), and the fastest
run of each is reported, with the ratio ours / reference.
"""

import torch
from llmbook import data, models
from llmbook.sampling import generate_answers, left_pad
from llmbook.utils import time_interleaved

COUNTRIES = ["France", "Japan", "Kenya", "Peru", "Norway", "Egypt", "Canada", "India", "Chile", "Spain",
             "Ghana", "Italy", "Nepal", "Cuba", "Iran", "Mali"]
QUESTIONS = ([f"What is the capital of {c}?" for c in COUNTRIES]
             + [f"Which language do most people in {c} speak?" for c in COUNTRIES])
NEW_TOKENS, BATCH, REPEAT = 8, 16, 3


def main():
    model, tokenizer = models.load_model()
    texts = [data.chat_prompt(tokenizer, q) for q in QUESTIONS]
    encoded = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    shared = next(i for i in range(len(encoded[0])) if len({row[i] for row in encoded}) > 1)
    mean_len = sum(map(len, encoded)) / len(encoded)

    def ours():
        return generate_answers(model, tokenizer, QUESTIONS, max_new_tokens=NEW_TOKENS, batch_size=BATCH).greedy

    def whole():
        return generate_answers(model, tokenizer, QUESTIONS, max_new_tokens=NEW_TOKENS, batch_size=BATCH,
                                share_prefix=False).greedy

    def theirs():
        answers = []
        for start in range(0, len(encoded), BATCH):
            ids, mask = left_pad(encoded[start:start + BATCH], tokenizer.pad_token_id, device=model.device)
            out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            answers += [a.strip() for a in tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)]
        return answers

    with torch.no_grad():
        first = ours()
        assert first == whole() == theirs(), "the three must give the same answers"
    seconds = time_interleaved({"ours": ours, "whole": whole, "transformers": theirs}, repeat=REPEAT, warmup=0,
                               device=model.device, statistic="min")
    what = (f"answers to {len(QUESTIONS)} prompts ({model.device.type}, {shared} of {mean_len:.0f} prompt tokens "
            f"shared, greedy, {NEW_TOKENS} new tokens, batch {BATCH})")
    for name, label in (("whole", "every prompt encoded whole"), ("transformers", "transformers generate")):
        print(f"{what}, shared prefix / {label}: ours {seconds['ours']:.2f} s, {label} {seconds[name]:.2f} s, "
              f"ratio {seconds['ours'] / seconds[name]:.2f}")


if __name__ == "__main__":
    main()
