"""Time llmbook.lora against PEFT's LoRA on the book's model, and compare peak memory.

Same model (SmolLM2-135M-Instruct), same batch (4 x 64 tokens), same LoRA config
(r=8, alpha=16 on q_proj and v_proj), same A and B in both. Prints one line per
measurement: what, ours, reference, ratio (ours / reference):

* forward latency, unmerged (ours / PEFT);
* training step time, AdamW (ours / PEFT);
* forward latency, merged (ours merged / PEFT merge_and_unload);
* ours unmerged / a merged model's forward (PEFT's merged model: the same plain layers);
* peak memory of two training steps, LoRA / full fine-tuning, each in a fresh process,
  counted above the loaded model (gradients, AdamW state, activations): CUDA's allocator
  peak on a GPU, the growth of the process's peak resident memory on a CPU.

Timings interleave ours and PEFT's runs (``llmbook.utils.time_interleaved``, the median of
REPEAT runs after WARMUP rounds) so that other load on the machine hits both alike.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import torch

from llmbook import lora, models
from llmbook.utils import peak_bytes, time_interleaved

R, ALPHA, TARGETS = 8, 16, ["q_proj", "v_proj"]
BATCH, LENGTH, REPEAT, WARMUP = 4, 64, 5, 1


def make_batch(model):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (BATCH, LENGTH), generator=gen).to(model.device)
    return {"input_ids": ids, "labels": ids}


def pair(base):
    """Our LoRA model and PEFT's on copies of ``base``, with identical non-zero A and B."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    ours = lora.apply_lora(copy.deepcopy(base), TARGETS, r=R, lora_alpha=ALPHA)
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS))
    for name, layer in ours.named_modules():
        if isinstance(layer, lora.LoRALinear):
            with torch.no_grad():
                layer.lora_B.weight.normal_(0, 0.01)
                peft_layer = theirs.base_model.model.get_submodule(name)
                peft_layer.lora_A["default"].weight.copy_(layer.lora_A.weight)
                peft_layer.lora_B["default"].weight.copy_(layer.lora_B.weight)
    return ours, theirs


def peak_memory_child(mode: str) -> None:
    """Two training steps in this process; print the peak memory they add, in bytes, as JSON."""
    model, _ = models.load_model()
    device = model.device
    if mode == "lora":
        lora.apply_lora(model, TARGETS, r=R, lora_alpha=ALPHA)
    else:
        model.requires_grad_(True)
    batch = make_batch(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    model.train()

    def two_steps():
        for _ in range(2):  # the second step has Adam's state allocated
            opt.zero_grad(set_to_none=True)
            model(**batch).loss.backward()
            opt.step()

    # What training adds on top of the loaded model: gradients, optimiser state, activations.
    peak = peak_bytes(two_steps, device)
    print(json.dumps({"peak": peak, "device": device.type}))


def peak_memory(mode: str) -> int:
    out = subprocess.run([sys.executable, __file__, "--peak-memory", mode], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak"]


def line(what, ours, ref, unit="ms"):
    scale = 1000 if unit == "ms" else 1 / 2**20
    print(f"{what}: ours {ours * scale:.1f} {unit}, reference {ref * scale:.1f} {unit}, ratio {ours / ref:.2f}")


def main():
    base, _ = models.load_model()
    device = base.device
    batch = make_batch(base)
    ours, theirs = pair(base)
    desc = f"({device.type}, batch {BATCH}x{LENGTH}, r={R} on q,v)"
    timing = dict(repeat=REPEAT, warmup=WARMUP, device=device)

    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, theirs(**batch).logits, rtol=1e-4, atol=1e-4)
        fwd = time_interleaved({"ours": lambda: ours(**batch), "peft": lambda: theirs(**batch)}, **timing)
    line(f"forward, unmerged {desc}", fwd["ours"], fwd["peft"])

    def step_fn(model):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

        def step():
            opt.zero_grad(set_to_none=True)
            model(**batch).loss.backward()
            opt.step()
        return step

    ours.train(), theirs.train()
    steps = time_interleaved({"ours": step_fn(ours), "peft": step_fn(theirs)}, **timing)
    ours.eval(), theirs.eval()
    line(f"training step {desc}", steps["ours"], steps["peft"])

    lora.merge_lora(ours)
    merged_peft = theirs.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, merged_peft(**batch).logits, rtol=1e-4, atol=1e-4)
        merged = time_interleaved({"ours": lambda: ours(**batch), "peft": lambda: merged_peft(**batch)}, **timing)
        lora.unmerge_lora(ours)
        # Unmerged against merged in one interleaved run (so load hits both alike). Ours can be
        # only one of the two at a time; PEFT's merged model has the same plain linear layers.
        mixed = time_interleaved({"unmerged": lambda: ours(**batch), "merged": lambda: merged_peft(**batch)},
                                 **timing)
    line(f"forward, merged (ours merge_lora / PEFT merge_and_unload) {desc}", merged["ours"], merged["peft"])
    line(f"forward, ours unmerged / a merged model (PEFT's, the same plain layers) {desc}",
         mixed["unmerged"], mixed["merged"])

    lora_peak, full_peak = peak_memory("lora"), peak_memory("full")
    line(f"peak memory of two training steps, LoRA / full fine-tuning {desc}", lora_peak, full_peak, unit="MiB")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--peak-memory":
        peak_memory_child(sys.argv[2])
    else:
        main()
