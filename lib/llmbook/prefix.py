r"""Prefix-tuning: trainable virtual tokens in every layer's keys and values (Li & Liang, 2021, arXiv 2101.00190).

The base model stays frozen. In front of the prompt sit $n$ *virtual tokens* that
have no word, no embedding in the vocabulary and no position: each layer $\ell$
simply gets $n$ extra keys $P_K^\ell$ and values $P_V^\ell$ that every
real token can attend to,

$$\mathrm{head} = \mathrm{softmax}\!\Big(\frac{Q\,[P_K^\ell;\,K]^\top}{\sqrt{d_h}}\Big)\,[P_V^\ell;\,V].$$

With grouped-query attention a layer stores only ``num_key_value_heads`` key/value heads,
so the per-layer width of $P_K^\ell$ and $P_V^\ell$ is
``kv_dim = num_key_value_heads * head_dim`` (3 x 64 = 192 on SmolLM2), not the hidden size.

Trained directly, the prefix has $n \cdot L \cdot 2 \cdot \mathrm{kv\_dim}$ parameters.
The paper found training more stable when the prefix is *reparameterised*: a small
embedding $E \in \mathbb{R}^{n \times d}$ goes through a two-layer MLP
$d \to d' \to L \cdot 2 \cdot \mathrm{kv\_dim}$, so the trainable count becomes

$$n d + (d d' + d') + (d' + 1)\, L \cdot 2 \cdot \mathrm{kv\_dim}.$$

After training the MLP is no longer needed: its output, the prefix itself, is computed
once and stored (:meth:`PrefixEncoder.fold`), and inference costs the same as without it.

The prefix reaches the model through its key/value cache: :class:`PrefixTuningModel`
puts $P_K^\ell, P_V^\ell$ into a ``transformers.DynamicCache`` as if $n$
tokens had been processed already, prepends $n$ ones to the attention mask and
numbers the real tokens from position $n$ on, as PEFT does. Parameter layout and
names (``embedding``, ``transform``) follow PEFT's ``PrefixEncoder``, so tests can copy
tensors one to one. Chapter 4 explains every piece.
"""

from __future__ import annotations

import torch
from torch import nn

from llmbook._checks import check_int

__all__ = ["PrefixEncoder", "PrefixTuningModel", "prefix_kv_shape", "prefix_parameter_count"]


def prefix_parameter_count(
    num_virtual_tokens: int,
    num_layers: int,
    kv_dim: int,
    projection_dim: int | None = None,
    token_dim: int | None = None,
) -> int:
    r"""Number of trainable parameters of prefix-tuning.

    Without reparameterisation the prefix is the parameter:
    $n \cdot L \cdot 2 \cdot \mathrm{kv\_dim}$ (also what is stored after training,
    with or without the MLP). With ``projection_dim`` $d'$ the embedding
    $n \times d$ and the MLP $d \to d' \to L \cdot 2 \cdot \mathrm{kv\_dim}$
    (both linear layers with bias) are trained instead:
    $n d + d d' + d' + d' \cdot 2L\,\mathrm{kv\_dim} + 2L\,\mathrm{kv\_dim}$.

    Args:
        num_virtual_tokens: $n$, the number of virtual tokens (>= 1).
        num_layers: $L$, the number of decoder layers (>= 1).
        kv_dim: per-layer key (and value) width, ``num_key_value_heads * head_dim`` (>= 1).
        projection_dim: $d'$, the MLP's hidden width, or ``None`` for no MLP.
        token_dim: $d$, the virtual-token embedding width when the MLP is used;
            ``None`` means ``kv_dim`` (PEFT's default). Only valid with ``projection_dim``.

    Returns:
        the count, as an ``int``.
    """
    n = check_int(num_virtual_tokens, "num_virtual_tokens", minimum=1)
    layers = check_int(num_layers, "num_layers", minimum=1)
    kv_dim = check_int(kv_dim, "kv_dim", minimum=1)
    out = layers * 2 * kv_dim  # one K and one V vector per layer and virtual token
    if projection_dim is None:
        if token_dim is not None:
            raise ValueError("token_dim only applies with projection_dim (the MLP's input width); pass both or neither")
        return n * out
    d_hidden = check_int(projection_dim, "projection_dim", minimum=1)
    d = kv_dim if token_dim is None else check_int(token_dim, "token_dim", minimum=1)
    return n * d + (d * d_hidden + d_hidden) + (d_hidden * out + out)


