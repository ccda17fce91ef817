"""Virtual tokens: what prompt tuning, P-tuning and prefix tuning share.

`VirtualTokens` holds n trainable vectors (PEFT's `embedding`), optionally passed through a
reparameterising encoder (P-tuning's MLP/LSTM, prefix tuning's MLP) that only training uses: the saved
artifact is the encoder's output, so loading needs no encoder.

`install(model, tokens, kind)` puts them in front of every sequence by wrapping the causal LM's forward
on this instance (the loop, data and eval call the model as before):
  kind "prompt": n soft embeddings prepended to the input embeddings (prompt tuning, P-tuning);
  kind "prefix": per-layer key/value prefixes (prefix tuning), n positions every layer attends over.
What the wrapper does with each input, so that results equal PEFT's model:
  - no cache, or an empty one: the virtual tokens go first. The attention mask gets n ones in front,
    position_ids move up by n (the virtual tokens take 0..n-1), labels get n IGNOREs in front; the
    logits of the virtual positions are dropped, so callers see one logit per input token.
  - a packed row (cu_seq_lens, one row of several examples): each example gets its own n virtual tokens in
    front (prompt kind: n embeddings; prefix kind: n keys/values in every layer), its positions restart at
    n after them: an example never sees another's tokens, virtual or not.
  - a cache that already holds tokens (eval's shared-prompt KV cache, generation): the virtual tokens
    are in it already, so only the mask (n ones in front) and position_ids (+n) change.
The prefix kind travels two ways. A training forward on ftune's fast layer (kernels/fast.py marks the model
with FAST_FORWARD) gets a `Prefix` record in the PREFIX_KWARG keyword, computed once per forward: every
layer attends over [its prefix; its keys] itself (kernels/attention.py), so a recomputed layer recomputes
with it, packed rows work, and gradients reach the prefix. Every other call (eval, generation, training on
transformers' own forward) hands the prefix to transformers as a KV cache of n positions, as PEFT does; that
path takes no packed rows, and transformers' checkpointed layers drop the cache (the loop keeps both off).
Both paths leave the prefix keys unrotated and rotate the real tokens' keys at positions n, n+1, …
The first real label of each example is IGNORE: it would be predicted from the last virtual token, but
ftune's target counts (and packing) never predict an example's first token.
"""

from __future__ import annotations

import inspect
import types
from dataclasses import dataclass, field

import torch
from torch import nn

from ftune.data.tokenize import IGNORE

CACHE_KEYS = ("cache", "past_key_values")
PREFIX_KWARG = "ftune_prefix"  # the keyword that carries a `Prefix` to ftune's fast layer
FAST_FORWARD = "_ftune_fast_forward"  # set on a model whose training forward is ftune's fast layer (takes PREFIX_KWARG)


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


@dataclass(eq=False)
class Prefix:
    """The key/value prefix of one training forward on ftune's fast layer (kernels/attention.py attends over it).

    kv: (2·layers, kv_heads, n, head_dim), layer i's keys at 2i and values at 2i+1, in the model's dtype and
    still on the virtual tokens' graph (gradients reach them through every layer, recomputed ones too).
    padding: the real tokens' (batch, seq) attention mask, or None (packed rows, or no padding).
    memo: what the layers share and would otherwise each rebuild (the mask, a packed row's key layout)."""

    kv: torch.Tensor
    padding: torch.Tensor | None = None
    memo: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return self.kv.shape[2]

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder layer i's (keys, values), each (kv_heads, n, head_dim); keys not rotated (as in the cache)."""
        return self.kv[2 * i], self.kv[2 * i + 1]


def prefixed_layout(cu: torch.Tensor, n: int, total: int):
    """A packed row of `total` tokens (examples at `cu`, cu_seq_lens) with n rows put in front of each example:
    (new cu (long), index, real, pos). Row r of the new row is row index[r] of [the n front rows; the packed
    rows]; real[r] says it is one of the example's own rows; pos[r] counts from 0 at the example's first front
    row. No host sync: the new length is total + examples · n."""
    cu = cu.long()
    dev, lengths = cu.device, cu[1:] - cu[:-1]
    k = lengths.numel()
    new_len = lengths + n
    new_cu = torch.zeros(k + 1, dtype=torch.long, device=dev)
    new_cu[1:] = new_len.cumsum(0)
    size = total + k * n
    pos = torch.arange(size, device=dev) - torch.repeat_interleave(new_cu[:-1], new_len, output_size=size)
    example = torch.repeat_interleave(torch.arange(k, device=dev), new_len, output_size=size)
    real = pos >= n
    index = torch.where(real, cu[:-1][example] + pos, pos)  # a real row: n + (its row in the packed row)
    return new_cu, index, real, pos


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
    if cache is not None and cache.get_seq_length() > 0:  # the virtual tokens are in the cache already
        return inner(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=_ones_in_front(attention_mask, n),
                     position_ids=None if position_ids is None else position_ids + n, labels=labels, **kwargs)
    if labels is not None:
        labels = labels.clone()
        labels[:, 0] = IGNORE
    if self._ftune_prompt_kind == "prefix":
        if _fast_training(self, labels, cache):
            return _prefix_fast_forward(self, inner, tokens(), input_ids, inputs_embeds, attention_mask, position_ids,
                                        labels, kwargs)
        if kwargs.get("cu_seq_lens_q") is not None:
            raise RuntimeError("prefix tuning takes packed rows only on ftune's fast training forward; the loop pads "
                               "micro-batches on transformers' own forward")
        return _prefix_forward(self, inner, tokens(), batch, input_ids, inputs_embeds, _ones_in_front(attention_mask, n),
                               position_ids, labels, kwargs)
    attention_mask = _ones_in_front(attention_mask, n)
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


