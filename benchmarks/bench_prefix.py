"""Time llmbook.prefix on the real model: the prefix's forward cost, and a training step against PEFT's.

SmolLM2-135M-Instruct, batch 4 x 64 tokens, 20 virtual tokens. Three measurements:

* forward (no grad) with the prefix / the base model's forward: what the 20 extra keys
  and values cost in every layer;
* one training step (forward, backward, AdamW) of ours / PEFT's prefix tuning, without
  the MLP reparameterisation;
* the same with the MLP (hidden width 512).

Ours and PEFT's wrap the same base model, and their steps alternate within one loop
(``llmbook.utils.time_interleaved``: ROUNDS timed rounds after WARMUP, the order flipped
every round), so a change in the machine's load hits both alike. Each line prints the
median time of ours, of the reference, and their ratio (ours / reference).
"""

import warnings

import torch
from peft import PrefixTuningConfig, get_peft_model

from llmbook import models, prefix
from llmbook.utils import time_interleaved

BATCH, LENGTH, N_VIRTUAL, PROJECTION = 4, 64, 20, 512
ROUNDS, WARMUP = 6, 1


def report(what, ours, reference, ref_name):
    print(f"{what}: ours {ours * 1000:.0f} ms, {ref_name} {reference * 1000:.0f} ms, ratio {ours / reference:.3f}",
          flush=True)


def train_step(model, batch, optimizer):
    def step():
        optimizer.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        optimizer.step()
    return step


def main():
    warnings.filterwarnings("ignore", message="`past_key_values` is deprecated")
    torch.manual_seed(0)
    base, _ = models.load_model()
    device = base.device
    ids = torch.randint(0, base.config.vocab_size, (BATCH, LENGTH), device=device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    where = f"{device.type}, batch {BATCH}x{LENGTH}, {N_VIRTUAL} virtual tokens"
    timing = dict(repeat=ROUNDS, warmup=WARMUP, device=device)

    ours = prefix.PrefixTuningModel(base, N_VIRTUAL)
    with torch.no_grad():
        fwd = time_interleaved({"ours": lambda: ours(ids), "base": lambda: base(ids)}, **timing)
    report(f"forward with prefix / base forward ({where})", fwd["ours"], fwd["base"], "base")

    for projection in (None, PROJECTION):
        config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N_VIRTUAL,
                                    prefix_projection=projection is not None, encoder_hidden_size=projection)
        theirs = get_peft_model(base, config)           # wraps the same frozen base model
        ours = prefix.PrefixTuningModel(base, N_VIRTUAL, projection_dim=projection)
        ours.encoder.load_state_dict(theirs.prompt_encoder["default"].state_dict())
        assert ours.num_parameters_trainable() == theirs.get_nb_trainable_parameters()[0]
        steps = {}
        for name, model in (("ours", ours), ("peft", theirs)):
            model.train()
            params = [p for p in model.parameters() if p.requires_grad]
            steps[name] = train_step(model, batch, torch.optim.AdamW(params, lr=1e-3))
        step = time_interleaved(steps, **timing)
        label = "no MLP" if projection is None else f"MLP d'={projection}"
        report(f"train step ours / PEFT ({where}, {label})", step["ours"], step["peft"], "PEFT")


if __name__ == "__main__":
    main()