def _text_config(config):
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def prefix_kv_shape(config) -> tuple[int, int, int]:
    """``(num_layers, num_key_value_heads, head_dim)`` of a transformers decoder config.

    ``num_key_value_heads`` falls back to ``num_attention_heads`` (no grouped-query
    attention) and ``head_dim`` to ``hidden_size // num_attention_heads``.

    Raises:
        ValueError: the config lacks the sizes, or has layers of different attention kinds
            (sliding-window or linear layers), whose caches this module does not fill.
    """
    cfg = _text_config(config)
    get = lambda *names: next((getattr(cfg, k) for k in names if getattr(cfg, k, None) is not None), None)  # noqa: E731
    layers = get("num_hidden_layers", "n_layer", "num_layers")
    heads = get("num_attention_heads", "n_head")
    hidden = get("hidden_size", "n_embd", "d_model")
    if layers is None or heads is None or hidden is None:
        raise ValueError("config must give num_hidden_layers, num_attention_heads and hidden_size (or GPT-2's names)")
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types and any(t != "full_attention" for t in layer_types):
        raise ValueError(f"only models whose layers all use full attention are supported, got {sorted(set(layer_types))}")
    kv_heads = get("num_key_value_heads") or heads
    head_dim = get("head_dim") or hidden // heads
    return int(layers), int(kv_heads), int(head_dim)


