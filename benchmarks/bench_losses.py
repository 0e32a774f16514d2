"""Chunked SFT loss against the full-logits path: time and peak memory of forward + backward.

Shape of SmolLM2-135M's LM head: 2048 scored tokens, hidden size 576, vocabulary 49152,
float32. The reference is what a model does by default: the full ``[tokens x V]``
logits ``hidden @ W.T``, then ``F.cross_entropy``. Ours is
``llmbook.losses.chunked_sft_loss``. Each variant runs in a fresh process of its own,
so one variant's freed memory cannot hide the other's peak. Peak memory is the growth
of the process's resident memory during one forward + backward (on CUDA: the
allocator's peak); time is the median of a few runs. The parent process also checks
that both give the same loss and gradients.

Prints one line per measurement: what, ours, reference, ratio (ours / reference).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from llmbook.losses import chunked_sft_loss
from llmbook.models import pick_device
from llmbook.utils import peak_bytes, time_call

TOKENS, HIDDEN, VOCAB = 2048, 576, 49152
CHUNK = 256
REPEAT, WARMUP = 3, 0  # the first (memory) run already warms up


def make_inputs(device, seed: int = 0):
    """Hidden states of T + 1 positions (T scored after the shift), the head's weight, labels."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(1, TOKENS + 1, HIDDEN, generator=g).to(device).requires_grad_()
    weight = (torch.randn(VOCAB, HIDDEN, generator=g) * 0.05).to(device).requires_grad_()
    labels = torch.randint(0, VOCAB, (1, TOKENS + 1), generator=g).to(device)
    return hidden, weight, labels


def naive_loss(hidden, weight, labels):
    logits = hidden[:, :-1] @ weight.T                                   # (1, T, V): all logits at once
    return F.cross_entropy(logits.float().reshape(-1, VOCAB), labels[:, 1:].reshape(-1))


def ours_loss(hidden, weight, labels):
    return chunked_sft_loss(hidden, weight, labels, chunk_size=CHUNK)


VARIANTS = {"naive": naive_loss, "chunked": ours_loss}


def child(variant: str) -> None:
    """Measure one variant in this (fresh) process; print a JSON line."""
    torch.manual_seed(0)
    device = pick_device()
    hidden, weight, labels = make_inputs(device)
    loss_fn = VARIANTS[variant]

    def step():
        hidden.grad = weight.grad = None
        loss_fn(hidden, weight, labels).backward()

    peak = peak_bytes(step, device)  # the first run: nothing freed earlier can be reused
    seconds = time_call(step, repeat=REPEAT, warmup=WARMUP, device=device)
    print(json.dumps({"variant": variant, "peak_bytes": peak, "seconds": seconds}))


def run_child(variant: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", variant], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def check_same(device) -> tuple[float, float]:
    """Relative error of the loss and the largest gradient difference, chunked vs naive."""
    results = {}
    for name, loss_fn in VARIANTS.items():
        hidden, weight, labels = make_inputs(device)
        loss = loss_fn(hidden, weight, labels)
        loss.backward()
        results[name] = (loss.detach(), hidden.grad, weight.grad)
    (l_ours, gh_ours, gw_ours), (l_ref, gh_ref, gw_ref) = results["chunked"], results["naive"]
    rel = ((l_ours - l_ref).abs() / l_ref.abs()).item()
    grad = max((gh_ours - gh_ref).abs().max().item(), (gw_ours - gw_ref).abs().max().item())
    return rel, grad


def main() -> None:
    device = pick_device()
    start = time.perf_counter()
    naive, ours = run_child("naive"), run_child("chunked")
    rel, grad = check_same(device)
    shape = f"{TOKENS} tokens x V {VOCAB}, H {HIDDEN}, {device.type}, chunk {CHUNK}"
    mib = 2**20
    print(f"peak memory fwd+bwd ({shape}): chunked_sft_loss {ours['peak_bytes'] / mib:.0f} MiB, "
          f"full logits + F.cross_entropy {naive['peak_bytes'] / mib:.0f} MiB, "
          f"ratio {ours['peak_bytes'] / naive['peak_bytes']:.3f}")
    print(f"time fwd+bwd ({shape}): chunked_sft_loss {ours['seconds'] * 1000:.0f} ms, "
          f"full logits + F.cross_entropy {naive['seconds'] * 1000:.0f} ms, "
          f"ratio {ours['seconds'] / naive['seconds']:.3f}")
    print(f"agreement: loss relative error {rel:.1e}, max |grad difference| {grad:.1e} "
          f"(hidden and weight); benchmark took {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    child(args.child) if args.child else main()
