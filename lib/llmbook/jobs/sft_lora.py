"""Chapter 3's LoRA trained with chapter 2's SFT loss, by ``accelerate``: each process its slice.

    accelerate launch --config-file configs/accelerate/ddp.yaml -m llmbook.jobs.sft_lora --out r.pt

The model, LoRA's initialisation and the global batch are the same in every process (the
same seed); :func:`llmbook.distributed.shard` gives each its half; accelerate wraps the model
in DistributedDataParallel, which averages the gradients; the loss is normalised by the
global batch's response tokens (:func:`llmbook.jobs.common.summed_loss`), so the average is
the single process's gradient. Rank 0 saves the first step's averaged gradient, the
trained LoRA weights and the loss history. It runs DDP only: its loop (``llmbook.train``)
calls ``loss.backward()`` and ``optimizer.step()`` itself, which DeepSpeed's engine does not
accept through accelerate (it steps inside ``accelerator.backward``).
"""

from __future__ import annotations

import torch
from accelerate import Accelerator

from llmbook import data, distributed, train
from llmbook.jobs import common


def main() -> None:
    args = common.arguments(__doc__.splitlines()[0])
    distributed.init()  # before Accelerator, which then uses this process group
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    if accelerator.distributed_type.value not in ("NO", "MULTI_CPU", "MULTI_GPU"):
        raise SystemExit(f"llmbook.jobs.sft_lora runs data parallelism (DDP) only, not "
                         f"{accelerator.distributed_type.value}: use configs/accelerate/ddp.yaml")
    rank, world = accelerator.process_index, accelerator.num_processes
    model, tokenizer = common.lora_model(seed=0)
    mine = data.SFTCollator(tokenizer)(distributed.shard(common.global_batch(args.examples), rank, world))
    n_tokens = common.global_tokens(train.move_to(mine, distributed.device()))
    optimizer = torch.optim.AdamW(train.trainable_parameters(model), lr=common.LR, weight_decay=0.0)
    model, optimizer = accelerator.prepare(model.to(accelerator.device), optimizer)
    inner = accelerator.unwrap_model(model)
    first: dict[str, torch.Tensor] = {}

    def loss_fn(m, batch):
        return common.summed_loss(m, batch, n_tokens) * world

    def keep_first_gradient(step, metrics):  # after step 1's backward and all-reduce
        if step == 1:
            first.update(common.trainable_grads(inner))

    history = train.train(model, [mine], loss_fn, steps=args.steps, optimizer=optimizer, max_grad_norm=None,
                          progress=False, callback=keep_first_gradient)
    weights = {k: v.detach().cpu() for k, v in inner.state_dict().items() if "lora_" in k}
    # Each process logged its own share of the loss; their sum is the whole batch's loss.
    loss = accelerator.reduce(torch.tensor(history["loss"], device=accelerator.device) / world, reduction="sum")
    if accelerator.is_main_process:
        torch.save({"world_size": world, "wrapper": type(model).__name__, "lora": weights,
                    "first_gradient": train.move_to(first, torch.device("cpu")), "loss": loss.tolist(),
                    "n_tokens": n_tokens}, args.out)
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
