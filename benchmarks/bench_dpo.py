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
import subprocess
import sys
import tempfile
import threading

import torch

from llmbook.utils import peak_memory_since, peak_memory_start, time_interleaved

WARMUP, STEPS, PAIRS, BETA, LR = 2, 4, 4, 0.1, 1e-4
LORA = dict(r=8, lora_alpha=16)
TARGETS = ["q_proj", "v_proj"]


def _examples():
    from llmbook import data

    return [r for r in data.read_jsonl("preferences.jsonl") if r["split"] == "train"][:PAIRS]


def time_steps(step, device, ready=lambda: None) -> dict:
    """WARMUP untimed calls of ``step``, then the median seconds of STEPS more and the peak
    memory (MiB) they add. ``step`` is called exactly WARMUP + STEPS times, each time after
    ``ready()`` (untimed, and harmless to call twice) returns."""
    for _ in range(WARMUP):
        ready()
        step()
    ready()
    start = peak_memory_start(device)
    seconds = time_interleaved({"step": step}, setup={"step": ready}, repeat=STEPS, warmup=0, device=device)
    return {"seconds": seconds["step"], "peak_mib": peak_memory_since(device, start) / 2**20}


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
                        model.device)
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


class TRLSteps:
    """One optimiser step of ``trainer.train()`` per call, so it can be timed like any callable.

    ``trainer.train()`` runs in a thread of its own, which a callback holds at both ends of
    every step: at ``on_step_begin`` (the step's batch loaded) until the step is called,
    and at ``on_step_end`` until :meth:`ready` is called. A call therefore covers what TRL
    runs between those two events (forward, backward, clipping, the optimiser and
    scheduler steps), as a callback timing them would, and nothing else runs while the
    caller reads a clock or the peak memory; :meth:`ready` (untimed) lets the trainer log
    the step and load the next batch. Call ``ready()`` before each step, ``max_steps``
    steps in all, then :meth:`close`.
    """

    def __init__(self, trainer):
        from transformers import TrainerCallback

        self._held = threading.Event()  # the trainer waits at a step's beginning, or has ended
        self._go, self._ended, self._resume = (threading.Semaphore(0) for _ in range(3))
        self._at_end, self._finished, self._failed = False, False, []
        outer = self

        class HoldAtBothEnds(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                outer._held.set()
                outer._go.acquire()

            def on_step_end(self, args, state, control, **kwargs):
                outer._ended.release()
                outer._resume.acquire()

        def run():
            try:
                trainer.train()
            except BaseException as error:  # re-raised in the calling thread
                self._failed.append(error)
            finally:  # wake a ready() or a step waiting for a step that will not come
                self._finished = True
                self._held.set()
                self._ended.release()

        trainer.add_callback(HoldAtBothEnds())
        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def _raise_if_failed(self):
        if self._failed:
            raise RuntimeError("TRL's training failed") from self._failed[0]

    def ready(self) -> None:
        """Let the trainer finish the last step and wait until it holds at the next one (untimed)."""
        if self._at_end:
            self._at_end = False
            self._resume.release()
        self._held.wait()

    def __call__(self) -> None:
        if self._at_end or not self._held.is_set():
            raise RuntimeError("call ready() before each step")
        self._raise_if_failed()
        if self._finished:
            raise RuntimeError("TRL's training has ended: more steps than max_steps")
        self._held.clear()
        self._go.release()
        self._ended.acquire()
        self._at_end = True
        self._raise_if_failed()

    def close(self) -> None:
        """Let ``trainer.train()`` finish, and wait for it."""
        self.ready()
        self._thread.join()
        self._raise_if_failed()


def run_trl(precompute: bool) -> dict:
    from llmbook import models

    torch.manual_seed(0)
    model, tokenizer = models.load_model(dtype="float32")
    steps = TRLSteps(_trl_trainer(model, tokenizer, precompute, peft=True))
    result = time_steps(steps, model.device, steps.ready)
    steps.close()
    return result


def _child(which: str, precompute: bool) -> dict:
    out = subprocess.run([sys.executable, __file__, which, str(int(precompute))], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{which} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


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
