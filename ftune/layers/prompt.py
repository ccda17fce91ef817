"""Virtual tokens: what prompt tuning, P-tuning and prefix tuning share.

`VirtualTokens` holds n trainable vectors (PEFT's `embedding`), optionally passed through a
reparameterising encoder (P-tuning's MLP/LSTM, prefix tuning's MLP) that only training uses: the saved
artifact is the encoder's output, so loading needs no encoder.

`install(model, tokens, kind)` puts them in front of every sequence by wrapping the causal LM's forward
on this instance (the loop, data and eval call the model as before):
  kind "prompt": n soft embeddings prepended to the input embeddings (prompt tuning, P-tuning);
  kind "prefix": per-layer key/value prefixes handed to the model as a KV cache (prefix tuning).
What the wrapper does with each input, so that results equal PEFT's model:
  - no cache, or an empty one: the virtual tokens go first. The attention mask gets n ones in front,
    position_ids move up by n (the virtual tokens take 0..n-1), labels get n IGNOREs in front; the
    logits of the virtual positions are dropped, so callers see one logit per input token.
  - a packed row (cu_seq_lens, one row of several examples; prompt kind only): each example gets its own
    n virtual tokens in front, its positions restart at 0 at its first virtual token, cu_seq_lens and
    max_length grow to match: an example never sees another's tokens, virtual or not.
  - a cache that already holds tokens (eval's shared-prompt KV cache, generation): the virtual tokens
    are in it already, so only the mask (n ones in front) and position_ids (+n) change.
The first real label of each example is IGNORE: it would be predicted from the last virtual token, but
ftune's target counts (and packing) never predict an example's first token.
"""

from __future__ import annotations

import inspect
import types

import torch
from torch import nn

from ftune.data.tokenize import IGNORE

CACHE_KEYS = ("cache", "past_key_values")


class VirtualTokens(nn.Module):
    """n trainable vectors of width `dim`; `forward()` gives the (n, out) virtual tokens, through `encoder`
    ((1, n, dim) -> (1, n, out)) when there is one."""

    def __init__(self, n: int, dim: int, encoder: nn.Module | None = None):
        super().__init__()
        self.embedding = nn.Embedding(n, dim)
        self.encoder = encoder

    @property
    def n(self) -> int:
        return self.embedding.num_embeddings

    def forward(self) -> torch.Tensor:
        e = self.embedding.weight
        return e if self.encoder is None else self.encoder(e.unsqueeze(0))[0]


def mlp_encoder(dim: int, hidden: int) -> nn.Module:
    """P-tuning's MLP head (PEFT's layout: dim -> hidden -> hidden -> dim, ReLU between)."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, dim))


class LstmEncoder(nn.Module):
    """P-tuning's LSTM head: a bidirectional LSTM, then a two-layer MLP back to `dim`."""

    def __init__(self, dim: int, hidden: int, layers: int, dropout: float):
        super().__init__()
        self.lstm_head = nn.LSTM(dim, hidden, num_layers=layers, dropout=dropout, bidirectional=True, batch_first=True)
        self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp_head(self.lstm_head(x)[0])


