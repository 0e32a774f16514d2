"""Time one reward-model training step of llmbook against TRL's RewardTrainer, same batch, same settings.

SmolLM2-135M-Instruct in fp32 on the best device with a scalar head ``score`` read at the
last token (ours: ``llmbook.rewards.RewardModel``; TRL: transformers'
``LlamaForSequenceClassification`` with one label and the same decoder weights), the head
started from the same weights on both, LoRA r=8 (alpha 16) on q_proj and v_proj (ours:
``llmbook.lora``; TRL: PEFT, whose ``SEQ_CLS`` task trains the head with the adapters),
4 preference pairs from ``data/preferences.jsonl`` per step (prompt and answer in the chat
template, tokenised once by ``llmbook.data.encode_sft``: both train on the same token ids),
the Bradley–Terry loss without margin or centring term, AdamW at a constant learning rate,
gradient clipping at 1.0, gradient checkpointing off on both.

Each side runs in its own process, so its peak memory is its own: on CUDA the peak
allocated by torch above what it held before the timed steps. A step's time is the median
of STEPS steps after WARMUP untimed ones (``llmbook.utils.time_interleaved``): ours is one
call of ``llmbook.train.train(..., steps=1)`` with an optimiser kept across calls, TRL's
is one step of its ``trainer.train()``, from ``on_step_begin`` to ``on_step_end``
(``trl_steps.TRLSteps``). Prints one line per measurement: ours, TRL's, and the ratio
ours / TRL (below 1 is better for us), then how far our loss is from TRL's on an
identical batch. No memory line on the CPU: a step's tensors are small enough that the
allocator keeps the memory of the warm-up steps and reuses it, so the peak resident set
the timed steps add is a few MiB on both sides and says nothing.
"""

from __future__ import annotations

import json
import sys
import tempfile

import torch

from trl_steps import TRLSteps, child_result, time_steps

WARMUP, STEPS, PAIRS, LR = 2, 4, 4, 1e-4
LORA = dict(r=8, lora_alpha=16)
TARGETS = ["q_proj", "v_proj"]
HEAD_STD = 0.02  # transformers' initializer_range, with which LlamaForSequenceClassification draws its head


def _examples():
    from llmbook import data

    return [r for r in data.read_jsonl("preferences.jsonl") if r["split"] == "train"][:PAIRS]


def _head_weight(hidden: int) -> torch.Tensor:
    """The score head both sides start from: ``(1, hidden)``, normal with std HEAD_STD, seed 0."""
    return torch.empty(1, hidden).normal_(std=HEAD_STD, generator=torch.Generator().manual_seed(0))


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def run_ours() -> dict:
    from llmbook import data, lora, models, rewards
    from llmbook.train import train, trainable_parameters

    torch.manual_seed(0)
    model, tokenizer = models.load_model(dtype="float32")
    lora.apply_lora(model, TARGETS, **LORA)
    rm = rewards.RewardModel(model)
    with torch.no_grad():
        rm.score.weight.copy_(_head_weight(model.config.hidden_size))
    batch = data.PreferenceCollator(tokenizer)(_examples())  # padded on the right to one length, as TRL's collator
    batch = {k: v.to(model.device) for k, v in batch.items() if not k.endswith("_labels")}
    optimizer = torch.optim.AdamW(trainable_parameters(rm), lr=LR, weight_decay=0.0)  # train()'s default
    result = time_steps(lambda: train(rm, [batch], rewards.compute_loss, steps=1, optimizer=optimizer,
                                      progress=False),
                        model.device, warmup=WARMUP, steps=STEPS)
    result["trainable"] = _trainable(rm)
    result["loss_diff"] = _loss_against_trl(rm, tokenizer, batch)
    return result


