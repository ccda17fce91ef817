"""Attention for the fast layer: one padded/causal path and one packed (variable-length) path.

Packed micro-batches (data.packing) put several examples in one row with position_ids restarting at 0
and `cu_seq_lens` marking where each starts. On CUDA, PyTorch's own variable-length flash attention
(`torch.nn.attention.varlen`, torch >= 2.10) runs them with no attention across examples and no mask;
elsewhere transformers' SDPA path gets the block-diagonal causal mask that transformers builds from
the restarting position_ids — the same function, slower.

A prefix (prefix tuning: n trained keys/values per layer, a `Prefix` from ftune/layers/prompt.py) is attended
over here, not through a KV cache: keys and values become [prefix; keys], the queries keep the positions
n, n+1, … their RoPE was applied at, and the prefix keys are not rotated (transformers' cache path stores them
as given and rotates only the new keys: the two agree). Every real query sees all n prefix columns, then the
causal range of its own example:
  padded rows: one (batch, 1, S, n+S) boolean mask (n True columns, then causal ∧ padding) for SDPA, or its
    additive form for eager; built once per forward (Prefix.memo).
  packed rows on CUDA: varlen flash attention with the prefix inserted in front of each example's keys
    (cu_seqlens_k = cu_seqlens_q + n·arange). Its causal mask is aligned bottom-right when an example's keys
    outnumber its queries: query i sees keys ≤ i + n, i.e. the prefix and its own causal range. (torch's
    varlen_attn hands is_causal / window (-1, 0) to aten._flash_attention_forward, and torch/nn/attention/bias.py
    notes that flash's causal means lower-right — why SDPA, whose is_causal is upper-left, sends only square
    causal attention to flash.) That alignment is read from torch's sources, so it is also checked once per
    process on the GPU at hand (`varlen_aligns_bottom_right`, one 3-key call against the rule written out);
    where it does not hold, packed prefix rows take the mask path below, which is correct on any device.
  packed rows elsewhere (no varlen; a sliding window): the padded rule with the block-diagonal mask of the
    examples (from cu_seq_lens). A sliding window (Mistral, Qwen2's sliding layers) counts the prefix positions too.
"""

from __future__ import annotations

import inspect
import sys
from functools import lru_cache

import torch

from ftune.layers.prompt import Prefix, prefixed_layout


@lru_cache(maxsize=1)
def _varlen():
    """(varlen_attn, kwargs for causal + GQA) or None; the keyword names changed between torch versions."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    kwargs = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    if "enable_gqa" in params:
        kwargs["enable_gqa"] = True
    return varlen_attn, kwargs


def varlen_available(device: torch.device) -> bool:
    return device.type == "cuda" and _varlen() is not None


def packed_attention(q, k, v, cu_seqlens: torch.Tensor, max_len: int, scale: float,
                     cu_seqlens_k: torch.Tensor | None = None, max_len_k: int | None = None) -> torch.Tensor:
    """q (T, H, D), k/v (T_k, H_kv, D) of one packed row -> (T, H, D); causal within each example, aligned
    bottom-right where an example has more keys than queries (`cu_seqlens_k`, default `cu_seqlens`).
    The flash kernel takes fewer k/v heads than q heads (GQA) natively."""
    fn, kwargs = _varlen()
    cu_k = cu_seqlens if cu_seqlens_k is None else cu_seqlens_k
    return fn(q, k, v, cu_seqlens, cu_k, max_len, max_len if max_len_k is None else max_len_k, scale=scale, **kwargs)


@lru_cache(maxsize=None)
def varlen_aligns_bottom_right(device: torch.device) -> bool:
    """Whether varlen flash attention, given more keys than queries in an example, lets query i see keys ≤ i +
    (keys − queries): one example of 2 queries and 3 keys on `device`, against that rule written out."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(t, 1, 8, generator=gen).to(device, torch.bfloat16) for t in (2, 3, 3))
    cu_q, cu_k = (torch.tensor(c, dtype=torch.int32, device=device) for c in ([0, 2], [0, 3]))
    try:
        got = packed_attention(q, k, v, cu_q, 2, 8 ** -0.5, cu_k, 3).float()
    except RuntimeError:
        return False
    scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * 8 ** -0.5
    sees = torch.tensor([[True, True, False], [True, True, True]], device=device)
    want = torch.einsum("hqk,khd->qhd", scores.masked_fill(~sees, float("-inf")).softmax(-1), v.float())
    return bool((got - want).abs().max() < 2e-2)


def _hf_attention(attn):
    impl = attn.config._attn_implementation
    if impl == "sdpa":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward
    if impl == "eager":
        return sys.modules[type(attn).__module__].eager_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[impl]


