"""One small training loop for every chapter.

Each chapter differs only in what it trains and which loss it uses, so the loop takes
the loss as a function ``loss_fn(model, batch)`` returning either a scalar tensor or
``(loss, metrics)`` where ``metrics`` is a dict of numbers to log (DPO's
``rewards/margins``, say). Everything else is shared: moving batches to the model's
device, gradient accumulation, clipping, an AdamW optimizer over the trainable
parameters, a progress bar, and a :class:`History` of every metric at every step.

A loss that is NaN or infinite stops training with an error that names the step,
rather than silently poisoning the weights.

When only the top ``k`` decoder layers train, the layers below compute the same hidden
states for a batch at every step. The book's one way to skip them: train the copy
:func:`llmbook.models.top_layers` ``(model, k)`` on batches of
:func:`llmbook.models.top_layer_inputs` (computed once per batch), and write ``loss_fn``
for a batch that holds ``inputs_embeds`` instead of ``input_ids``. It pays when batches
come back (several epochs, several runs on one set); a batch seen once costs the same
either way (chapter 2 trains so, on the whole model).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping

import torch

from llmbook._checks import check_int, check_real
from llmbook.utils import progress as show_progress

__all__ = ["History", "move_to", "train", "trainable_parameters"]


class History(dict):
    """Metric name -> list of values, one per optimiser step (``history["loss"]``).

    Always has ``step`` (1-based), ``loss``, ``lr``, ``grad_norm`` and ``seconds``
    (wall time of the step).
    """

    def log(self, **metrics: float) -> None:
        n = len(self.get("step", []))
        for key, value in metrics.items():
            try:
                value = float(value)
            except (TypeError, ValueError, RuntimeError):
                raise TypeError(f"metric {key!r} must be a number (or a one-element tensor), got {value!r:.60}") \
                    from None
            column = self.setdefault(key, [math.nan] * n)
            column.append(value)
        for column in self.values():  # keep every column as long as "step"
            if len(column) < n + 1:
                column.append(math.nan)

    def _column(self, key: str) -> list[float]:
        if not self.get("step"):
            raise ValueError(f"the history is empty (no step logged yet), so it has no {key!r} to read")
        if key not in self:
            raise KeyError(f"key {key!r} is not a metric of this history; it has {sorted(self)}")
        return self[key]

    def last(self, key: str = "loss") -> float:
        """The value of ``key`` at the last step."""
        return self._column(key)[-1]

    def mean(self, key: str = "loss", last: int | None = None) -> float:
        """The mean of ``key`` over every step, or over the ``last`` steps (an integer >= 1).

        Steps at which ``key`` was not logged (NaN in its column) are left out."""
        values = self._column(key)
        if last is not None:
            values = values[-check_int(last, "last", minimum=1):]
        values = [v for v in values if not math.isnan(v)]
        if not values:
            raise ValueError(f"{key!r} was not logged at any of these steps")
        return sum(values) / len(values)


def move_to(batch, device: torch.device):
    """Move every tensor in a (nested) dict, list or tuple to ``device``."""
    if not isinstance(device, (torch.device, str)):
        raise TypeError(f"device must be a torch.device or a string such as 'cpu', got {device!r}")
    if isinstance(device, str):
        try:
            device = torch.device(device)
        except RuntimeError:
            raise ValueError(f"device must be a device torch knows ('cpu', 'cuda', 'cuda:0', 'mps'), got "
                             f"{device!r}") from None
    if torch.is_tensor(batch):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {key: move_to(value, device) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(value, device) for value in batch)
    return batch


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters of ``model`` that have ``requires_grad``."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return [p for p in model.parameters() if p.requires_grad]


def _cycle(batches: Iterable):
    """Yield batches forever, restarting the iterable (and any shuffling) when it ends."""
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            raise ValueError("batches is empty: pass at least one batch")


def train(
    model: torch.nn.Module,
    batches: Iterable,
    loss_fn: Callable,
    *,
    steps: int,
    lr: float = 1e-4,
    optimizer: torch.optim.Optimizer | None = None,
    warmup_steps: int = 0,
    grad_accum_steps: int = 1,
    max_grad_norm: float | None = 1.0,
    progress: bool = True,
    callback: Callable[[int, dict], bool | None] | None = None,
) -> History:
    """Train ``model`` for ``steps`` optimiser steps and return the history of metrics.

    Args:
        model: the module to train; only parameters with ``requires_grad`` change.
        batches: an iterable of batches (a list, or a DataLoader), cycled as needed.
        loss_fn: ``loss_fn(model, batch) -> loss`` or ``-> (loss, {name: value})``;
            the batch arrives already on the model's device.
        steps: number of optimiser steps (each sees ``grad_accum_steps`` batches).
        lr: peak learning rate of the default optimiser, AdamW without weight decay.
        optimizer: use this optimiser instead of the default.
        warmup_steps: linear warm-up from 0 to ``lr`` over this many steps, then constant.
        grad_accum_steps: batches whose gradients are averaged into one step.
        max_grad_norm: clip the global gradient norm to this; ``None`` to not clip.
        progress: show a progress bar (:func:`llmbook.utils.progress`, on standard error).
        callback: called after each step as ``callback(step, metrics)`` with the step's
            logged metrics; if it returns ``True``, training stops there (early stopping,
            evaluation or checkpoints between steps).

    Returns:
        a :class:`History`.
    """
    steps = check_int(steps, "steps", minimum=1)
    grad_accum_steps = check_int(grad_accum_steps, "grad_accum_steps", minimum=1)
    lr = check_real(lr, "lr", low=0.0, low_open=True)
    warmup_steps = check_int(warmup_steps, "warmup_steps", minimum=0)
    if max_grad_norm is not None:  # 0 would zero every gradient, a negative norm flip them
        max_grad_norm = check_real(max_grad_norm, "max_grad_norm", low=0.0, low_open=True)
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable as callback(step, metrics), got {type(callback).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(model, batch), got {type(loss_fn).__name__}")
    if torch.is_tensor(batches) or isinstance(batches, (Mapping, str, bytes)) or not isinstance(batches, Iterable):
        raise TypeError(f"batches must be an iterable of batches (a list or a DataLoader), got "
                        f"{type(batches).__name__}" + ("; wrap one batch as [batch]" if isinstance(
                            batches, Mapping) or torch.is_tensor(batches) else ""))
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer (or None for AdamW), got {type(optimizer).__name__}")
    params = trainable_parameters(model)
    if not params:
        raise ValueError("model has no trainable parameters (every parameter has requires_grad=False)")
    if optimizer is None:
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    device = next(iter(params)).device

    history = History()
    stream = _cycle(batches)
    was_training = model.training
    model.train()
    bar = show_progress(range(1, steps + 1), desc="train", disable=not progress)
    try:
        for step in bar:
            start = time.perf_counter()
            factor = min(1.0, step / warmup_steps) if warmup_steps else 1.0
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base * factor
            optimizer.zero_grad(set_to_none=True)
            sums: dict[str, float] = {}
            for _ in range(grad_accum_steps):
                out = loss_fn(model, move_to(next(stream), device))
                loss, metrics = out if isinstance(out, tuple) else (out, {})
                if not torch.is_tensor(loss):
                    raise TypeError(f"loss_fn must return the loss as a tensor (or (loss, metrics)), got "
                                    f"{type(loss).__name__}: a number has no gradient to train with")
                if loss.dim() != 0:
                    raise ValueError(f"loss_fn must return a scalar loss, got shape {tuple(loss.shape)}")
                if not loss.requires_grad:
                    raise ValueError("loss_fn's loss has no gradient: it was computed under torch.no_grad, or from "
                                     "no trainable parameter (check requires_grad)")
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"loss became {loss.item()} at step {step}: lower lr (now {lr}) or check the data"
                    )
                (loss / grad_accum_steps).backward()
                for key, value in {"loss": loss, **metrics}.items():
                    value = value.item() if torch.is_tensor(value) else float(value)
                    sums[key] = sums.get(key, 0.0) + value / grad_accum_steps
            if max_grad_norm is not None:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            else:
                grad_norm = torch.linalg.vector_norm(
                    torch.stack([p.grad.detach().norm() for p in params if p.grad is not None])
                )
            if not torch.isfinite(grad_norm):  # the step would write NaN into the weights
                raise FloatingPointError(f"the gradient norm became {float(grad_norm)} at step {step} (the loss was "
                                         "finite): the loss_fn has a NaN or infinite gradient; no step was taken")
            optimizer.step()
            history.log(
                step=step,
                **sums,
                lr=optimizer.param_groups[0]["lr"],
                grad_norm=float(grad_norm),
                seconds=time.perf_counter() - start,
            )
            bar.set_postfix(loss=f"{sums['loss']:.4f}", refresh=False)  # redrawn at most every 2 s
            if callback is not None and callback(step, {k: v[-1] for k, v in history.items()}):
                break
    finally:
        bar.close()
        model.train(was_training)
    return history