def _loss_against_trl(rm, tokenizer, batch) -> float:
    """|ours - TRL| of the loss, on the trained reward model and one batch."""
    import copy

    from llmbook import rewards

    rm.eval()
    with torch.no_grad():
        ours = rewards.compute_loss(rm, batch)[0].item()
    trained = copy.deepcopy(rm)  # our LoRA layers inside, so no PEFT on TRL's side here
    classifier = _classifier(trained.backbone, trained.score.weight)
    trainer = _trl_trainer(classifier, tokenizer, steps=1)
    inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(PAIRS)])
    inputs = {k: v.to(rm.score.weight.device) for k, v in inputs.items()}
    same = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    if not torch.equal(inputs["input_ids"], same):
        raise RuntimeError("TRL's collator built other token ids than ours")
    trainer.model.train()
    with torch.no_grad():
        theirs = trainer.compute_loss(trainer.model, inputs).item()
    return abs(ours - theirs)


def _classifier(causal_lm, head: torch.Tensor):
    """transformers' LlamaForSequenceClassification (one label) on ``causal_lm``'s decoder, with head ``head``."""
    from transformers import LlamaForSequenceClassification

    config = causal_lm.config.__class__(**{**causal_lm.config.to_dict(), "num_labels": 1})
    classifier = LlamaForSequenceClassification(config)
    classifier.model = causal_lm.model  # the same decoder (its vocabulary head is not used)
    with torch.no_grad():
        classifier.score.weight.copy_(head)
    return classifier.to(causal_lm.device)


def _trl_trainer(model, tokenizer, steps=WARMUP + STEPS, peft=False):
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    from llmbook import data

    # tokenised already (TRL then skips its own tokenising): the ids ours trains on
    rows = [{f"{side}_ids": data.encode_sft(tokenizer, e["prompt"], e[side])["input_ids"]
             for side in ("chosen", "rejected")} for e in _examples()]
    args = RewardConfig(
        output_dir=tempfile.mkdtemp(), report_to=[], use_cpu=model.device.type == "cpu",
        bf16=False, gradient_checkpointing=False,  # fp32 and no checkpointing, as ours
        per_device_train_batch_size=PAIRS, max_steps=steps, learning_rate=LR, lr_scheduler_type="constant",
        max_grad_norm=1.0, center_rewards_coefficient=None, logging_steps=1, save_strategy="no",
        disable_tqdm=True, dataloader_drop_last=False,
    )
    peft_config = None
    if peft:
        from peft import LoraConfig

        # SEQ_CLS adds the head ``score`` to modules_to_save: it trains with the adapters, as ours
        peft_config = LoraConfig(task_type="SEQ_CLS", target_modules=TARGETS, lora_dropout=0.0, **LORA)
    return RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=peft_config)


def run_trl() -> dict:
    from llmbook import models

    torch.manual_seed(0)
    model, tokenizer = models.load_model(dtype="float32")
    trainer = _trl_trainer(_classifier(model, _head_weight(model.config.hidden_size)), tokenizer, peft=True)
    steps = TRLSteps(trainer)
    result = time_steps(steps, model.device, steps.ready, warmup=WARMUP, steps=STEPS)
    steps.close()
    result["trainable"] = _trainable(trainer.model)
    return result


def _child(which: str) -> dict:
    return child_result(__file__, which)


def main():
    from llmbook.models import pick_device

    device = pick_device().type
    ours, trl = _child("ours"), _child("trl")
    if ours["trainable"] != trl["trainable"]:
        raise RuntimeError(f"the two train different parameters: ours {ours['trainable']}, TRL {trl['trainable']}")
    what = f"{device}, {PAIRS} pairs, LoRA r=8 q/v and the head"
    print(f"Reward-model step time ({what}): ours {ours['seconds']:.3f} s, TRL {trl['seconds']:.3f} s, "
          f"ratio {ours['seconds'] / trl['seconds']:.2f}")
    if device == "cuda":
        print(f"Reward-model step peak memory ({device}): ours {ours['peak_mib']:.0f} MiB, "
              f"TRL {trl['peak_mib']:.0f} MiB, ratio {ours['peak_mib'] / trl['peak_mib']:.2f}")
    print(f"Reward-model loss on one batch: |ours - TRL| = {ours['loss_diff']:.1e}")


if __name__ == "__main__":
    if len(sys.argv) == 2:
        print(json.dumps({"ours": run_ours, "trl": run_trl}[sys.argv[1]]()))
    else:
        main()
