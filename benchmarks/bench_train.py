"""Time one optimiser step of llmbook.train against a plain PyTorch loop, same work.

The real model (SmolLM2-135M-Instruct) with only its last decoder layer trainable,
batch 4 x 64 tokens, AdamW, gradient clipping at 1.0. Ours is one call of
``llmbook.train.train(..., steps=1)`` with an optimiser kept across calls; the reference
is the same step written as a plain loop body. The two alternate
(``llmbook.utils.time_interleaved``: STEPS timed rounds after WARMUP), so a change in
the machine's load hits both alike. Prints the median step time of each and their ratio
(ours / plain); the loop's bookkeeping should cost next to nothing.
"""

import torch

from llmbook import models
from llmbook.train import train, trainable_parameters
from llmbook.utils import time_interleaved

STEPS, WARMUP, LR = 6, 2, 1e-5


def main():
    torch.manual_seed(0)
    model, _ = models.load_model()
    model.requires_grad_(False)
    model.model.layers[-1].requires_grad_(True)
    params = trainable_parameters(model)
    ids = torch.randint(0, model.config.vocab_size, (4, 64), device=model.device)
    batch = {"input_ids": ids, "labels": ids}

    def loss_fn(model, batch):
        return model(**batch).loss

    ours_opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)  # train()'s own default optimiser

    def ours():
        train(model, [batch], loss_fn, steps=1, optimizer=ours_opt, progress=False)

    plain_opt = torch.optim.AdamW(params, lr=LR)

    def plain():
        plain_opt.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        plain_opt.step()

    model.train()
    seconds = time_interleaved({"ours": ours, "plain": plain}, repeat=STEPS, warmup=WARMUP, device=model.device)
    print(f"train step ({model.device.type}, batch 4x64, last layer trainable): "
          f"llmbook.train {seconds['ours'] * 1000:.0f} ms, plain torch loop {seconds['plain'] * 1000:.0f} ms, "
          f"ratio {seconds['ours'] / seconds['plain']:.2f}")


if __name__ == "__main__":
    main()
