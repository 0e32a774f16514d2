"""Time one GRPO training step of llmbook against TRL's GRPOTrainer, same work, same settings.

SmolLM2-135M-Instruct in fp32 on the best device, LoRA r=8 (alpha 16) on q_proj and v_proj
(ours: ``llmbook.lora``; TRL: PEFT), 4 training prompts of ``data/arithmetic_rl.jsonl``
per step with G = 8 completions each (32), sampled at temperature 1 for at most 4 new
tokens (ending at the tokenizer's end of turn, TRL's default), the reward "first line is
the answer", group-scaled advantages, the GRPO loss with beta 0.04 (the reference is the
model with its adapters off, as TRL does with PEFT), one update per batch, AdamW,
gradient clipping at 1.0, gradient checkpointing off on both.

A step is everything between two optimiser steps: sampling, rewards, advantages, the
reference's and the policy's log-probabilities, backward, clipping and the optimiser step.
Ours is one call of ``llmbook.train.train(..., steps=1)`` whose batch comes from a stream
that samples with ``llmbook.grpo.rollout``; TRL's is one step of its ``trainer.train()``
(generation happens inside its step), from ``on_step_begin`` to ``on_step_end``
(``trl_steps.TRLSteps``). Each side runs in its own process. The time is the median of
STEPS steps after WARMUP untimed ones. Prints ours, TRL's, and the ratio ours / TRL
(below 1 is better for us). No memory line: the warm-up steps already reach the peak that
sampling needs, so the peak added by the timed steps says nothing here.
"""

from __future__ import annotations

import functools
import json
import sys
import tempfile

import torch

from trl_steps import TRLSteps, child_result, time_steps

WARMUP, STEPS, PROMPTS, G, MAX_NEW, BETA, LR = 2, 5, 4, 8, 4, 0.04, 1e-5
LORA = dict(r=8, lora_alpha=16)
TARGETS = ["q_proj", "v_proj"]


def _rows():
    from llmbook import data

    return [r for r in data.read_jsonl("arithmetic_rl.jsonl") if r["split"] == "train"]


def reward(completion: str, answer: str) -> float:
    return float(completion.split("\n")[0].strip() == answer)


def run_ours() -> dict:
    from llmbook import grpo, lora, models, sampling
    from llmbook.train import train, trainable_parameters

    torch.manual_seed(0)
    model, tokenizer = models.load_model(dtype="float32")
    lora.apply_lora(model, TARGETS, **LORA)
    rows = _rows()
    generator = torch.Generator(device=model.device).manual_seed(0)

    def stream():
        for start in range(0, len(rows), PROMPTS):
            chunk = rows[start:start + PROMPTS]
            ids, mask = sampling.left_pad([tokenizer(r["prompt"]).input_ids for r in chunk],
                                          tokenizer.pad_token_id, device=model.device)
            batch = grpo.rollout(model, ids, mask, num_generations=G, max_new_tokens=MAX_NEW,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                 generator=generator)
            texts = tokenizer.batch_decode(batch["completion_ids"], skip_special_tokens=True)
            batch["rewards"] = torch.tensor([reward(t, chunk[i // G]["answer"]) for i, t in enumerate(texts)])
            batch["advantages"] = grpo.group_advantages(batch["rewards"], G)
            with lora.disable_lora(model), torch.no_grad():
                batch["ref_per_token_logps"] = grpo.completion_logps(model, batch)
            yield batch

    batches = stream()
    loss_fn = functools.partial(grpo.compute_loss, beta=BETA)
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=LR, weight_decay=0.0)  # train()'s default

    def step():  # the batch is sampled inside the step, as TRL's is
        train(model, [next(batches)], loss_fn, steps=1, optimizer=optimizer, progress=False)

    return time_steps(step, model.device, warmup=WARMUP, steps=STEPS)


def run_trl() -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    from llmbook import models

    torch.manual_seed(0)
    model, tokenizer = models.load_model(dtype="float32")
    dataset = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in _rows()])

    def trl_reward(completions, answer, **kwargs):
        return [reward(c, a) for c, a in zip(completions, answer)]

    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(), report_to=[], use_cpu=model.device.type == "cpu", bf16=False,
        gradient_checkpointing=False, per_device_train_batch_size=PROMPTS * G, num_generations=G,
        max_completion_length=MAX_NEW, temperature=1.0, top_p=1.0, top_k=0, beta=BETA, loss_type="grpo",
        learning_rate=LR, lr_scheduler_type="constant", max_grad_norm=1.0, max_steps=WARMUP + STEPS,
        logging_steps=1, save_strategy="no", disable_tqdm=True, shuffle_dataset=False, seed=0,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=trl_reward, args=args, train_dataset=dataset,
                          processing_class=tokenizer,
                          peft_config=LoraConfig(target_modules=TARGETS, lora_dropout=0.0, **LORA))
    steps = TRLSteps(trainer)
    result = time_steps(steps, model.device, steps.ready, warmup=WARMUP, steps=STEPS)
    steps.close()
    return result


def _child(which: str) -> dict:
    return child_result(__file__, which)


def main():
    from llmbook.models import pick_device

    device = pick_device().type
    ours, trl = _child("ours"), _child("trl")
    what = f"{device}, {PROMPTS} prompts x G={G}, {MAX_NEW} new tokens, LoRA r=8 q/v, beta {BETA}"
    print(f"GRPO step time ({what}): ours {ours['seconds']:.3f} s, TRL {trl['seconds']:.3f} s, "
          f"ratio {ours['seconds'] / trl['seconds']:.2f}")


if __name__ == "__main__":
    if len(sys.argv) == 2:
        print(json.dumps({"ours": run_ours, "trl": run_trl}[sys.argv[1]]()))
    else:
        main()
