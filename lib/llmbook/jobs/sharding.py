"""DDP and FSDP2 on the same full fine-tuning: what each process holds, and where both end.

    python -c "from llmbook import distributed; distributed.launch('llmbook.jobs.sharding', '--out', 's.pt')"

All weights of the model train (no LoRA), with AdamW, on each process's half of the global
batch, the loss normalised over the whole batch, without gradient clipping (so that a
wrongly scaled gradient would show). First with DistributedDataParallel: every
process holds all the weights, all the gradients and all of Adam's state. Then, from the
same starting weights, with FSDP2 (``fully_shard`` on each decoder layer, then on the
model): each process keeps a shard (1 / number of processes) of each, gathers a layer's
weights for its forward and backward, and reduce-scatters the gradients. Rank 0 saves what
each process held after the last step, the loss per step, how far each run's first
gradient is from one process's gradient of the whole batch (computed by rank 0 alone
before the runs), and how far FSDP2's update of the weights is from DDP's.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from llmbook import data, distributed, models, train
from llmbook.jobs import common

LR = 1e-5


def _run(model, wrap: str, batch: dict, n_tokens: int, steps: int, world: int):
    if wrap == "ddp":
        wrapped = DistributedDataParallel(model)
    else:
        for layer in model.model.layers:
            fully_shard(layer)
        wrapped = fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    first: dict[str, torch.Tensor] = {}

    def loss_fn(m, b):
        return common.summed_loss(m, b, n_tokens) * world

    def keep_first_gradient(step, metrics):  # averaged (DDP) or reduce-scattered (FSDP2), gathered whole
        if step == 1:
            first.update(common.trainable_grads(model))

    history = train.train(wrapped, [batch], loss_fn, steps=steps, optimizer=optimizer, max_grad_norm=None,
                          progress=False, callback=keep_first_gradient)
    held = distributed.held_bytes(model, optimizer)
    losses = torch.tensor(history["loss"], device=distributed.device()) / world
    dist.all_reduce(losses)  # each logged its own share: the sum is the whole batch's loss
    everyone = [None] * world
    dist.all_gather_object(everyone, held)
    return everyone, losses.tolist(), first


def _full(model) -> dict[str, torch.Tensor]:
    """Every weight, whole (an FSDP2 shard is gathered from all processes)."""
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters()}


def _distance(a: dict, b: dict) -> float:
    """||a - b|| / ||b|| over all tensors together."""
    apart = sum(float((a[n] - b[n]).double().pow(2).sum()) for n in b)
    size = sum(float(b[n].double().pow(2).sum()) for n in b)
    return (apart / size) ** 0.5


def main() -> None:
    args = common.arguments(__doc__.splitlines()[0])
    rank, world = distributed.init()
    device = distributed.device()
    model, tokenizer = models.load_model(device=device)
    collate = data.SFTCollator(tokenizer)
    rows = common.global_batch(args.examples)
    mine = train.move_to(collate(distributed.shard(rows, rank, world)), device)
    n_tokens = common.global_tokens(mine)
    result = {"world_size": world, "n_params": sum(p.numel() for p in model.parameters())}
    reference = {}
    if rank == 0:  # one process on the whole batch, no communication: the reference gradient
        common.summed_loss(model, train.move_to(collate(rows), device), n_tokens).backward()
        reference = common.trainable_grads(model)
        model.zero_grad(set_to_none=True)
    dist.barrier()
    start = _full(model)
    result["ddp_held"], result["ddp_loss"], ddp_first = _run(model, "ddp", mine, n_tokens, args.steps, world)
    ddp_end = _full(model)
    model, _ = models.load_model(device=device)  # the same starting weights again
    result["fsdp_held"], result["fsdp_loss"], fsdp_first = _run(model, "fsdp", mine, n_tokens, args.steps, world)
    fsdp_end = _full(model)
    if rank == 0:
        moved = {n: ddp_end[n] - start[n] for n in start}
        result.update(
            ddp_gradient=_distance(ddp_first, reference), fsdp_gradient=_distance(fsdp_first, reference),
            moved_norm=sum(float(v.double().pow(2).sum()) for v in moved.values()) ** 0.5,
            apart=_distance({n: fsdp_end[n] - start[n] for n in start}, moved),
            apart_max=max(float((fsdp_end[n] - ddp_end[n]).abs().max()) for n in start))
        torch.save(result, args.out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
