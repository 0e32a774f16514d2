"""Time one DPO training step of llmbook against TRL's DPOTrainer, same batch, same settings.

SmolLM2-135M-Instruct in fp32 on the best device, LoRA r=8 (alpha 16) on q_proj and
v_proj, 4 preference pairs from ``data/preferences.jsonl`` per step, beta 0.1, AdamW,
gradient clipping at 1.0, gradient checkpointing off on both. The reference is the
model with its adapters switched off, computed in the step (TRL's default with PEFT);
then both again with the reference log-probabilities precomputed once
(TRL's ``precompute_ref_log_probs=True``).

Each configuration runs in its own process, so its peak memory is its own: on CUDA the
peak allocated by torch, on the CPU the peak resident set (``VmHWM``, reset before the
steps) above what the process held before them. A step's time is the median of STEPS
steps after WARMUP untimed ones (``llmbook.utils.time_interleaved``): ours is one call of
``llmbook.train.train(..., steps=1)`` with an optimiser kept across calls, TRL's is one
step of its ``trainer.train()``, from ``on_step_begin`` to ``on_step_end`` (see
:class:`TRLSteps`). Prints one line per measurement: ours, TRL's, and the ratio
ours / TRL (below 1 is better for us), then how far our four reward metrics are from
TRL's on an identical batch.
"""

from __future__ import annotations

import json
import sys
import tempfile

import torch

from trl_steps import TRLSteps, child_result, time_steps

WARMUP, STEPS, PAIRS, BETA, LR = 2, 4, 4, 0.1, 1e-4
LORA = dict(r=8, lora_alpha=16)
TARGETS = ["q_proj", "v_proj"]


def _examples():
    from llmbook import data

    return [r for r in data.read_jsonl("preferences.jsonl") if r["split"] == "train"][:PAIRS]


def run_ours(precompute: bool) -> dict:
    import functools

    from llmbook import data, dpo, lora, models
    from llmbook.train import train, trainable_parameters

    torch.manual_seed(0)
    model, tokenizer = models.load_model(dtype="float32")
    lora.apply_lora(model, TARGETS, **LORA)
    batch = data.PreferenceCollator(tokenizer)(_examples())
    batch = {k: v.to(model.device) for k, v in batch.items()}
    if precompute:
        [batch] = dpo.with_reference_logps(model, [batch])
    loss_fn = functools.partial(dpo.compute_loss, beta=BETA)
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=LR, weight_decay=0.0)  # train()'s default
    result = time_steps(lambda: train(model, [batch], loss_fn, steps=1, optimizer=optimizer, progress=False),
                        model.device, warmup=WARMUP, steps=STEPS)
    if not precompute:
        result["metric_diff"] = _metrics_against_trl(model, tokenizer, batch)
    return result


def _metrics_against_trl(model, tokenizer, batch) -> float:
    """Largest |ours - TRL| over the four metrics, on the trained policy and one batch."""
    import copy

    from llmbook import dpo

    model.eval()
    with torch.no_grad():
        ours = dpo.compute_loss(model, batch, beta=BETA)[1]
    trainer = _trl_trainer(copy.deepcopy(model), tokenizer, precompute=False, ref_model=_reference_model(), steps=1)
    inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(PAIRS)])
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    trainer.model.train()
    with torch.no_grad():
        trainer.compute_loss(trainer.model, inputs)
    theirs = {k: v[-1] for k, v in trainer._metrics["train"].items() if k.startswith("rewards/")}
    return max(abs(ours[k] - theirs[k]) for k in ours)


def _reference_model():
    """A separate frozen model equal to the policy with its adapters off: the base model,
    loaded again (LoRA training changes only the adapters)."""
    from llmbook import models

    ref, _ = models.load_model(dtype="float32")
    return ref.requires_grad_(False).eval()


def _trl_trainer(model, tokenizer, precompute, ref_model=None, steps=WARMUP + STEPS, peft=False):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    rows = [{"prompt": [{"role": "user", "content": e["prompt"]}],
             "chosen": [{"role": "assistant", "content": e["chosen"]}],
             "rejected": [{"role": "assistant", "content": e["rejected"]}]} for e in _examples()]
    args = DPOConfig(
        output_dir=tempfile.mkdtemp(), report_to=[], use_cpu=model.device.type == "cpu",
        bf16=False, gradient_checkpointing=False,  # fp32 and no checkpointing, as ours
        per_device_train_batch_size=PAIRS, max_steps=steps, learning_rate=LR, lr_scheduler_type="constant",
        max_grad_norm=1.0, beta=BETA, logging_steps=1, save_strategy="no", disable_tqdm=True,
        precompute_ref_log_probs=precompute, dataloader_drop_last=False,
    )
    peft_config = None
    if peft:
        from peft import LoraConfig

        peft_config = LoraConfig(target_modules=TARGETS, lora_dropout=0.0, **LORA)
    return DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=Dataset.from_list(rows),
                      processing_class=tokenizer, peft_config=peft_config)


def run_trl(precompute: bool) -> dict:
    from llmbook import models

    torch.manual_seed(0)
    model, tokenizer = models.load_model(dtype="float32")
    steps = TRLSteps(_trl_trainer(model, tokenizer, precompute, peft=True))
    result = time_steps(steps, model.device, steps.ready, warmup=WARMUP, steps=STEPS)
    steps.close()
    return result


def _child(which: str, precompute: bool) -> dict:
    return child_result(__file__, which, str(int(precompute)))


def main():
    from llmbook.models import pick_device

    device = pick_device().type
    for precompute in (False, True):
        ours, trl = _child("ours", precompute), _child("trl", precompute)
        what = "reference precomputed" if precompute else "reference in the step"
        print(f"DPO step time ({device}, {PAIRS} pairs, LoRA r=8 q/v, {what}): ours {ours['seconds']:.3f} s, "
              f"TRL {trl['seconds']:.3f} s, ratio {ours['seconds'] / trl['seconds']:.2f}")
        print(f"DPO step peak memory ({device}, {what}): ours {ours['peak_mib']:.0f} MiB, "
              f"TRL {trl['peak_mib']:.0f} MiB, ratio {ours['peak_mib'] / trl['peak_mib']:.2f}")
        if "metric_diff" in ours:
            print(f"DPO reward metrics on one batch: max |ours - TRL| = {ours['metric_diff']:.1e} (four metrics)")


if __name__ == "__main__":
    if len(sys.argv) == 3:
        runner = {"ours": run_ours, "trl": run_trl}[sys.argv[1]]
        print(json.dumps(runner(bool(int(sys.argv[2])))))
    else:
        main()
