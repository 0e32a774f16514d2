"""Data parallelism by hand: each process its half of the batch, then one all-reduce.

    python -c "from llmbook import distributed; distributed.launch('llmbook.jobs.gradients', '--out', 'g.pt')"

Every process builds the same LoRA model (same seed) and takes its slice of the global
batch; the slices' response-token counts are added up with one all-reduce. Two losses are back-propagated, one after the other:

- ``mean``: each process's own mean over its response tokens, as a one-process script
  would write it; averaging these gradients weighs each process's tokens by
  1 / (its token count), not 1 / (the batch's);
- ``global``: the sum over its tokens divided by the global batch's token count, times the
  number of processes; averaging these gives the one-process gradient of the whole batch.

After each backward pass the gradients are averaged with ``all_reduce`` (a sum, then
divided by the number of processes), as DDP does. Rank 0 saves its own gradients before
the all-reduce and both averages, and how far each average is from the gradient it
computes alone on the whole batch afterwards (relative distance), with the backend used.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from llmbook import data, distributed, losses, train
from llmbook.jobs import common


def main() -> None:
    args = common.arguments(__doc__.splitlines()[0])
    rank, world = distributed.init()
    model, tokenizer = common.lora_model(seed=0)
    mine = data.SFTCollator(tokenizer)(distributed.shard(common.global_batch(args.examples), rank, world))
    mine = train.move_to(mine, distributed.device())
    n_tokens = common.global_tokens(mine)  # the whole batch's count, added up over the processes
    params = train.trainable_parameters(model)
    tokens = torch.tensor([common.response_tokens(mine)], device=distributed.device())
    counts = [torch.zeros_like(tokens) for _ in range(world)]
    dist.all_gather(counts, tokens)
    result = {"world_size": world, "n_tokens": n_tokens, "tokens_per_rank": [int(c) for c in counts],
              "backend": dist.get_backend(), "averaged": sum(p.numel() for p in params)}
    for name in ("mean", "global"):
        model.zero_grad(set_to_none=True)
        if name == "mean":
            logits = model(input_ids=mine["input_ids"], attention_mask=mine["attention_mask"]).logits
            loss = losses.sft_loss(logits, mine["labels"])
        else:
            loss = common.summed_loss(model, mine, n_tokens) * world
        loss.backward()
        if name == "mean":
            result["local"] = common.trainable_grads(model)  # this process's own, before any communication
        for p in params:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= world
        result[name] = common.trainable_grads(model)
    if rank == 0:  # one process on the whole batch, no communication: the reference
        model.zero_grad(set_to_none=True)
        whole = train.move_to(data.SFTCollator(tokenizer)(common.global_batch(args.examples)), distributed.device())
        logits = model(input_ids=whole["input_ids"], attention_mask=whole["attention_mask"]).logits
        losses.sft_loss(logits, whole["labels"]).backward()
        reference = torch.cat([g.flatten() for g in common.trainable_grads(model).values()])
        for name in ("mean", "global"):
            got = torch.cat([g.flatten() for g in result[name].values()])
            result[f"{name}_distance"] = float((got - reference).norm() / reference.norm())
        torch.save(train.move_to(result, torch.device("cpu")), args.out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
