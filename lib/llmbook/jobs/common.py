"""What the jobs share: the model, the global batch, the loss normalised over the global batch."""

from __future__ import annotations

import argparse

import torch

from llmbook import data, distributed, lora, losses, models
from llmbook.utils import seed_everything

GLOBAL_BATCH = 8  # examples per optimiser step, over all processes
LORA_TARGETS = ("q_proj", "v_proj")
LORA_R, LORA_ALPHA = 8, 16
LR = 1e-3


def arguments(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", required=True, help="rank 0 writes its result here (torch.save)")
    parser.add_argument("--steps", type=int, default=2, help="optimiser steps")
    parser.add_argument("--examples", type=int, default=GLOBAL_BATCH,
                        help="examples in the global batch (a multiple of the number of processes)")
    return parser.parse_args()


def global_batch(n: int = GLOBAL_BATCH) -> list[dict]:
    """The first ``n`` training examples of data/sft.jsonl: one global batch."""
    rows = [r for r in data.read_jsonl("sft.jsonl") if r["split"] == "train"]
    if not 1 <= n <= len(rows):
        raise ValueError(f"n must be in [1, {len(rows)}] training examples, got {n}")
    return rows[:n]


def response_tokens(batch: dict) -> int:
    """The number of positions that carry loss (labels other than -100, after the shift)."""
    return int((batch["labels"][:, 1:] != -100).sum())


def global_tokens(batch: dict) -> int:
    """The response tokens of all processes' slices together: one all-reduce of the counts.

    Each process sees only its own slice (as with a distributed sampler); the whole batch's
    count has to be added up across processes before any loss can be normalised by it.
    """
    import torch.distributed as dist

    count = torch.tensor([response_tokens(batch)], device=distributed.device())
    dist.all_reduce(count)
    return int(count)


def summed_loss(model, batch: dict, n_tokens: int) -> torch.Tensor:
    """Sum of the response tokens' negative log-probs, divided by the global batch's ``n_tokens``.

    Averaged over processes (as DDP averages gradients) it is the whole batch's mean loss
    times 1 / world size; each process therefore multiplies it by the world size itself.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps, _ = losses.per_token_logps(logits, batch["labels"])
    return -logps.sum() / n_tokens


def lora_model(seed: int = 0):
    """The default model with chapter 3's LoRA on q and v, its A matrices drawn from ``seed``."""
    model, tokenizer = models.load_model(device=distributed.device())
    seed_everything(seed)
    lora.apply_lora(model, LORA_TARGETS, r=LORA_R, lora_alpha=LORA_ALPHA)
    return model, tokenizer


def trainable_grads(model) -> dict[str, torch.Tensor]:
    """A copy of every trainable parameter's gradient, by name (a sharded one gathered whole)."""
    return {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
            for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
