"""Time the two places where rows share their first tokens and the book runs them once.

**Answers.** The real model (SmolLM2-135M-Instruct) answers 32 short questions, 16 per batch, with the
chat template's own system message, greedily and 8 new tokens at most, as the chapters ask
for short answers. Every prompt starts with the same tokens (the template's header and
the system message); ``generate_answers`` encodes them once and continues every row from
that cache (``share_prefix=True``), where the reference encodes each prompt whole
(``share_prefix=False``, and transformers' ``generate`` on the same left-padded batches).
All three give the same answers (checked first, which also warms them up). Then REPEAT
rounds time one run of each in turns (``llmbook.utils.time_interleaved``), and the fastest
run of each is reported, with the ratio ours / reference.

**GRPO scoring.** A GRPO batch repeats each prompt for its G completions; ``grpo.rollout``
marks the batch ``shared_prefix = (P, G)`` and the loss runs each prompt through the model
once per group. One forward and backward of ``grpo.compute_loss`` (beta 0.04, LoRA r=8 on
every projection of the top 2 layers, a top-layers copy fed the recorded hidden states,
as chapter 8 trains) on 4 prompts x G=8 completions, with the key and without it (every
row whole): the same loss (checked), and the time of each, as above.
"""

import functools

import torch
from llmbook import data, grpo, lora, models
from llmbook.sampling import generate_answers, left_pad
from llmbook.utils import time_interleaved

COUNTRIES = ["France", "Japan", "Kenya", "Peru", "Norway", "Egypt", "Canada", "India", "Chile", "Spain",
             "Ghana", "Italy", "Nepal", "Cuba", "Iran", "Mali"]
QUESTIONS = ([f"What is the capital of {c}?" for c in COUNTRIES]
             + [f"Which language do most people in {c} speak?" for c in COUNTRIES])
NEW_TOKENS, BATCH, REPEAT = 8, 16, 3
PROMPTS, G, MAX_NEW, TOP = 4, 8, 8, 2


def main():
    model, tokenizer = models.load_model()
    answers(model, tokenizer)
    grpo_scoring(model, tokenizer)


def answers(model, tokenizer):
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


def grpo_scoring(model, tokenizer):
    rows = [r for r in data.read_jsonl("arithmetic_rl.jsonl") if r["split"] == "train"][:PROMPTS]
    names = [f"self_attn.{p}_proj" for p in "qkvo"] + [f"mlp.{p}_proj" for p in ("gate", "up", "down")]
    L = model.config.num_hidden_layers
    lora.apply_lora(model, [f"model.layers.{i}.{n}" for i in range(L - TOP, L) for n in names], r=8, lora_alpha=16)
    top = models.top_layers(model, TOP, share=True)
    texts = [data.chat_prompt(tokenizer, r["prompt"]) for r in rows]
    ids, mask = left_pad([tokenizer(t, add_special_tokens=False).input_ids for t in texts], tokenizer.pad_token_id,
                         device=model.device)
    batch = grpo.rollout(model, ids, mask, num_generations=G, max_new_tokens=MAX_NEW, eos_token_id=[],
                         generator=torch.Generator(device=model.device).manual_seed(0), top_layers=TOP)
    batch["rewards"] = torch.arange(PROMPTS * G, dtype=torch.float32) % 3  # any spread: advantages not all 0
    batch["advantages"] = grpo.group_advantages(batch["rewards"], G)
    with lora.disable_lora(top), torch.no_grad():
        batch["ref_per_token_logps"] = grpo.completion_logps(top, batch)
    whole = {k: v for k, v in batch.items() if k != "shared_prefix"}
    loss = functools.partial(grpo.compute_loss, beta=0.04)

    def step(b):
        value, _ = loss(top, b)
        value.backward()
        top.zero_grad(set_to_none=True)
        return value.item()

    assert abs(step(batch) - step(whole)) < 1e-6, "the same loss"
    seconds = time_interleaved({"ours": lambda: step(batch), "whole": lambda: step(whole)}, repeat=5, warmup=1,
                               device=model.device)
    P, C = batch["prompt_ids"].shape[1], batch["completion_ids"].shape[1]
    print(f"GRPO loss forward + backward ({model.device.type}, {PROMPTS} prompts x G={G}, prompt {P} + "
          f"completion {C} tokens, top {TOP} layers, LoRA r=8), prompt once per group / every row whole: "
          f"ours {seconds['ours'] * 1000:.0f} ms, whole rows {seconds['whole'] * 1000:.0f} ms, "
          f"ratio {seconds['ours'] / seconds['whole']:.2f}")


if __name__ == "__main__":
    main()
