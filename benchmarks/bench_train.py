"""Time one optimiser step of llmbook.train against a plain PyTorch loop, same work.

The real model (SmolLM2-135M-Instruct) with only its last decoder layer trainable,
batch 4 x 64 tokens, AdamW, gradient clipping at 1.0. Prints the median step time of
each and their ratio (ours / plain); the loop's bookkeeping should cost next to nothing.
"""

import time

import torch

from llmbook import models
from llmbook.train import train

STEPS, WARMUP = 6, 2


def main():
    torch.manual_seed(0)
    model, _ = models.load_model()
    model.requires_grad_(False)
    model.model.layers[-1].requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    ids = torch.randint(0, model.config.vocab_size, (4, 64), device=model.device)
    batch = {"input_ids": ids, "labels": ids}

    def loss_fn(model, batch):
        return model(**batch).loss

    hist = train(model, [batch], loss_fn, steps=STEPS + WARMUP, lr=1e-5, progress=False)
    ours = sorted(hist["seconds"][WARMUP:])[STEPS // 2]

    opt = torch.optim.AdamW(params, lr=1e-5)
    model.train()
    times = []
    for _ in range(STEPS + WARMUP):
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if model.device.type == "cuda":  # llmbook.train waits for the step when it reads the loss
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    plain = sorted(times[WARMUP:])[STEPS // 2]
    print(f"train step ({model.device.type}, batch 4x64, last layer trainable): "
          f"llmbook.train {ours * 1000:.0f} ms, plain torch loop {plain * 1000:.0f} ms, ratio {ours / plain:.2f}")


if __name__ == "__main__":
    main()
