"""Time llmbook.sampling.generate against transformers' generate: seconds per new token.

The real model (SmolLM2-135M-Instruct), one chat prompt, 64 new tokens (the story is
longer, so neither stops early), the same settings for both: nucleus sampling
(T = 0.8, top-p = 0.9, no top-k) and greedy. Both produce the same tokens (checked
first, which also warms up both). Then REPEAT rounds time one run of each, alternating
which goes first (``llmbook.utils.time_interleaved``), and the fastest run of each is
reported (``statistic="min"``: on a shared machine the least disturbed run is the
closest to the true cost), with the ratio ours / transformers.
"""

import torch

from llmbook import data, models
from llmbook.sampling import generate
from llmbook.utils import time_interleaved

NEW_TOKENS, REPEAT = 64, 4
SETTINGS = {
    "sampling T=0.8 top_p=0.9": dict(temperature=0.8, top_p=0.9),
    "greedy": dict(temperature=0.0),
}


def main():
    model, tokenizer = models.load_model()
    prompt = data.chat_prompt(tokenizer, "Write a short story about a lighthouse keeper.")
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids.to(model.device)

    for name, settings in SETTINGS.items():
        temperature = settings["temperature"]
        hf_settings = (dict(do_sample=False) if temperature == 0 else
                       dict(do_sample=True, temperature=temperature, top_p=settings["top_p"], top_k=0))

        def ours():
            return generate(model, ids, max_new_tokens=NEW_TOKENS, **settings)

        def theirs():
            return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                  pad_token_id=tokenizer.pad_token_id, **hf_settings)

        torch.manual_seed(0)
        a = ours()
        torch.manual_seed(0)
        b = theirs()
        assert torch.equal(a, b), "both must produce the same tokens"
        assert a.shape[1] == ids.shape[1] + NEW_TOKENS, "the story must not end before 64 tokens"
        # warmed up by the check above; seconds per new token
        seconds = time_interleaved({"ours": ours, "transformers": theirs}, repeat=REPEAT, warmup=0,
                                   device=model.device, statistic="min")
        mine, ref = seconds["ours"] / NEW_TOKENS, seconds["transformers"] / NEW_TOKENS
        print(f"generate {NEW_TOKENS} tokens, {name} ({model.device.type}): ours {mine * 1000:.1f} ms/token, "
              f"transformers {ref * 1000:.1f} ms/token, ratio {mine / ref:.2f}")


if __name__ == "__main__":
    main()
