r"""LoRA: low-rank adaptation of linear layers (Hu et al., 2021, arXiv 2106.09685).

Fine-tuning changes a weight matrix by some $\Delta W$; LoRA bets that this change
has low rank and writes it as a product of two thin matrices:

$$W_{\mathrm{merge}} = W + \Delta W = W + \frac{\alpha}{r} B A, \qquad A \in \mathbb{R}^{r \times d_{in}},\; B \in \mathbb{R}^{d_{out} \times r}$$

$W$ stays frozen; only $A$ and $B$ train. $A$ starts random
(Kaiming-uniform, as in PEFT) and $B$ at zero, so the wrapped layer starts out
exactly equal to the original. $\alpha/r$ (``scaling``) sets how large an update
a given $A, B$ makes; rank-stabilised LoRA (rsLoRA, Kalajdzievski, 2023,
arXiv 2312.03732; ``use_rslora=True``) divides by $\sqrt{r}$ instead. For inference,
$\Delta W$ can be added into
$W$ once (``merge``) so the layer costs no more than the original.

Names follow PEFT (``lora_A``, ``lora_B``, ``lora_alpha``, ``scaling``, ``merge``,
``unmerge``) so the tests can compare ours with PEFT's layer one to one.
Chapter 3 explains every piece.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from llmbook._checks import check_bool, check_int, check_real

__all__ = [
    "LoRALinear",
    "apply_lora",
    "count_parameters",
    "disable_lora",
    "lora_layers",
    "merge_lora",
    "unmerge_lora",
]


def _check_settings(r, lora_alpha, lora_dropout, use_rslora) -> tuple[int, float, float, bool]:
    """``(r, lora_alpha, lora_dropout, use_rslora)`` as plain values, or an error naming the bad one."""
    return (check_int(r, "r", minimum=1),
            check_real(lora_alpha, "lora_alpha", low=0.0, low_open=True),
            check_real(lora_dropout, "lora_dropout", low=0.0, high=1.0, high_open=True),
            check_bool(use_rslora, "use_rslora"))


class LoRALinear(nn.Module):
    r"""A frozen ``nn.Linear`` plus a trainable low-rank update $\frac{\alpha}{r} B A$.

    Args:
        base: the linear layer to adapt; its weights are frozen.
        r: the rank of the update (an integer >= 1).
        lora_alpha: the numerator of the scaling $\alpha / r$ (> 0).
        lora_dropout: dropout probability on the input of the LoRA branch, in [0, 1).
        use_rslora: scale by $\alpha / \sqrt{r}$ (rsLoRA) instead of $\alpha / r$, as
            PEFT's ``LoraConfig(use_rslora=True)``.
    """

    def __init__(self, base: nn.Linear, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                 use_rslora: bool = False):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base must be an nn.Linear, got {type(base).__name__}")
        r, lora_alpha, lora_dropout, use_rslora = _check_settings(r, lora_alpha, lora_dropout, use_rslora)
        if r > min(base.in_features, base.out_features):
            raise ValueError(
                f"r must be at most min(in_features, out_features) = "
                f"{min(base.in_features, base.out_features)}, got {r}"
            )
        self.base = base.requires_grad_(False)
        self.r = r
        self.lora_alpha = lora_alpha
        self.use_rslora = use_rslora
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        # The adapter trains in float32 (or float64) whatever the base weight's dtype, as PEFT
        # does: in bf16, Adam's small updates would round away against the 8-bit mantissa.
        dtype = base.weight.dtype if base.weight.dtype in (torch.float32, torch.float64) else torch.float32
        if self.scaling > torch.finfo(dtype).max:  # the update would be inf, then NaN on the first forward
            raise ValueError(f"lora_alpha ({lora_alpha:g}) makes the scaling alpha/r = {self.scaling:g} larger than "
                             f"{dtype} can hold ({torch.finfo(dtype).max:.3g}); use a lora_alpha of the order of r")
        factory = dict(device=base.weight.device, dtype=dtype)
        self.lora_A = nn.Linear(base.in_features, r, bias=False, **factory)  # weight (r, in)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, **factory)  # weight (out, r)
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.merged = False
        self.enabled = True
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # A as nn.Linear's default (and PEFT's), B zero: the update starts at exactly 0.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The base weight (merged or not), for code that reads ``layer.weight``."""
        return self.base.weight

    def delta_weight(self) -> torch.Tensor:
        r"""The update $\Delta W = \frac{\alpha}{r} B A$, shape ``(out_features, in_features)``."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    @torch.no_grad()
    def delta_singular_values(self) -> torch.Tensor:
        r"""The $r$ largest singular values of $\Delta W$, largest first, without forming $\Delta W$.

        With thin QR factorisations $B = Q_B R_B$ and $A^\top = Q_A R_A$,
        $\Delta W = \frac{\alpha}{r} Q_B (R_B R_A^\top) Q_A^\top$; $Q_B$ and $Q_A$ have orthonormal
        columns, so $\Delta W$ has the singular values of the $r \times r$ matrix
        $\frac{\alpha}{r} R_B R_A^\top$ (and zeros). That costs $O(r^2 (d_{in} + d_{out}))$
        instead of an SVD of a $(d_{out} \times d_{in})$ matrix (chapter 3, exercise 1).

        Returns:
            shape ``(r,)``, in the adapter's dtype; their squares sum to $\|\Delta W\|_F^2$.
        """
        _, r_b = torch.linalg.qr(self.lora_B.weight)  # (r, r)
        _, r_a = torch.linalg.qr(self.lora_A.weight.T)  # (r, r)
        return torch.linalg.svdvals(r_b @ r_a.T) * abs(self.scaling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged or not self.enabled:
            return y
        # x (..., in) -> A -> (..., r) -> B -> (..., out): never forms the (out, in) matrix.
        # The branch runs in the adapter's dtype and its result joins y in y's dtype.
        update = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype)))) * self.scaling
        return (y + update).to(y.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Add $\\Delta W$ into the base weight, so inference costs one matmul."""
        if self.merged:
            raise RuntimeError("this LoRALinear is already merged")
        self.base.weight += self.delta_weight().to(self.base.weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract $\\Delta W$ again, restoring the base weight (up to rounding)."""
        if not self.merged:
            raise RuntimeError("this LoRALinear is not merged")
        self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
        self.merged = False

    def extra_repr(self) -> str:
        rs = ", use_rslora=True" if self.use_rslora else ""
        return f"r={self.r}, lora_alpha={self.lora_alpha}{rs}, scaling={self.scaling:g}, merged={self.merged}"


def _check_module(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def lora_layers(model: nn.Module) -> list[LoRALinear]:
    """Every :class:`LoRALinear` inside ``model``."""
    _check_module(model)
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def _linear_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def _shared_weights(model: nn.Module) -> dict[int, list[str]]:
    """Every parameter reachable under more than one name (tied weights): id -> its names."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return {key: value for key, value in names.items() if len(value) > 1}


def apply_lora(
    model: nn.Module,
    target_modules: list[str] | tuple[str, ...] | str,
    r: int,
    lora_alpha: float,
    lora_dropout: float = 0.0,
    use_rslora: bool = False,
) -> nn.Module:
    """Freeze ``model`` and wrap its targeted linear layers in :class:`LoRALinear`, in place.

    Args:
        model: any module (a transformers causal LM, say).
        target_modules: names matched against the end of each linear layer's dotted
            name, as PEFT does (``["q_proj", "v_proj"]``), or ``"all-linear"`` for every
            linear layer except the output head ``lm_head``.
        r, lora_alpha, lora_dropout, use_rslora: as in :class:`LoRALinear`.

    Returns:
        the same ``model``, with only the LoRA matrices trainable.

    A layer whose weight is tied to another (``lm_head`` and the input embedding of
    SmolLM2, ``tie_word_embeddings``) is refused: merging would write the update
    into the shared tensor and change the embedding too. Untie it first (the error
    says how) to adapt it.

    Raises:
        ValueError: no linear layer matches ``target_modules``, a target's weight is tied
            to another module's, or LoRA is applied twice.
        TypeError: a target names a module that is not an ``nn.Linear`` (PEFT refuses it too).
    """
    _check_module(model)
    if lora_layers(model):
        raise ValueError("model already has LoRA layers; apply LoRA once")
    r, lora_alpha, lora_dropout, use_rslora = _check_settings(r, lora_alpha, lora_dropout, use_rslora)
    if isinstance(target_modules, str) and target_modules != "all-linear":
        target_modules = [target_modules]
    if not isinstance(target_modules, (str, list, tuple, set)):
        raise TypeError(f"target_modules must be a list of module names or 'all-linear', "
                        f"got {type(target_modules).__name__}")
    if not target_modules:
        raise ValueError("target_modules must name at least one module, or be 'all-linear'")
    names = _linear_names(model)
    if target_modules == "all-linear":
        chosen = [n for n in names if n.split(".")[-1] != "lm_head"]
    else:
        if not all(isinstance(t, str) and t for t in target_modules):
            raise TypeError(f"target_modules must be names (non-empty strings), got {list(target_modules)!r}")
        matches = [(n, m) for n, m in model.named_modules()
                   if n and any(n == t or n.endswith("." + t) for t in target_modules)]
        wrong = [(n, type(m).__name__) for n, m in matches if not isinstance(m, nn.Linear)]
        if wrong:
            name, kind = wrong[0]
            raise TypeError(f"target_modules must name nn.Linear layers; {name!r} is a {kind} "
                            f"({len(wrong)} non-Linear match(es) in all)")
        chosen = [n for n, _ in matches]
        unmatched = [t for t in target_modules if not any(n == t or n.endswith("." + t) for n, _ in matches)]
        if chosen and unmatched:  # a misspelt name would be left out without a word
            suffixes = sorted({n.split(".")[-1] for n in names})
            raise ValueError(f"target_modules {unmatched} match no linear layer (the others do); the model has "
                             f"{suffixes}")
    if not chosen:
        suffixes = sorted({n.split(".")[-1] for n in names})
        raise ValueError(f"target_modules {list(target_modules)} match no linear layer; the model has {suffixes}")
    shared = _shared_weights(model)
    for name in chosen:  # every check before the model changes: a refused call leaves it as it was
        layer = model.get_submodule(name)
        others = shared.get(id(layer.weight), [])
        others = [n for n in others if n != f"{name}.weight"]
        if others:
            raise ValueError(
                f"target_modules names {name!r}, whose weight is tied to {others[0]!r} (the same tensor): merging "
                f"LoRA into it would change that one too. Leave {name!r} out, or untie it first:\n"
                f"    layer = model.get_submodule({name!r})\n"
                "    layer.weight = torch.nn.Parameter(layer.weight.detach().clone())\n"
                "    model.config.tie_word_embeddings = False  # for a transformers model"
            )
        if r > min(layer.in_features, layer.out_features):
            raise ValueError(f"r must be at most min(in_features, out_features) = "
                             f"{min(layer.in_features, layer.out_features)} for {name!r}, got {r}")
    model.requires_grad_(False)
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(getattr(parent, child), r, lora_alpha, lora_dropout, use_rslora))
    return model


