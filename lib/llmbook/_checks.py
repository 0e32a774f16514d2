"""Argument checks shared by every public function of ``llmbook`` (private).

Each check is one line at the top of a public function, so the function's first lines
read as its equation and a bad argument fails with a ``TypeError`` (wrong kind of value)
or a ``ValueError`` (right kind, outside the allowed range) that names the argument and
says what is allowed, instead of a NaN or an error from deep inside torch.

A number may be given as a Python number, a NumPy scalar (``np.int64(4)``,
``np.float32(0.5)``) or a 0-d tensor or array (``torch.tensor(0.5)``), since readers
compute settings with all three; the checks return a plain ``int`` or ``float``.
``bool`` is never a number here, and an integer must be an integer type: ``2.0`` is
not a rank.
"""

from __future__ import annotations

import inspect
import math
from numbers import Integral, Real

import numpy as np
import torch

__all__ = ["accepts_keyword", "keep_logits", "check_bool", "check_float_tensor", "check_generator", "check_int", "check_int_tensor", "check_real", "check_tensor"]


def _scalar(value, name: str, kind: str):
    """The Python scalar inside a 0-d tensor or array; other values unchanged."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        if value.ndim != 0:
            raise TypeError(f"{name} must be {kind} (a 0-d tensor at most), got a {type(value).__name__} "
                            f"of shape {tuple(value.shape)}")
        if isinstance(value, torch.Tensor):
            if value.dtype == torch.bool or value.is_complex():
                raise TypeError(f"{name} must be {kind}, got a 0-d tensor of dtype {value.dtype}")
            return value.item()
        return value.item()  # a NumPy 0-d array: its element as a Python scalar
    return value


def _range_text(low, high, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high:g}"
    return "finite"


def check_int(value, name: str, *, minimum: int | None = None, maximum: int | None = None,
              hint: str = "") -> int:
    """``value`` as an ``int``, or a ``TypeError``/``ValueError`` naming ``name``.

    Args:
        value: an ``int``, a NumPy integer, or a 0-d integer tensor or array.
        name: the argument's name, as the caller's signature spells it.
        minimum, maximum: the allowed range, both ends included (``None``: unbounded).
        hint: a few words added to a range error (what the bound means).
    """
    raw = value
    value = _scalar(value, name, "an integer")
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an integer, got {type(raw).__name__} ({raw!r})")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        allowed = _range_text(minimum, maximum, False, False)
        raise ValueError(f"{name} must be {allowed}{' ' + hint if hint else ''}, got {value}")
    return value


def check_real(value, name: str, *, low: float | None = None, high: float | None = None,
               low_open: bool = False, high_open: bool = False, hint: str = "") -> float:
    """``value`` as a finite ``float`` in the given range, or a ``TypeError``/``ValueError`` naming ``name``.

    NaN and infinities are always refused: every real-valued setting in the book is a
    finite number, and an infinite one would only turn into NaN further on.

    Args:
        value: a Python or NumPy number, or a 0-d real tensor or array.
        name: the argument's name.
        low, high: the ends of the allowed range (``None``: unbounded on that side).
        low_open, high_open: whether that end is excluded (``low_open=True`` means ``> low``).
        hint: a few words added to a range error (what the bound means).
    """
    raw = value
    value = _scalar(value, name, "a real number")
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(raw).__name__} ({raw!r})")
    value = float(value)
    inside = math.isfinite(value)
    if inside and low is not None:
        inside = value > low if low_open else value >= low
    if inside and high is not None:
        inside = value < high if high_open else value <= high
    if not inside:
        allowed = _range_text(low, high, low_open, high_open)
        # An interval bounded on both sides says "finite" already.
        finite = "finite and " if not math.isfinite(value) and (low is None) != (high is None) else ""
        raise ValueError(f"{name} must be {finite}{allowed}{' ' + hint if hint else ''}, got {value}")
    return value


def check_bool(value, name: str) -> bool:
    """``value`` if it is ``True`` or ``False``, else a ``TypeError`` naming ``name`` (1 and "yes" are not flags)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} ({value!r})")
    return bool(value)


def check_tensor(tensor, name: str) -> torch.Tensor:
    """``tensor`` if it is a ``torch.Tensor``, else a ``TypeError`` naming ``name``."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    return tensor


def check_float_tensor(tensor, name: str) -> torch.Tensor:
    """``tensor`` if it is a floating-point ``torch.Tensor``, else a ``TypeError`` naming ``name``."""
    check_tensor(tensor, name)
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float32, float16, bfloat16, ...), got {tensor.dtype}")
    return tensor


def check_int_tensor(tensor, name: str) -> torch.Tensor:
    """``tensor`` if it is an integer ``torch.Tensor`` (token ids), else a ``TypeError`` naming ``name``."""
    check_tensor(tensor, name)
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor of token ids (torch.long), got {tensor.dtype}")
    return tensor


def check_token_ids(ids, name: str, model=None) -> torch.Tensor:
    """``ids`` if it is an integer tensor whose values lie in ``model``'s vocabulary (when it has one)."""
    check_int_tensor(ids, name)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(f"{name} must hold token ids in [0, {vocab}) (the model's vocabulary), got values in "
                         f"[{int(ids.min())}, {int(ids.max())}]")
    return ids


def check_generator(generator, name: str = "generator"):
    """``generator`` if it is ``None`` or a ``torch.Generator``, else a ``TypeError``."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{name} must be a torch.Generator or None, got {type(generator).__name__}")
    return generator


def accepts_keyword(model, name: str) -> bool:
    """Whether ``model``'s forward takes the keyword ``name`` (by name, or through ``**kwargs``)."""
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError, AttributeError):
        return False
    return name in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def keep_logits(model, keep: torch.Tensor) -> dict:
    """``{"logits_to_keep": keep}`` where ``model``'s forward takes that keyword, else ``{}``.

    ``keep`` is a tensor, never a count: positions ``(K,)`` to project to the vocabulary,
    or a ``(B, T)`` bool mask (all ``False``: project none). transformers projects a count
    ``n`` as the view ``hidden[:, -n:]``, whose rows are not contiguous, and without
    autograd PyTorch then multiplies it by the head as a batched product that reads the
    whole head (49152 x 576 here) once per row: for the last position of 16 to 100 rows
    3 to 15x slower than one product, on AVX2 kernels. Indexing makes a contiguous copy.
    """
    return {"logits_to_keep": keep} if accepts_keyword(model, "logits_to_keep") else {}