def core_attention(attn, q, k, v, attention_mask, kwargs: dict, prefix=None) -> torch.Tensor:
    """q (B, H, S, D), k/v (B, H_kv, S, D) views -> (B, S, H·D). `kwargs` are the model call's extra
    arguments (cu_seq_lens_q / max_length_q for packed rows); `prefix`: a `Prefix` to attend over as well."""
    if prefix is not None:
        return prefix_attention(attn, q, k, v, prefix, kwargs)
    cu = kwargs.get("cu_seq_lens_q")
    b, _, s, d = q.shape
    if cu is not None and b == 1 and varlen_available(q.device) and attn.config._attn_implementation == "sdpa":
        q, k, v = (t[0].transpose(0, 1).contiguous() for t in (q, k, v))  # no copy after liger's RoPE
        out = packed_attention(q, k, v, cu,
                               int(kwargs["max_length_q"]), attn.scaling)
        return out.reshape(1, s, -1)
    out, _ = _hf_attention(attn)(attn, q, k, v, attention_mask, dropout=0.0, scaling=attn.scaling, **kwargs)
    return out.reshape(b, s, -1)


def prefix_mask(n: int, s: int, padding: torch.Tensor | None, cu: torch.Tensor | None, device,
                window: int | None = None) -> torch.Tensor:
    """(B or 1, 1, S, n+S) boolean, True where a query looks: all n prefix columns, then its own causal range
    (within its example when `cu`, cu_seq_lens of a packed row, is given; not at padding columns). With a
    sliding `window` (Mistral, Qwen2's sliding layers) a query at position p sees positions > p − window only,
    prefix positions 0..n-1 included, as transformers' sliding mask over the cache does."""
    t = torch.arange(s, device=device)
    pos, same = t, torch.ones(s, s, dtype=torch.bool, device=device)
    if cu is not None:
        cu = cu.to(device).long()
        example = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=device), cu[1:] - cu[:-1], output_size=s)
        pos, same = t - cu[example], example[None, :] == example[:, None]
    q = pos[:, None] + n  # the real tokens' positions start at n
    seen = same & (pos[None, :] + n <= q)
    front = torch.ones(s, n, dtype=torch.bool, device=device)
    if window is not None:
        seen = seen & (pos[None, :] + n > q - window)
        front = torch.arange(n, device=device)[None, :] > q - window
    seen = seen.unsqueeze(0)
    if padding is not None:
        seen = seen & padding.to(device=device, dtype=torch.bool)[:, None, :]
    return torch.cat([front.expand(seen.shape[0], -1, -1), seen], -1).unsqueeze(1)


def prefix_attention(attn, q, k, v, prefix: Prefix, kwargs: dict) -> torch.Tensor:
    """core_attention over [prefix; keys] (see the module docstring): q (B, H, S, D), k/v (B, H_kv, S, D)."""
    pk, pv = (t.to(k.dtype) for t in prefix.layer(attn.layer_idx))  # (H_kv, n, D)
    n, (b, _, s, _) = prefix.n, q.shape
    cu = kwargs.get("cu_seq_lens_q") if b == 1 else None
    window = getattr(attn, "sliding_window", getattr(attn.config, "sliding_window", None))  # Qwen2's per layer
    if cu is not None and window is None and varlen_available(q.device) and varlen_aligns_bottom_right(q.device):
        if "varlen" not in prefix.memo:
            new_cu, index, _, _ = prefixed_layout(cu, n, s)
            prefix.memo["varlen"] = (new_cu.to(cu.dtype), index)
        cu_k, index = prefix.memo["varlen"]
        q1 = q[0].transpose(0, 1).contiguous()
        k1, v1 = (torch.cat([p.transpose(0, 1), t[0].transpose(0, 1)])[index] for p, t in ((pk, k), (pv, v)))
        max_q = int(kwargs["max_length_q"])
        return packed_attention(q1, k1, v1, cu, max_q, attn.scaling, cu_k, max_q + n).reshape(1, s, -1)
    eager = attn.config._attn_implementation == "eager"
    key = ("mask", eager, window)
    if key not in prefix.memo:
        mask = prefix_mask(n, s, prefix.padding, cu, q.device, window)
        if eager:  # eager adds its mask to the scores
            mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, torch.finfo(q.dtype).min)
        prefix.memo[key] = mask
    k, v = (torch.cat([p.unsqueeze(0).expand(b, -1, -1, -1), t], 2) for p, t in ((pk, k), (pv, v)))
    if eager:
        fn = _hf_attention(attn)
    else:  # SDPA also stands in for flash_attention_2, whose own function takes no mask of this shape
        from transformers.integrations.sdpa_attention import sdpa_attention_forward as fn
    out, _ = fn(attn, q, k, v, prefix.memo[key], dropout=0.0, scaling=attn.scaling)
    return out.reshape(b, s, -1)