class PrefixEncoder(nn.Module):
    r"""The trainable prefix: per-layer keys and values of ``num_virtual_tokens`` virtual tokens.

    Without ``projection_dim`` the parameter ``embedding.weight`` *is* the prefix, shape
    ``(n, L * 2 * kv_dim)``, laid out per virtual token as (layer, K or V, head, head_dim),
    as in PEFT. With ``projection_dim`` it is a small ``(n, token_dim)`` embedding and
    ``transform`` (Linear $d \to d'$, tanh, Linear $d' \to L \cdot 2 \cdot
    \mathrm{kv\_dim}$) computes the prefix from it.

    Initialisation follows PEFT: the embedding is standard normal, the linear layers use
    PyTorch's default.

    Args:
        num_virtual_tokens: $n$ (>= 1).
        num_layers: $L$, decoder layers of the model (>= 1).
        num_kv_heads: key/value heads per layer (>= 1).
        head_dim: width of one head (>= 1).
        projection_dim: $d'$, the MLP's hidden width, or ``None`` (no MLP).
        token_dim: $d$, the embedding width with the MLP; default ``kv_dim``.
    """

    def __init__(
        self,
        num_virtual_tokens: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        projection_dim: int | None = None,
        token_dim: int | None = None,
    ):
        super().__init__()
        self.num_virtual_tokens = check_int(num_virtual_tokens, "num_virtual_tokens", minimum=1)
        self.num_layers = check_int(num_layers, "num_layers", minimum=1)
        self.num_kv_heads = check_int(num_kv_heads, "num_kv_heads", minimum=1)
        self.head_dim = check_int(head_dim, "head_dim", minimum=1)
        self.kv_dim = self.num_kv_heads * self.head_dim
        out = self.num_layers * 2 * self.kv_dim
        if projection_dim is None:
            if token_dim is not None:
                raise ValueError("token_dim only applies with projection_dim (the MLP's input width); pass both or neither")
            self.token_dim = None
            self.embedding = nn.Embedding(self.num_virtual_tokens, out)  # the prefix itself: (n, L*2*kv_dim)
            self.transform = None
        else:
            projection_dim = check_int(projection_dim, "projection_dim", minimum=1)
            self.token_dim = self.kv_dim if token_dim is None else check_int(token_dim, "token_dim", minimum=1)
            self.embedding = nn.Embedding(self.num_virtual_tokens, self.token_dim)  # E: (n, d)
            self.transform = nn.Sequential(  # d -> d' -> L * 2 * kv_dim
                nn.Linear(self.token_dim, projection_dim), nn.Tanh(), nn.Linear(projection_dim, out)
            )
        self.projection_dim = projection_dim

    @classmethod
    def for_model(cls, model_or_config, num_virtual_tokens: int, projection_dim: int | None = None,
                  token_dim: int | None = None) -> PrefixEncoder:
        """A prefix encoder sized for a transformers model (or its config)."""
        config = getattr(model_or_config, "config", model_or_config)
        layers, kv_heads, head_dim = prefix_kv_shape(config)
        return cls(num_virtual_tokens, layers, kv_heads, head_dim, projection_dim, token_dim)

    def flat_prefix(self) -> torch.Tensor:
        """The prefix as PEFT stores it: shape ``(n, L * 2 * kv_dim)``."""
        weight = self.embedding.weight
        return weight if self.transform is None else self.transform(weight)

    def forward(self) -> torch.Tensor:
        r"""Every layer's prefix keys and values, shape ``(L, 2, num_kv_heads, n, head_dim)``.

        ``out[l, 0]`` is $P_K^\ell$ and ``out[l, 1]`` is $P_V^\ell$, each
        ``(num_kv_heads, n, head_dim)``: the layout of one batch row of a layer's cache.
        The MLP runs once for the $n$ tokens, not once per batch row.
        """
        n, h, hd = self.num_virtual_tokens, self.num_kv_heads, self.head_dim
        flat = self.flat_prefix()                                    # (n, L*2*kv_dim)
        return flat.view(n, self.num_layers, 2, h, hd).permute(1, 2, 3, 0, 4)  # (L, 2, h, n, hd)

    @torch.no_grad()
    def load_prefix(self, kv: torch.Tensor) -> None:
        """Set the prefix to given keys and values, shape ``(L, 2, num_kv_heads, n, head_dim)``.

        Only without the MLP, where the prefix is the parameter (fold an MLP encoder first).
        """
        if self.transform is not None:
            raise ValueError("load_prefix needs an encoder without the MLP (projection_dim=None); fold() first")
        shape = (self.num_layers, 2, self.num_kv_heads, self.num_virtual_tokens, self.head_dim)
        if not torch.is_tensor(kv) or tuple(kv.shape) != shape:
            got = tuple(kv.shape) if torch.is_tensor(kv) else type(kv).__name__
            raise ValueError(f"kv must have shape (L, 2, kv_heads, n, head_dim) = {shape}, got {got}")
        if not torch.isfinite(kv).all():
            raise ValueError("kv holds NaN or infinite values")
        # (L, 2, h, n, hd) -> (n, L, 2, h, hd) -> (n, L*2*kv_dim): the inverse of forward().
        self.embedding.weight.copy_(kv.permute(3, 0, 1, 2, 4).reshape(self.num_virtual_tokens, -1))

    @torch.no_grad()
    def fold(self) -> PrefixEncoder:
        """A new encoder without the MLP whose prefix equals this one's output (this one is unchanged).

        After training the embedding and the MLP are only a means to the prefix: storing
        the prefix itself takes ``prefix_parameter_count(n, L, kv_dim)`` numbers and
        skips the MLP at inference.
        """
        folded = PrefixEncoder(self.num_virtual_tokens, self.num_layers, self.num_kv_heads, self.head_dim)
        weight = self.embedding.weight
        folded.to(device=weight.device, dtype=weight.dtype)
        folded.embedding.weight.copy_(self.flat_prefix())
        return folded

    def extra_repr(self) -> str:
        return (f"num_virtual_tokens={self.num_virtual_tokens}, num_layers={self.num_layers}, "
                f"kv_dim={self.kv_dim} ({self.num_kv_heads} x {self.head_dim}), projection_dim={self.projection_dim}")