def merge_lora(model: nn.Module, unload: bool = False) -> nn.Module:
    """Merge every LoRA update into its base weight.

    With ``unload=True`` the wrappers are replaced by their (merged) base layers, as
    PEFT's ``merge_and_unload`` does; otherwise they stay, so :func:`unmerge_lora` can
    undo the merge.
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRA layers to merge")
    unload = check_bool(unload, "unload")
    for layer in layers:
        if not layer.merged:
            layer.merge()
    if unload:
        for name, module in list(model.named_modules()):
            if isinstance(module, LoRALinear):
                parent_name, _, child = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, child, module.base)
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo :func:`merge_lora` (without ``unload``)."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRA layers to unmerge")
    for layer in layers:
        if layer.merged:
            layer.unmerge()
    return model


@contextlib.contextmanager
def disable_lora(model: nn.Module):
    """Run the base model: inside the ``with`` block every LoRA branch is switched off.

    DPO uses this for its reference model: the policy with adapters off *is* the
    frozen starting model, so no second copy is needed (chapter 7).
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRA layers to disable")
    if any(layer.merged for layer in layers):
        raise RuntimeError("unmerge the LoRA layers before disabling them")
    previous = [layer.enabled for layer in layers]
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer, state in zip(layers, previous):
            layer.enabled = state


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` numbers of parameters; tied weights are counted once."""
    _check_module(model)
    trainable = total = 0
    for p in model.parameters():  # parameters() yields a shared tensor once
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total
