"""Time llmbook.prefix on the real model: the prefix's forward cost, and a training step against PEFT's.

SmolLM2-135M-Instruct, batch 4 x 64 tokens, 20 virtual tokens. Three measurements:

* forward (no grad) with the prefix / the base model's forward: what the 20 extra keys
  and values cost in every layer;
* one training step (forward, backward, AdamW) of ours / PEFT's prefix tuning, without
  the MLP reparameterisation;
* the same with the MLP (hidden width 512).

Ours and PEFT's wrap the same base model, and their steps alternate within one loop,
so a change in the machine's load hits both alike. Each line prints the median time of
ours, of the reference, and their ratio (ours / reference).
"""

import statistics
import time
import warnings

import torch
from peft import PrefixTuningConfig, get_peft_model

from llmbook import models, prefix

BATCH, LENGTH, N_VIRTUAL, PROJECTION = 4, 64, 20, 512
ROUNDS, WARMUP = 6, 1


def seconds(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def alternate(fns, device, rounds=ROUNDS, warmup=WARMUP):
    """Median seconds of each function, run in turn round after round (the first ``warmup`` rounds dropped).

    The order flips every round, so neither function always runs right after the other.
    """
    times = [[] for _ in fns]
    for r in range(warmup + rounds):
        order = list(range(len(fns)))[:: 1 if r % 2 == 0 else -1]
        for i in order:
            t = seconds(fns[i], device)
            if r >= warmup:
                times[i].append(t)
    return [statistics.median(column) for column in times]


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

    ours = prefix.PrefixTuningModel(base, N_VIRTUAL)
    with torch.no_grad():
        fwd_ours, fwd_base = alternate([lambda: ours(ids), lambda: base(ids)], device)
    report(f"forward with prefix / base forward ({where})", fwd_ours, fwd_base, "base")

    for projection in (None, PROJECTION):
        config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N_VIRTUAL,
                                    prefix_projection=projection is not None, encoder_hidden_size=projection)
        theirs = get_peft_model(base, config)           # wraps the same frozen base model
        ours = prefix.PrefixTuningModel(base, N_VIRTUAL, projection_dim=projection)
        ours.encoder.load_state_dict(theirs.prompt_encoder["default"].state_dict())
        assert ours.num_parameters_trainable() == theirs.get_nb_trainable_parameters()[0]
        steps = []
        for model in (ours, theirs):
            model.train()
            params = [p for p in model.parameters() if p.requires_grad]
            steps.append(train_step(model, batch, torch.optim.AdamW(params, lr=1e-3)))
        step_ours, step_peft = alternate(steps, device)
        label = "no MLP" if projection is None else f"MLP d'={projection}"
        report(f"train step ours / PEFT ({where}, {label})", step_ours, step_peft, "PEFT")


if __name__ == "__main__":
    main()