def prefix_encoder(dim: int, hidden: int, out: int) -> nn.Module:
    """Prefix tuning's reparameterisation (Li & Liang 2021): embedding -> hidden -> 2·layers·kv_dim, tanh between."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, out))


def kv_shape(config) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of a decoder config; grouped-query attention has fewer kv heads."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


def virtual_tokens(model) -> VirtualTokens:
    return model.ftune_virtual_tokens


def install(model, tokens: VirtualTokens, kind: str) -> None:
    """Register `tokens` on `model` (so they train, checkpoint and move with it) and wrap its forward."""
    ref = next(model.parameters())
    model.ftune_virtual_tokens = tokens.to(ref.device)
    model._ftune_prompt_kind = kind
    model._ftune_prompt_inner = model.forward
    model.forward = types.MethodType(_forward, model)


def _cache_of(kwargs: dict):
    return next((kwargs[k] for k in CACHE_KEYS if kwargs.get(k) is not None), None)


def _forward(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, inputs_embeds=None, **kwargs):
    tokens, inner = self.ftune_virtual_tokens, self._ftune_prompt_inner
    n = tokens.n
    cache = _cache_of(kwargs)
    batch = (input_ids if input_ids is not None else inputs_embeds).shape[0]
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask.new_ones(batch, n), attention_mask], 1)
    if cache is not None and cache.get_seq_length() > 0:  # the virtual tokens are in the cache already
        return inner(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                     position_ids=None if position_ids is None else position_ids + n, labels=labels, **kwargs)
    if labels is not None:
        labels = labels.clone()
        labels[:, 0] = IGNORE
    if self._ftune_prompt_kind == "prefix":
        return _prefix_forward(self, inner, tokens(), batch, input_ids, inputs_embeds, attention_mask, position_ids,
                               labels, kwargs)
    if inputs_embeds is None:
        inputs_embeds = self.get_input_embeddings()(input_ids)
    prompt = tokens().to(inputs_embeds.dtype)
    if kwargs.get("cu_seq_lens_q") is not None and batch == 1:
        return _packed_forward(inner, prompt, inputs_embeds, position_ids, labels, kwargs)
    embeds = torch.cat([prompt.unsqueeze(0).expand(batch, -1, -1), inputs_embeds], 1)
    if position_ids is not None:
        first = torch.arange(n, device=position_ids.device).expand(batch, -1)
        position_ids = torch.cat([first, position_ids + n], 1)
    if labels is not None:
        labels = torch.cat([labels.new_full((batch, n), IGNORE), labels], 1)
    out = inner(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, labels=labels, **kwargs)
    if getattr(out, "logits", None) is not None:
        out.logits = out.logits[:, n:]
    return out


def _packed_forward(inner, prompt, inputs_embeds, position_ids, labels, kwargs):
    """One packed row: every example gets its own copy of the virtual tokens in front (one gather)."""
    n, dev = prompt.shape[0], inputs_embeds.device
    cu = kwargs["cu_seq_lens_q"].to(dev).long()
    lengths = cu[1:] - cu[:-1]
    k = lengths.numel()
    # the new row, example by example: n virtual tokens (table rows 0..n-1), then its own tokens (rows n + t)
    new_len = lengths + n
    new_cu = torch.zeros(k + 1, dtype=torch.long, device=dev)
    new_cu[1:] = new_len.cumsum(0)
    total = int(new_cu[-1])
    pos = torch.arange(total, device=dev) - torch.repeat_interleave(new_cu[:-1], new_len)  # 0.. within each example
    example = torch.repeat_interleave(torch.arange(k, device=dev), new_len)
    real = pos >= n
    index = torch.where(real, n + cu[:-1][example] + pos - n, pos)
    table = torch.cat([prompt, inputs_embeds[0]], 0)
    kwargs = dict(kwargs)
    kwargs["cu_seq_lens_q"] = kwargs["cu_seq_lens_k"] = new_cu.to(kwargs["cu_seq_lens_q"].dtype)
    kwargs["max_length_q"] = kwargs["max_length_k"] = int(new_len.max())
    if labels is not None:
        flat = torch.cat([labels.new_full((n,), IGNORE), labels[0]])
        labels = flat[index].unsqueeze(0)
        labels[0, ~real] = IGNORE
    out = inner(inputs_embeds=table[index].unsqueeze(0), position_ids=pos.unsqueeze(0), labels=labels, **kwargs)
    if getattr(out, "logits", None) is not None:
        out.logits = out.logits[:, real]
    return out


def _prefix_forward(self, inner, flat, batch, input_ids, inputs_embeds, attention_mask, position_ids, labels, kwargs):
    """The prefix as a KV cache of n positions in every layer (PEFT's layout: per token, layers·2 blocks of
    kv_heads·head_dim, keys then values of each layer); positions move up by n, as after any cached prefix."""
    from transformers import DynamicCache

    layers, kv_heads, head_dim = kv_shape(self.config)
    n = flat.shape[0]
    kv = flat.to(self.get_input_embeddings().weight.dtype).view(n, 2 * layers, kv_heads, head_dim).permute(1, 2, 0, 3)
    cache = DynamicCache(config=self.config)
    for i in range(layers):
        cache.update(kv[2 * i].unsqueeze(0).expand(batch, -1, -1, -1), kv[2 * i + 1].unsqueeze(0).expand(batch, -1, -1, -1), i)
    kwargs = {k: v for k, v in kwargs.items() if k not in CACHE_KEYS}
    kwargs[cache_kwarg(type(self))] = cache
    return inner(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                 position_ids=None if position_ids is None else position_ids + n, labels=labels, **kwargs)


def cache_kwarg(model_cls: type) -> str:
    """`cache` where transformers renamed the KV cache argument, else `past_key_values`."""
    try:
        return "cache" if "cache" in inspect.signature(model_cls.forward).parameters else "past_key_values"
    except (TypeError, ValueError):
        return "past_key_values"