def _ones_in_front(attention_mask, n: int):
    return None if attention_mask is None else torch.cat([attention_mask.new_ones(attention_mask.shape[0], n), attention_mask], 1)


def _fast_training(model, labels, cache) -> bool:
    """Whether this call is a training forward on ftune's fast layer: the same test as its causal LM forward
    (kernels/fast.py), which refuses a `Prefix` on any other call rather than dropping it."""
    return (getattr(model, FAST_FORWARD, False) and labels is not None and cache is None and model.training
            and torch.is_grad_enabled())


def _packed_forward(inner, prompt, inputs_embeds, position_ids, labels, kwargs):
    """One packed row: every example gets its own copy of the virtual tokens in front (one gather)."""
    n = prompt.shape[0]
    cu = kwargs["cu_seq_lens_q"].to(inputs_embeds.device)
    new_cu, index, real, pos = prefixed_layout(cu, n, inputs_embeds.shape[1])
    table = torch.cat([prompt, inputs_embeds[0]], 0)
    kwargs = dict(kwargs)
    kwargs["cu_seq_lens_q"] = kwargs["cu_seq_lens_k"] = new_cu.to(kwargs["cu_seq_lens_q"].dtype)
    kwargs["max_length_q"] = kwargs["max_length_k"] = int(kwargs["max_length_q"]) + n
    if labels is not None:
        flat = torch.cat([labels.new_full((n,), IGNORE), labels[0]])
        labels = flat[index].unsqueeze(0)
        labels[0, ~real] = IGNORE
    out = inner(inputs_embeds=table[index].unsqueeze(0), position_ids=pos.unsqueeze(0), labels=labels, **kwargs)
    if getattr(out, "logits", None) is not None:
        out.logits = out.logits[:, real]
    return out


def _kv_blocks(model, flat: torch.Tensor) -> torch.Tensor:
    """(n, 2·layers·kv_heads·head_dim) virtual tokens -> (2·layers, kv_heads, n, head_dim) in the model's dtype.
    PEFT's layout: per token, layers·2 blocks of kv_heads·head_dim, keys then values of each layer."""
    layers, kv_heads, head_dim = kv_shape(model.config)
    n = flat.shape[0]
    return flat.to(model.get_input_embeddings().weight.dtype).view(n, 2 * layers, kv_heads, head_dim).permute(1, 2, 0, 3)


def _prefix_fast_forward(self, inner, flat, input_ids, inputs_embeds, attention_mask, position_ids, labels, kwargs):
    """ftune's fast layer attends over the prefix itself: the mask stays the real tokens' (each layer adds the
    prefix columns), positions move up by n (packed rows: within each example), the rest passes as it came."""
    n = flat.shape[0]
    if position_ids is None:
        ref = input_ids if input_ids is not None else inputs_embeds
        position_ids = torch.arange(ref.shape[1], device=ref.device).unsqueeze(0)
    kwargs = {**kwargs, PREFIX_KWARG: Prefix(_kv_blocks(self, flat), attention_mask)}
    return inner(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                 position_ids=position_ids + n, labels=labels, **kwargs)


def _prefix_forward(self, inner, flat, batch, input_ids, inputs_embeds, attention_mask, position_ids, labels, kwargs):
    """The prefix as a KV cache of n positions in every layer (transformers stores the keys as given: they are
    never rotated); positions move up by n, as after any cached prefix. `attention_mask` has the n ones already."""
    from transformers import DynamicCache

    kv = _kv_blocks(self, flat)
    cache = DynamicCache(config=self.config)
    for i in range(kv.shape[0] // 2):
        cache.update(kv[2 * i].unsqueeze(0).expand(batch, -1, -1, -1), kv[2 * i + 1].unsqueeze(0).expand(batch, -1, -1, -1), i)
    kwargs = {k: v for k, v in kwargs.items() if k not in CACHE_KEYS}
    kwargs[cache_kwarg(type(self))] = cache
    n = flat.shape[0]
    return inner(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                 position_ids=None if position_ids is None else position_ids + n, labels=labels, **kwargs)


def cache_kwarg(model_cls: type) -> str:
    """`cache` where transformers renamed the KV cache argument, else `past_key_values`."""
    try:
        return "cache" if "cache" in inspect.signature(model_cls.forward).parameters else "past_key_values"
    except (TypeError, ValueError):
        return "past_key_values"