class PrefixTuningModel(nn.Module):
    """A frozen transformers decoder with a trainable prefix fed through its key/value cache.

    Calls look like the base model's: ``forward(input_ids, attention_mask=..., labels=...)``
    and ``generate(...)``. Logits and labels cover the real tokens only: the virtual
    tokens live in the cache and produce no output.

    Positions: the real tokens are numbered from ``n`` on, as if the virtual tokens were
    ``0 .. n-1``. With padding the numbering follows the attention mask (a left-padded row
    starts at ``n`` on its first real token), so a row gives the same logits padded or not.
    ``position_ids`` passed in count from 0 over the real tokens and are shifted by ``n``
    (PEFT does the same).

    Args:
        model: a transformers causal LM whose forward takes ``cache=`` (any decoder whose
            layers all use full attention). Its parameters are frozen.
        num_virtual_tokens: $n$, for a new :class:`PrefixEncoder`.
        projection_dim, token_dim: as in :class:`PrefixEncoder`.
        encoder: use this encoder instead of making one (its shapes must fit the model).
    """

    def __init__(
        self,
        model: nn.Module,
        num_virtual_tokens: int | None = None,
        *,
        projection_dim: int | None = None,
        token_dim: int | None = None,
        encoder: PrefixEncoder | None = None,
    ):
        super().__init__()
        if not hasattr(model, "config") or not callable(getattr(model, "forward", None)):
            raise TypeError(f"model must be a transformers model with a config, got {type(model).__name__}")
        shape = prefix_kv_shape(model.config)
        if encoder is None:
            if num_virtual_tokens is None:
                raise ValueError("pass num_virtual_tokens (or an encoder)")
            encoder = PrefixEncoder(num_virtual_tokens, *shape, projection_dim=projection_dim, token_dim=token_dim)
        elif not isinstance(encoder, PrefixEncoder):
            raise TypeError(f"encoder must be a PrefixEncoder, got {type(encoder).__name__}")
        elif num_virtual_tokens not in (None, encoder.num_virtual_tokens):
            raise ValueError(f"num_virtual_tokens ({num_virtual_tokens}) disagrees with the encoder's "
                             f"({encoder.num_virtual_tokens})")
        have = (encoder.num_layers, encoder.num_kv_heads, encoder.head_dim)
        if have != shape:
            raise ValueError(f"encoder has (layers, kv_heads, head_dim) = {have}, the model needs {shape}")
        self.model = model.requires_grad_(False)
        param = next(model.parameters())
        # The prefix trains in fp32 even for a bf16 model (as PEFT does); it is cast when used.
        dtype = param.dtype if param.dtype in (torch.float32, torch.float64) else torch.float32
        self.encoder = encoder.to(device=param.device, dtype=dtype)

    # -- what the model gives back ------------------------------------------------------
    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def get_output_embeddings(self):
        """The wrapped model's output layer (the LM head), as transformers models expose it."""
        return self.model.get_output_embeddings()

    @property
    def num_virtual_tokens(self) -> int:
        return self.encoder.num_virtual_tokens

    # -- the cache ----------------------------------------------------------------------
    def prefix_cache(self, batch_size: int):
        """A ``DynamicCache`` holding the prefix keys and values of every layer, ``batch_size`` rows."""
        from transformers import DynamicCache

        batch_size = check_int(batch_size, "batch_size", minimum=1)
        kv = self.encoder().to(next(self.model.parameters()).dtype)   # (L, 2, h, n, hd)
        # unbind() rather than kv[layer, 0]: its backward is one stack, where indexing would
        # fill a zero tensor of the whole prefix for each of the 2L slices. expand() adds the
        # batch dimension without copying; the cache's first update copies once.
        pairs = [layer.unbind(0) for layer in kv.unbind(0)]            # L pairs of (h, n, hd)
        return DynamicCache([(k.expand(batch_size, -1, -1, -1), v.expand(batch_size, -1, -1, -1)) for k, v in pairs])

    @torch.no_grad()
    def kv_of_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Every layer's keys and values of a real token sequence, ``(L, 2, num_kv_heads, len, head_dim)``.

        The base model runs on ``token_ids`` (1-D, or shape ``(1, len)``) at positions
        ``0 .. len-1`` and its cache is read out: the form the prefix takes.
        """
        if not torch.is_tensor(token_ids) or token_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError("token_ids must be an integer tensor")
        ids = token_ids.reshape(1, -1) if token_ids.dim() == 1 or token_ids.shape[0] == 1 else None
        if ids is None or ids.shape[1] == 0:
            raise ValueError(f"token_ids must be one non-empty sequence, got shape {tuple(token_ids.shape)}")
        cache = self.model(ids.to(self.device), use_cache=True).cache
        return torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers])

    def init_from_tokens(self, token_ids: torch.Tensor) -> PrefixTuningModel:
        r"""Start the prefix from the keys and values of real tokens (Li & Liang's initialisation).

        ``token_ids`` must hold exactly ``num_virtual_tokens`` tokens. Because the real
        tokens are numbered from position $n$ on, the model then computes exactly
        what the base model computes with those tokens in front of the input. Needs an
        encoder without the MLP; returns ``self``.
        """
        n = self.num_virtual_tokens
        if torch.is_tensor(token_ids) and token_ids.numel() != n:
            raise ValueError(f"token_ids must hold num_virtual_tokens = {n} tokens, got {token_ids.numel()}")
        self.encoder.load_prefix(self.kv_of_tokens(token_ids).to(self.encoder.embedding.weight.dtype))
        return self

    def _check_inputs(self, input_ids, inputs_embeds, attention_mask, position_ids):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        tokens = input_ids if input_ids is not None else inputs_embeds
        if input_ids is not None and (not torch.is_tensor(input_ids) or input_ids.dim() != 2
                                      or input_ids.dtype not in (torch.int32, torch.int64)):
            raise ValueError("input_ids must be an integer tensor of shape (batch, seq_len)")
        if input_ids is None and (not torch.is_tensor(inputs_embeds) or inputs_embeds.dim() != 3):
            raise ValueError("inputs_embeds must be a tensor of shape (batch, seq_len, hidden)")
        batch, length = tokens.shape[:2]
        if length == 0:
            raise ValueError("the input has no tokens (seq_len = 0)")
        for name, value in (("attention_mask", attention_mask), ("position_ids", position_ids)):
            if value is not None and (not torch.is_tensor(value) or value.dim() != 2 or value.shape[0] != batch):
                shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
                raise ValueError(f"{name} must be a tensor of shape ({batch}, ...) like the input, got {shape}")
        if position_ids is not None and position_ids.shape[1] != length:
            raise ValueError(f"position_ids must have shape {(batch, length)}, got {tuple(position_ids.shape)}")
        if attention_mask is not None and ((attention_mask != 0) & (attention_mask != 1)).any():
            raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
        return batch, length

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, *,
                inputs_embeds=None, cache=None, **kwargs):
        """The base model's forward with the prefix in its cache.

        Args:
            input_ids: ``(B, T)`` token ids (or ``inputs_embeds``, ``(B, T, H)``).
            attention_mask: ``(B, T)`` with 1 for tokens and 0 for padding (left or right);
                with ``cache`` it covers every real token so far plus the new ones.
            position_ids: ``(B, T)`` positions counted over the real tokens (shifted by ``n``
                here); by default derived from the attention mask.
            labels: ``(B, T)`` as for the base model (-100 for no loss); the virtual tokens
                need none.
            cache: ``out.cache`` of an earlier call, to continue decoding (it already holds
                the prefix); ``None`` starts from the prefix.
            **kwargs: passed on to the base model (``use_cache``, ``logits_to_keep``, ...).

        Returns:
            the base model's output (``logits`` ``(B, T, V)``, ``loss``, ``cache``).
        """
        if "past_key_values" in kwargs:
            raise ValueError("pass cache= (transformers 5 name), not past_key_values=")
        batch, length = self._check_inputs(input_ids, inputs_embeds, attention_mask, position_ids)
        n = self.num_virtual_tokens
        if cache is None:
            cache = self.prefix_cache(batch)
            past_real = 0
        else:
            if not hasattr(cache, "get_seq_length") or cache.get_seq_length() < n:
                raise ValueError(f"cache must be an earlier output's cache, holding at least the {n} virtual tokens")
            past_real = cache.get_seq_length() - n
        if attention_mask is not None:
            if attention_mask.shape[1] != past_real + length:
                raise ValueError(f"attention_mask must cover the {past_real} earlier and {length} new tokens "
                                 f"({past_real + length} columns), got {attention_mask.shape[1]}")
            # The virtual tokens are always visible: n ones in front of the mask.
            attention_mask = torch.cat([attention_mask.new_ones(batch, n), attention_mask], dim=1)  # (B, n+past+T)
            if position_ids is None:
                # Count real tokens: a left-padded row's first token gets position n, like an unpadded row.
                position_ids = (attention_mask.long().cumsum(-1) - 1)[:, -length:].clamp_min(0)
            else:
                position_ids = position_ids + n
        elif position_ids is None:
            position_ids = torch.arange(n + past_real, n + past_real + length, device=self.device).expand(batch, -1)
        else:
            position_ids = position_ids + n
        return self.model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                          position_ids=position_ids, labels=labels, cache=cache, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """The base model's ``generate``, started from the prefix cache.

        Takes the base model's arguments (``max_new_tokens``, ``do_sample``, ``num_beams``,
        ``num_return_sequences``, ...); prompts are left-padded as usual. Returns the
        prompt followed by the new tokens, ``(B', T + new)``, as ``generate`` does.
        """
        if "cache" in kwargs or "past_key_values" in kwargs:
            raise ValueError("generate builds the prefix cache itself; do not pass cache")
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("generate takes input_ids here, not inputs_embeds")
        batch, length = self._check_inputs(input_ids, None, attention_mask, None)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        elif attention_mask.shape[1] != length:
            raise ValueError(f"attention_mask must have shape {(batch, length)}, got {tuple(attention_mask.shape)}")
        if kwargs.get("position_ids") is not None:
            raise ValueError("generate derives positions from the attention mask; do not pass position_ids")
        # generate repeats each prompt num_beams * num_return_sequences times, but not the cache.
        gen = self.model.generation_config
        copies = (kwargs.get("num_beams") or gen.num_beams or 1) * (kwargs.get("num_return_sequences")
                                                                   or gen.num_return_sequences or 1)
        n = self.num_virtual_tokens
        mask = torch.cat([attention_mask.new_ones(batch, n), attention_mask], dim=1)  # (B, n+T)
        # The mask is longer than input_ids by n, which tells generate that input_ids are new
        # tokens after the cached ones; it derives positions n, n+1, ... from the mask.
        return self.model.generate(input_ids, attention_mask=mask, cache=self.prefix_cache(batch * copies), **kwargs)

    def fold(self) -> PrefixTuningModel:
        """Replace the encoder by its folded form (the MLP computed away), in place; returns ``self``."""
        self.encoder = self.encoder.fold()
        return self

    def num_parameters_trainable(self) -> int:
        """Trainable parameters (the encoder's); equals :func:`prefix_parameter_count`."""
        return sum(p.numel() for p in self.encoder.parameters() if p.requires_grad)
